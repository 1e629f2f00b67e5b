"""A trained checkpoint in use: RecBole's own loading flow (``load_data_and_model``, ``full_sort_topk``,
``full_sort_scores``) and ``recbole-llm recommend``, for every model we ship.

Each mechanism test was checked by breaking the mechanism by hand; its docstring names the breakages it caught."""
import csv
import io
import pickle

import pytest
import torch

import recbole_llm  # noqa: F401 - before RecBole's names are imported: the plugin and its shims
from recbole.quick_start import load_data_and_model
from recbole.utils.case_study import full_sort_scores, full_sort_topk

from recbole_llm import cli, compat
from recbole_llm.errors import InputError
from recbole_llm.quick_start import build
from recbole_llm.recommend import recommend
from conftest import write_tiny_dataset

MODELS = {
    "LRURec": {},
    "LlamaRec": {"candidate_k": 5, "retriever_config": {"epochs": 1}, "ranker_max_train_examples": 8,
                 "ranker_eval_step": 2, "ranker_valid_users": 8},
    "E4SRec": {"lora_r": 4, "id_model_config": {"epochs": 1}, "train_rows_per_epoch": 64},
    "Laser": {"id_model_config": {"epochs": 1}, "train_rows_per_epoch": 64, "llm_layers": None, "history_titles": 4, "n_experts": 2,
              "n_queries": 2, "router_top_k": 1, "suffix_tokens": 2, "item_phase_epochs": 1},
    "SeRALM": {"alignment_iterations": 0, "knowledge_max_new_tokens": 6, "knowledge_fields": {"title": "movie_title"}},
}
USERS = [1, 5, 9]
N_ITEMS, LENGTH = 30, 12


def user_items(user: int) -> list[str]:
    """The items of ``u<user>`` in the tiny dataset, in time order (see ``write_tiny_dataset``)."""
    start = (user * 7) % N_ITEMS
    return [f"i{(start + step) % N_ITEMS + 1}" for step in range(LENGTH)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama_dir):
    """``checkpoint(model)``: (the checkpoint one epoch of training saved, the scores of ``USERS`` by
    the saved model as our trainer reloads it); one tiny dataset, trained once per model."""
    root = tmp_path_factory.mktemp("serving")
    write_tiny_dataset(root / "data", n_items=N_ITEMS, length=LENGTH)
    settings = {
        "data_path": str(root / "data"), "checkpoint_dir": str(root / "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "release_year"]},
        "item_text_fields": ["movie_title", "release_year"], "user_inter_num_interval": None,
        "item_inter_num_interval": None, "MAX_ITEM_LIST_LENGTH": 8, "epochs": 1, "train_batch_size": 32,
        "eval_batch_size": 16, "show_progress": False, "use_gpu": False, "state": "WARNING",
        "llm_path": str(tiny_llama_dir), "learning_rate": 0.01,
    }
    made = {}

    def checkpoint(model):
        if model not in made:
            _, _, trainer, (train, valid, test) = build(model, "tiny", config_dict={**settings, **MODELS[model]})
            trainer.fit(train, valid, saved=True, show_progress=False)
            trainer.evaluate(test, load_best_model=True, show_progress=False)  # the saved weights, our way
            users = test.dataset.token2id("user_id", [f"u{user}" for user in USERS])
            made[model] = trainer.saved_model_file, full_sort_scores(users, trainer.model, test)
        return made[model]

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # RecBole's logger writes to ./log
        yield checkpoint


@pytest.mark.parametrize("model", MODELS)
def test_recboles_loading_flow_gives_the_scores_of_the_saved_model(checkpoints, model):
    """``load_data_and_model`` on our checkpoint after ``import recbole_llm``, then RecBole's case study.

    Caught: shim 15 removed (UnpicklingError: Unsupported operand 149), E4SRec's pluggable
    ``load_state_dict`` made a no-op (other scores)."""
    checkpoint, saved_scores = checkpoints(model)
    config, loaded, dataset, _, _, test = load_data_and_model(checkpoint)
    assert config["model"] == model and type(loaded).__name__ == model
    users = dataset.token2id("user_id", [f"u{user}" for user in USERS])
    assert torch.allclose(full_sort_scores(users, loaded, test), saved_scores, atol=1e-5)
    top_scores, top_items = full_sort_topk(users, loaded, test, k=5)
    assert torch.equal(top_items, torch.topk(saved_scores, 5).indices)


def test_the_checkpoint_unpickler_refuses_what_a_checkpoint_never_holds(tmp_path):
    """torch's safe default stays for files we did not write: a pickle naming any other global (``print``) is refused.

    Caught: ``find_class`` allowing every global."""
    path = tmp_path / "evil.pth"
    torch.save({"config": print}, path)  # a callable global; nothing is called when it is refused
    with pytest.raises(pickle.UnpicklingError, match=r"print is not something a RecBole checkpoint holds"):
        compat.load_recbole_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # torch's own default is untouched


@pytest.mark.parametrize("model", MODELS)
def test_recommend_command_writes_each_users_top_items_outside_their_history(checkpoints, model, tmp_path):
    """``recbole-llm recommend`` writes ``topk`` rows per user given, best first, with item ids and text,
    none of them an item the user already has.

    Caught: history not excluded (items of the user's sequence recommended)."""
    checkpoint, _ = checkpoints(model)
    output = tmp_path / "recommendations.csv"
    cli.main(["recommend", f"--model_file={checkpoint}", "--users=u1,u5", "--topk=4", f"--output={output}"])
    rows = list(csv.DictReader(io.StringIO(output.read_text())))
    assert [row["user"] for row in rows] == ["u1"] * 4 + ["u5"] * 4
    assert [int(row["rank"]) for row in rows] == [1, 2, 3, 4] * 2
    for user in (1, 5):
        mine = [row for row in rows if row["user"] == f"u{user}"]
        scores = [float(row["score"]) for row in mine]
        assert scores == sorted(scores, reverse=True)
        assert not {row["item"] for row in mine} & set(user_items(user))
        for row in mine:
            number = int(row["item"][1:])
            assert row["text"] == f"Movie Number {number} ({1950 + number})"


def test_recommendations_read_the_users_whole_history_and_may_include_it(checkpoints):
    """The history is the user's last ``MAX_ITEM_LIST_LENGTH`` items, the test target included (RecBole's
    test row leaves it out); ``include_history`` keeps the user's own items.

    Caught: the test row used as is (scores of another history), history masked with ``include_history``."""
    checkpoint, _ = checkpoints("LRURec")
    _, model, dataset, _, _, _ = load_data_and_model(checkpoint)
    from recbole.data.interaction import Interaction

    last = user_items(9)[-8:]
    row = Interaction({"item_id_list": torch.from_numpy(dataset.token2id("item_id", last)).unsqueeze(0),
                       "item_length": torch.tensor([8]), "user_id": dataset.token2id("user_id", ["u9"])})
    with torch.no_grad():
        expected = model.eval().full_sort_predict(row)[0]
    expected[0] = -torch.inf
    rows = recommend(checkpoint, users=["u9"], topk=N_ITEMS, include_history=True)
    assert [r["item"] for r in rows] == list(dataset.id2token("item_id", torch.topk(expected, N_ITEMS).indices.numpy()))
    assert [r["score"] for r in rows] == pytest.approx(torch.topk(expected, N_ITEMS).values.tolist(), abs=1e-5)
    assert len(rows) == N_ITEMS  # every item, the history included


def test_recommend_names_unknown_users_a_missing_checkpoint_and_another_kind_of_model_before_building_it(
        checkpoints, tmp_path, monkeypatch):
    """Caught: users checked only on the loaded model's test split."""
    import recbole.quick_start

    checkpoint, _ = checkpoints("LRURec")
    monkeypatch.setattr(recbole.quick_start, "load_data_and_model", lambda model_file: pytest.fail("model built"))
    with pytest.raises(InputError, match=r"users \['u999'\] are not users of dataset 'tiny'"):
        recommend(checkpoint, users=["u1", "u999"])
    with pytest.raises(InputError, match="does not exist"):
        recommend(tmp_path / "nothing.pth")
    from recbole.utils import ModelType

    saved = torch.load(checkpoint, weights_only=False)
    saved["config"]["MODEL_TYPE"] = ModelType.GENERAL
    torch.save(saved, tmp_path / "general.pth")
    with pytest.raises(InputError, match="holds LRURec, not a sequential model"):
        recommend(tmp_path / "general.pth")
    with pytest.raises(SystemExit, match="name a .csv or .json file"):
        cli.main(["recommend", f"--model_file={checkpoint}", "--output=out.txt"])
