"""E4SRec: frozen LLM and item table, ID embeddings through the projection into the LLM, one head scoring
all items, padding, pluggable round trip, quick start, bad input.

Each mechanism test was checked by breaking the mechanism by hand; its docstring names the breakages it caught."""
import math
from pathlib import Path

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.data.interaction import Interaction

from recbole_llm import load_config
from recbole_llm.model.e4srec import E4SRec
from conftest import first_batch, train_steps, write_tiny_dataset


def _config(tiny_data, llm_dir, **extra):
    name, overrides = tiny_data
    settings = {
        **overrides,
        "llm_path": str(llm_dir),
        "lora_r": 4,
        "lora_alpha": 8,
        "id_model_config": {"epochs": 1},
        "learning_rate": 0.01,
        **extra,
    }
    return load_config("E4SRec", name, config_dict=settings)


def _build(config):
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    torch.manual_seed(0)
    return E4SRec(config, train._dataset), train, test




@pytest.fixture
def e4srec(tiny_data, tiny_llama_dir):
    config = _config(tiny_data, tiny_llama_dir)
    model, train, test = _build(config)
    return config, model, train, test


def _frozen_llm_state(model):
    return {k: v.clone() for k, v in model.llm.state_dict().items() if "lora_" not in k}


def test_training_changes_only_the_pluggable_part(e4srec):
    """Caught: a base weight of the LLM left trainable after LoRA; the projection or the head bypassed."""
    _, model, train, _ = e4srec
    llm_before = _frozen_llm_state(model)
    table_before = model.item_embedding.weight.clone()
    pluggable_before = model.trainable_state_dict()
    assert not model.item_embedding.weight.requires_grad
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("input_proj.", "score.")) for n in trainable)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = first_batch(train)
    first = model.calculate_loss(batch).item()
    for _ in range(5):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    assert model.calculate_loss(batch).item() < first
    llm_after = _frozen_llm_state(model)
    assert llm_before.keys() == llm_after.keys()
    assert all(torch.equal(llm_before[k], llm_after[k]) for k in llm_before)
    assert torch.equal(table_before, model.item_embedding.weight)
    changed = model.trainable_state_dict()
    assert all(not torch.equal(pluggable_before[k], changed[k]) for k in ("input_proj.weight", "score.weight"))
    assert any(not torch.equal(pluggable_before[k], changed[k]) for k in changed if "lora_B" in k)


def test_item_table_is_the_cached_stage1_sasrec_table(e4srec):
    config, model, _, _ = e4srec
    cached = list((Path(config["checkpoint_dir"]) / "stage1").glob("SASRec-*.pth"))
    assert len(cached) == 1  # stage 1 trained once with RecBole's trainer and cached
    saved = torch.load(cached[0], map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(saved["item_embedding.weight"], model.item_embedding.weight)


def _count_llm_calls(model):
    """A list that gets one entry (the ``inputs_embeds``) per call of the LLM body, and the hook's handle."""
    calls = []
    handle = model.llm.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("inputs_embeds")), with_kwargs=True
    )
    return calls, handle


def test_full_sort_predict_scores_every_item_with_one_linear_head(e4srec):
    """Caught: the linear head bypassed (items scored against their projected embeddings); one LLM pass per user."""
    _, model, _, test = e4srec
    interaction = first_batch(test)
    model.eval()
    calls, handle = _count_llm_calls(model)
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
        calls_for_the_batch = len(calls)
        model.full_sort_predict(interaction[:1])
        calls_for_one_user = len(calls) - calls_for_the_batch
        predicted = model.predict(interaction)
        hidden = model.forward(interaction["item_id_list"], interaction["item_length"])
    handle.remove()
    assert scores.shape == (interaction.length, model.n_items)
    assert calls_for_the_batch == calls_for_one_user  # no LLM pass per user or per item
    assert torch.allclose(scores, hidden @ model.score.weight.t(), atol=1e-5)
    chosen = scores.gather(1, interaction["item_id"].unsqueeze(1)).squeeze(1)
    assert torch.allclose(predicted, chosen)
    item = 7  # the head's row for item j drives column j, and only it, for every user
    with torch.no_grad():
        model.score.weight[item] += torch.randn_like(model.score.weight[item])
        moved = model.full_sort_predict(interaction)
    assert (moved != scores).any(0).nonzero().flatten().tolist() == [item]
    assert (moved[:, item] != scores[:, item]).all()


def test_item_id_embeddings_enter_the_llm_through_the_projection_and_drive_the_scores(e4srec):
    """Caught: zeros fed in place of the ID embeddings; the trained projection replaced by a fixed map."""
    _, model, _, _ = e4srec
    model.eval()
    histories = torch.tensor([[3, 4, 5, 0], [6, 7, 8, 9]])  # RecBole's right padding
    interaction = Interaction({"item_id_list": histories, "item_length": torch.tensor([3, 4])})
    calls, handle = _count_llm_calls(model)
    with torch.no_grad():
        base = model.full_sort_predict(interaction)
        projected = model.input_proj(model.item_embedding.weight)
    handle.remove()
    response = model.response_embeds.size(0)
    items = calls[-1][:, -response - 4:-response]  # the item slots: left-padded, just before the response frame
    assert torch.allclose(items[0, 1:], projected[[3, 4, 5]], atol=1e-6)
    assert torch.allclose(items[1], projected[[6, 7, 8, 9]], atol=1e-6)
    assert torch.allclose(calls[-1][:, -response:], model.response_embeds.expand(2, -1, -1))

    table = model.item_embedding.weight
    with torch.no_grad():
        saved = table.clone()
        table[4] = table[20]  # another ID embedding for item 4, in user 0's history only
        changed_item_4 = model.full_sort_predict(interaction)
        table.copy_(saved)
        table[20] = table[4]  # item 20 is in no history: its ID embedding only enters through histories
        changed_item_20 = model.full_sort_predict(interaction)
        table.copy_(saved)
        other_history = model.full_sort_predict(
            Interaction({"item_id_list": torch.tensor([[3, 14, 5, 0], [6, 7, 8, 9]]), "item_length": torch.tensor([3, 4])})
        )
    assert (changed_item_4[0] - base[0]).abs().max() > 1e-4
    assert torch.allclose(changed_item_4[1], base[1], atol=1e-6)
    assert torch.allclose(changed_item_20, base, atol=1e-6)
    assert (other_history[0] - base[0]).abs().max() > 1e-4


def test_padded_and_unpadded_history_give_the_same_scores(e4srec):
    _, model, _, _ = e4srec
    model.eval()
    short = torch.tensor([[3, 4, 5, 0, 0, 0]])  # RecBole's right padding
    longer = torch.tensor([[3, 4, 5, 0, 0, 0], [9, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        alone = model.full_sort_predict(Interaction({"item_id_list": short[:, :3], "item_length": torch.tensor([3])}))
        padded = model.full_sort_predict(Interaction({"item_id_list": longer, "item_length": torch.tensor([3, 6])}))
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert not torch.allclose(padded[0], padded[1], atol=1e-3)


def test_shared_instruction_prefix_equals_feeding_it_per_user(e4srec):
    _, model, _, test = e4srec
    interaction = first_batch(test)
    model.eval()
    with torch.no_grad():
        shared = model.full_sort_predict(interaction)
        model.share_instruction_prefix = False
        per_user = model.full_sort_predict(interaction)
    assert torch.allclose(shared, per_user, atol=1e-4)


def test_pluggable_round_trip_and_one_llm_for_many_models(e4srec, tiny_data, tiny_llama_dir, tmp_path):
    config, model, train, test = e4srec
    train_steps(model, train)
    interaction = first_batch(test)
    with torch.no_grad():
        expected = model.full_sort_predict(interaction)
    folder = tmp_path / "e4srec_tiny.pluggable"
    model.save_pretrained(folder)
    assert {"adapter_config.json", "adapter_model.safetensors", "pluggable.safetensors"} <= \
        {f.name for f in folder.iterdir()}  # the LoRA as a PEFT adapter (and PEFT's model card)
    llm_bytes = sum(f.stat().st_size for f in tiny_llama_dir.iterdir() if f.name.endswith(".safetensors"))
    saved_bytes = sum(f.stat().st_size for f in folder.iterdir())
    assert saved_bytes < 0.5 * llm_bytes  # even against a tiny LLM; megabytes vs gigabytes for a real one

    # a second model on the same LLM directory (its own fresh pluggable part) loads the folder
    torch.manual_seed(1)
    other = E4SRec(config, train._dataset)
    other.eval()
    with torch.no_grad():
        assert not torch.allclose(other.full_sort_predict(interaction), expected)
        other.load_pretrained(folder)
        assert torch.equal(other.full_sort_predict(interaction), expected)
    # so does a model built with the pluggable_dir setting
    config["pluggable_dir"] = str(folder)
    torch.manual_seed(1)
    from_folder = E4SRec(config, train._dataset)
    from_folder.eval()
    with torch.no_grad():
        assert torch.equal(from_folder.full_sort_predict(interaction), expected)
    # and RecBole's load_state_dict takes the trainable part (what LLMTrainer checkpoints)
    other.load_state_dict(model.trainable_state_dict())


def test_llm_layers_keeps_the_first_layers_and_puts_lora_only_there(tiny_data, tiny_llama_dir):
    model, _, test = _build(_config(tiny_data, tiny_llama_dir, llm_layers=1))
    assert len(model.llm.layers) == 1  # of the tiny LLM's 2
    lora_layers = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if "lora_" in n}
    assert lora_layers == {"0"}
    assert model.full_sort_predict(first_batch(test)).shape[1] == model.n_items


def test_tied_head_scores_items_by_their_projected_input_embeddings(tiny_data, tiny_llama_dir):
    model, train, test = _build(_config(tiny_data, tiny_llama_dir, score_head="tied"))
    assert not hasattr(model, "score")  # no per-item head
    interaction = first_batch(test)
    with torch.no_grad():
        user = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
        scores = model.full_sort_predict(interaction)
        item = 3
        expected = user @ model.input_proj(model.item_embedding.weight[item])
    assert scores.shape[1] == model.n_items
    assert torch.allclose(scores[:, item], expected, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("score.") for n in trainable)  # nothing per item trains
    projection_before = model.input_proj.weight.clone()
    train_steps(model, train)
    assert not torch.equal(model.input_proj.weight, projection_before)
    with pytest.raises(ValueError, match="score_head='cosine' is not one of linear, tied"):
        _config(tiny_data, tiny_llama_dir, score_head="cosine")


def test_id_model_checkpoint_from_another_dataset_is_a_clear_error(tiny_data, tiny_llama_dir, tmp_path):
    from recbole.model.sequential_recommender import SASRec

    name, overrides = tiny_data
    write_tiny_dataset(tmp_path / "data", name="other", n_items=45)
    other_config = load_config("SASRec", "other", config_dict=overrides)
    other = SASRec(other_config, create_dataset(other_config))
    checkpoint = tmp_path / "sasrec_other.pth"
    torch.save({"state_dict": other.state_dict()}, checkpoint)
    config = _config(tiny_data, tiny_llama_dir, id_model_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match="id_model_checkpoint") as error:
        _build(config)
    assert "item_embedding" in str(error.value) and "another dataset" in str(error.value)


def test_bad_lora_target_lists_the_llm_modules(tiny_data, tiny_llama_dir):
    config = _config(tiny_data, tiny_llama_dir, lora_target_modules=["gate_proj", "c_fc"])
    with pytest.raises(ValueError, match="c_fc") as error:
        _build(config)
    for real_name in ("gate_proj", "up_proj", "down_proj", "q_proj"):
        assert real_name in str(error.value)


def test_quick_start_reports_the_full_ranking_metrics_of_the_trained_checkpoint(tiny_data, tiny_llama_dir):
    """run_recbole_llm trains E4SRec with LLMTrainer, saves its pluggable part, and its test result is
    that checkpoint's full-ranking evaluation, not the untrained model's.

    Caught: validation metrics reported as the test result."""
    from recbole_llm import run_recbole_llm
    from recbole_llm.quick_start import build
    from recbole_llm.trainer.llm_trainer import LLMTrainer

    name, overrides = tiny_data
    settings = {**overrides, "llm_path": str(tiny_llama_dir), "lora_r": 4, "id_model_config": {"epochs": 1},
                "epochs": 1, "train_rows_per_epoch": 64}
    result = run_recbole_llm("E4SRec", name, config_dict=settings)
    checkpoints = list(Path(overrides["checkpoint_dir"]).glob("E4SRec-*.pth"))
    assert len(checkpoints) == 1

    _, fresh, trainer, (_, _, test) = build("E4SRec", name, config_dict=settings)
    assert isinstance(trainer, LLMTrainer)
    untrained = trainer.evaluate(test, load_best_model=False, show_progress=False)
    trained = trainer.evaluate(test, load_best_model=True, model_file=str(checkpoints[0]), show_progress=False)
    assert dict(trained) == pytest.approx(dict(result["test_result"]), abs=1e-4)
    assert dict(untrained) != pytest.approx(dict(trained), abs=1e-4)
    # beside the checkpoint, its trained parts as a Hugging Face folder, which pluggable_dir loads
    folder = checkpoints[0].with_suffix(".pluggable")
    assert (folder / "adapter_config.json").is_file() and (folder / "pluggable.safetensors").is_file()
    _, _, trainer, (_, _, test) = build("E4SRec", name, config_dict={**settings, "pluggable_dir": str(folder)})
    assert dict(trainer.evaluate(test, load_best_model=False, show_progress=False)) == pytest.approx(dict(trained), abs=1e-4)


def test_cosine_schedule_decays_per_step_and_a_resumed_epoch_continues_the_curve(tiny_data, tiny_llama_dir):
    from recbole_llm.trainer.llm_trainer import LLMTrainer, cosine_factor

    config = _config(tiny_data, tiny_llama_dir, lr_schedule="cosine", epochs=2, train_batch_size=64)
    model, train, _ = _build(config)
    trainer = LLMTrainer(config, model)
    seen = []
    trainer.optimizer.register_step_post_hook(lambda optimizer, *_: seen.append(optimizer.param_groups[0]["lr"]))
    trainer.fit(train, None, saved=False)
    steps = len(train)
    assert steps > 1 and len(seen) == 2 * steps
    assert seen == pytest.approx([0.01 * cosine_factor(k, 2 * steps) for k in range(2 * steps)])
    assert seen[0] == pytest.approx(0.01) and seen[-1] < seen[steps] < seen[1]

    resumed = LLMTrainer(config, model)  # a run resumed at epoch 1 takes up the curve where it was
    seen.clear()
    resumed.optimizer.register_step_post_hook(lambda optimizer, *_: seen.append(optimizer.param_groups[0]["lr"]))
    resumed._train_epoch(train, 1)
    assert seen == pytest.approx([0.01 * cosine_factor(k, 2 * steps) for k in range(steps, 2 * steps)])

    with pytest.raises(Exception, match="lr_schedule='linear' is not one of constant, cosine"):
        _config(tiny_data, tiny_llama_dir, lr_schedule="linear")


def test_last_rows_keeps_each_users_last_rows_in_time_order():
    from recbole_llm.data.sequence_windows import last_rows

    users = torch.tensor([1, 1, 1, 2, 2, 3, 1]).numpy()  # user 1's rows: 0, 1, 2, 6
    assert last_rows(users, 2).tolist() == [2, 3, 4, 5, 6]
    assert last_rows(users, 5).tolist() == list(range(7))


def test_authors_rows_every_position_of_each_users_last_targets(tiny_data, tiny_llama_dir):
    """train_targets_per_user: the training rows are each user's last n training targets, each with its whole
    prefix as history (cut to MAX_ITEM_LIST_LENGTH); validation and test rows are untouched; ~ keeps every row.

    Caught: the first n targets kept instead of the last; the cap applied to the validation split too."""
    splits = {}
    for per_user in (None, 4):
        config = _config(tiny_data, tiny_llama_dir, train_targets_per_user=per_user)
        dataset = create_dataset(config)
        assert type(dataset).__name__ == "LastTargetsDataset"
        splits[per_user] = [d.inter_feat for d in dataset.build()]
    (train_all, valid_all, test_all), (train_last, valid_last, test_last) = splits[None], splits[4]
    assert len(valid_last) == len(valid_all) and len(test_last) == len(test_all)
    users = train_all["user_id"].unique()
    assert len(train_last) == 4 * len(users) < len(train_all)
    for user in users.tolist():
        rows_all, rows_last = train_all[train_all["user_id"] == user], train_last[train_last["user_id"] == user]
        assert torch.equal(rows_last["item_id"], rows_all["item_id"][-4:])
        assert torch.equal(rows_last["item_id_list"], rows_all["item_id_list"][-4:])
        assert torch.equal(rows_last["item_length"], rows_all["item_length"][-4:])


def test_warmup_rises_linearly_then_the_cosine_decays_over_the_remaining_steps(tiny_data, tiny_llama_dir):
    """Caught: warmup_steps ignored; the cosine counted over all steps instead of those after the warm-up."""
    from recbole_llm.trainer.llm_trainer import LLMTrainer

    config = _config(tiny_data, tiny_llama_dir, lr_schedule="cosine", epochs=1, train_batch_size=16, warmup_steps=2)
    model, train, _ = _build(config)
    trainer = LLMTrainer(config, model)
    seen = []
    trainer.optimizer.register_step_post_hook(lambda optimizer, *_: seen.append(optimizer.param_groups[0]["lr"]))
    trainer._train_epoch(train, 0)
    steps = len(train)
    assert steps >= 4 and len(seen) == steps
    assert seen[:2] == pytest.approx([0.005, 0.01])
    assert seen[2:] == pytest.approx([0.01 * (1 + math.cos(math.pi * k / (steps - 2))) / 2 for k in range(steps - 2)])


def test_lora_on_the_attention_projections(tiny_data, tiny_llama_dir):
    """lora_target_modules puts LoRA on the attention projections instead of the authors' MLPs, and it trains.

    Caught: the setting ignored (LoRA on the default MLP modules)."""
    model, train, _ = _build(_config(tiny_data, tiny_llama_dir, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(".self_attn." in n for n in lora) and not any(".mlp." in n for n in lora)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    before = {n: p.detach().clone() for n, p in lora.items() if "lora_B" in n}
    train_steps(model, train)
    assert all(not torch.equal(before[n], lora[n]) for n in before)
