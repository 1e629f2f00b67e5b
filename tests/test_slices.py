"""Metrics by slice (``eval_slices``) on data built so that each slice's metric is known exactly:
a fake scorer ranks the test target first for some rows (cold targets, or short-history users)
and last for the others, so those slices score 1 and the rest 0."""
import logging
import math
import socket
import statistics

import numpy as np
import pytest
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_llm.data.interactions import training_interactions
from recbole_llm.errors import InputError
from recbole_llm.trainer.slices import popularity_slices, thirds

N_USERS = 31  # odd: two ranks' samplers repeat a row
SHORT, MEDIUM = range(1, 11), range(11, 21)  # users 21..31 are long
COLD_TARGET_USERS = [u for u in range(1, N_USERS + 1) if u % 3 == 0]  # 10 users, spread over the history thirds
POOL = 40  # warm items i1..i40; cold items i41..i50


def history_length(user):  # interactions in all: training, then the validation and the test target
    return 8 if user in SHORT else 14 if user in MEDIUM else 26


def user_items(user):
    """The user's items in time order: training items, validation item i2, test target."""
    train = [f"i{40 + user}" if user <= 5 else "i1"]  # cold items i41..i45 get one training interaction
    train += [f"i{(user + step) % POOL + 1}" for step in range(1, history_length(user) - 2)]
    cold = COLD_TARGET_USERS.index(user) if user in COLD_TARGET_USERS else None
    return train + ["i2", f"i{41 + cold}" if cold is not None else "i1"]


def write_sliced_dataset(root, name="sliced"):
    folder = root / name
    folder.mkdir(parents=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(1, N_USERS + 1):
        lines += [f"u{user}\t{item}\t{1000 * user + step}" for step, item in enumerate(user_items(user))]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")


def train_counts_from_file():
    counts = {}
    for user in range(1, N_USERS + 1):
        for item in user_items(user)[:-2]:
            counts[item] = counts.get(item, 0) + 1
    return counts


class FavouringScorer(SequentialRecommender):
    """Scores the target 1 for favoured rows (their target item or user is in ``fake_favoured``),
    -1 for the others, every other item 0: favoured rows rank it first, the rest far below 10."""

    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.field = config["ITEM_ID_FIELD"] if config["fake_by"] == "item" else config["USER_ID_FIELD"]
        self.favoured = torch.as_tensor(dataset.token2id(self.field, config["fake_favoured"]))

    def calculate_loss(self, interaction):
        return (self.weight ** 2).sum() + 1.0

    def predict(self, interaction):
        raise NotImplementedError

    def full_sort_predict(self, interaction):
        target = interaction[self.ITEM_ID]
        scores = torch.zeros(len(target), self.n_items) + 0 * self.weight
        favoured = torch.isin(interaction[self.field].cpu(), self.favoured)
        scores[torch.arange(len(target)), target] = torch.where(favoured, 1.0, -1.0)
        return scores


@pytest.fixture
def sliced_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_sliced_dataset(tmp_path / "data")
    overrides = {"data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"),
                 "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                 "user_inter_num_interval": None, "item_inter_num_interval": None, "MAX_ITEM_LIST_LENGTH": 8,
                 "epochs": 1, "train_batch_size": 64, "eval_batch_size": 8, "show_progress": False, "use_gpu": False,
                 "state": "INFO", "eval_slices": True, "topk": [5, 10], "metrics": ["Recall", "NDCG", "Hit"],
                 "valid_metric": "NDCG@10"}
    return "sliced", overrides


def cold_tokens():
    return sorted(item for item in {user_items(u)[-1] for u in COLD_TARGET_USERS})


def evaluate_fake(name, overrides, by="item", favoured=None):
    from recbole.data import create_dataset, data_preparation

    from recbole_llm import registry
    from recbole_llm.quick_start import load_config

    favoured = favoured or cold_tokens()
    config = load_config(FavouringScorer, name, config_dict={**overrides, "fake_by": by, "fake_favoured": favoured})
    train, valid, test = data_preparation(config, create_dataset(config))
    trainer = registry.get_trainer(FavouringScorer)(config, FavouringScorer(config, train._dataset))
    trainer.eval_collector.data_collect(train)
    return trainer, trainer.evaluate(test, load_best_model=False), (train, valid, test)


def test_the_construction_has_the_slices_it_claims():
    counts = train_counts_from_file()
    assert all(counts[f"i{i}"] >= 5 for i in range(1, POOL + 1))  # the pool is warm
    assert all(counts.get(item, 0) < 5 for item in cold_tokens())  # the cold targets are cold


def test_training_interactions_count_every_training_item_once(sliced_data):
    """Both dataset classes (every prefix; LRURec's windows) count the training items of the file."""
    from recbole.data import create_dataset

    from recbole_llm.quick_start import load_config

    name, overrides = sliced_data
    expected = train_counts_from_file()
    for model in ("SASRec", "LRURec"):
        config = load_config(model, name, config_dict=overrides)
        dataset = create_dataset(config)
        train = dataset.build()[0]
        items, users = training_interactions(train)
        tokens = dataset.field2id_token[dataset.iid_field]
        got = {tokens[i]: int(c) for i, c in enumerate(items.tolist()) if c}
        assert got == expected, model
        user_tokens = dataset.field2id_token[dataset.uid_field]
        assert {user_tokens[u]: int(c) for u, c in enumerate(users.tolist()) if c} == \
            {f"u{u}": history_length(u) - 2 for u in range(1, N_USERS + 1)}, model


def test_thirds_split_the_weight_and_keep_equal_values_together():
    assert thirds([1, 1, 1, 2, 2, 2, 3, 3, 3], np.ones(9)).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert thirds([5, 5, 5, 5, 9], np.ones(5)).tolist() == [1, 1, 1, 1, 2]  # ties stay together, by their middle
    # by interactions: one item of 30 outweighs ten items of 1 and ten of 2
    counts = torch.tensor([0] + [1] * 10 + [2] * 10 + [30])
    index = popularity_slices(counts)
    assert index[0] == 0 and set(index[1:21].tolist()) == {0}  # below 5: cold
    counts = torch.tensor([0, 5, 5, 5, 5, 5, 5, 10, 10, 10, 30])  # 30 | 30 | 30 interactions
    assert popularity_slices(counts).tolist() == [0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3]


def test_cold_targets_ranked_first_give_the_cold_slice_ndcg_one(sliced_data, caplog):
    name, overrides = sliced_data
    with caplog.at_level(logging.INFO):
        _, result, _ = evaluate_fake(name, overrides, by="item")
    slices = result["slices"]
    cold = slices["popularity"]["cold"]
    assert cold["users"] == len(COLD_TARGET_USERS) and cold["ndcg@10"] == 1.0 and cold["hit@10"] == 1.0
    assert cold["ndcg@10_se"] == 0.0 and cold["range"] == [0, 1]
    warm = [slices["popularity"][s] for s in ("tail", "torso", "head")]
    assert sum(m["users"] for m in warm) == N_USERS - len(COLD_TARGET_USERS)
    assert all(m.get("ndcg@10", 0.0) == 0.0 for m in warm)
    share = len(COLD_TARGET_USERS) / N_USERS
    assert slices["all"]["users"] == N_USERS and slices["all"]["ndcg@10"] == pytest.approx(share, abs=1e-4)
    assert result["ndcg@10"] == pytest.approx(share, abs=1e-4)  # the overall metric, same pass
    per_user = [1.0] * len(COLD_TARGET_USERS) + [0.0] * (N_USERS - len(COLD_TARGET_USERS))
    assert slices["all"]["ndcg@10_se"] == pytest.approx(statistics.stdev(per_user) / math.sqrt(N_USERS), abs=1e-4)
    table = [r.getMessage() for r in caplog.records if "metrics by slice" in r.getMessage()]
    assert len(table) == 1 and "popularity=cold" in table[0] and "history=long" in table[0]


def test_short_histories_ranked_first_give_the_short_slice_ndcg_one(sliced_data):
    name, overrides = sliced_data
    _, result, _ = evaluate_fake(name, overrides, by="user", favoured=[f"u{u}" for u in SHORT])
    history = result["slices"]["history"]
    assert history["short"]["users"] == len(SHORT) and history["short"]["ndcg@10"] == 1.0
    assert history["short"]["range"] == [6, 6]
    assert history["medium"]["users"] == len(MEDIUM) and history["medium"]["ndcg@10"] == 0.0
    assert history["long"]["users"] == N_USERS - 20 and history["long"]["ndcg@10"] == 0.0


def test_without_the_setting_nothing_changes(sliced_data):
    name, overrides = sliced_data
    _, result, _ = evaluate_fake(name, {**overrides, "eval_slices": False})
    assert "slices" not in result and result["ndcg@10"] == pytest.approx(10 / 31, abs=1e-4)


def test_evaluate_without_training_counts_says_how(sliced_data):
    from recbole.data import create_dataset, data_preparation

    from recbole_llm import registry
    from recbole_llm.quick_start import load_config

    name, overrides = sliced_data
    config = load_config(FavouringScorer, name, config_dict={**overrides, "fake_by": "item",
                                                             "fake_favoured": cold_tokens()})
    train, _, test = data_preparation(config, create_dataset(config))
    trainer = registry.get_trainer(FavouringScorer)(config, FavouringScorer(config, train._dataset))
    with pytest.raises(InputError, match="data_collect"):
        trainer.evaluate(test, load_best_model=False)


def test_recbole_model_through_our_quick_start_and_through_recboles(sliced_data, caplog):
    """SASRec by name through run_recbole_llm and RecBole's own run_recbole (the plugin): both test
    results carry the slices, computed on every test user; the comparison table gets slice columns."""
    import recbole_llm  # noqa: F401 - installs the plugin
    from recbole.quick_start import run_recbole

    from recbole_llm.quick_start import comparison_table, run_recbole_llm

    name, overrides = sliced_data
    with caplog.at_level(logging.INFO):
        ours = run_recbole_llm("SASRec", name, config_dict=overrides)
    assert ours["test_result"]["slices"]["all"]["users"] == N_USERS
    assert "slices" not in ours["best_valid_result"]  # validation inside fit: no slices
    assert sum(1 for r in caplog.records if "SASRec: metrics by slice" in r.getMessage()) == 1
    recboles = run_recbole(model="SASRec", dataset=name, config_dict={**overrides, "train_neg_sample_args": None})
    assert recboles["test_result"]["slices"]["popularity"]["cold"]["users"] == len(COLD_TARGET_USERS)
    table = comparison_table({"SASRec": ours, "again": ours}, overrides["checkpoint_dir"], "cmp")
    assert "ndcg@10 cold" in table.splitlines()[0] and "ndcg@10 long" in table.splitlines()[0]


def test_llamarec_two_stage_trainer_reports_slices(tiny_data, tiny_llama_dir):
    """Our own trainer with its own fit and evaluate (LlamaRec: retriever candidates, LLM ranker)."""
    from recbole_llm.quick_start import run_recbole_llm

    name, overrides = tiny_data
    settings = {**overrides, "llm_path": str(tiny_llama_dir), "candidate_k": 5, "retriever_config": {"epochs": 1},
                "ranker_max_train_examples": 8, "ranker_eval_step": 2, "ranker_valid_users": 8,
                "fusion_weights": [0.0], "eval_slices": True}
    result = run_recbole_llm("LlamaRec", name, config_dict=settings)
    slices = result["test_result"]["slices"]
    assert slices["all"]["users"] == 40 and slices["all"]["ndcg@10"] == result["test_result"]["ndcg@10"]
    assert sum(slices["history"][s]["users"] for s in ("short", "medium", "long")) == 40


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return str(sock.getsockname()[1])


def test_two_processes_give_the_slices_of_one(sliced_data, monkeypatch):
    """Two ranks each evaluate about half of the users (one repeated to even the shares): the
    slices are computed on the gathered rows, so they equal those of a single process."""
    from recbole_llm.quick_start import run

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    name, overrides = sliced_data
    settings = {**overrides, "fake_by": "item", "fake_favoured": cold_tokens()}
    single = run(FavouringScorer, name, config_dict=settings)["test_result"]["slices"]
    double = run(FavouringScorer, name, config_dict=settings, nproc=2, port=_free_port())["test_result"]["slices"]
    assert double == single
    assert double["all"]["users"] == N_USERS and double["popularity"]["cold"]["ndcg@10"] == 1.0
