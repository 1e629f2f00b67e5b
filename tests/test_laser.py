"""Laser: frozen LLM and ID model, M-Former routing, full ranking, pluggable save/load, bad input."""
import pytest
import torch
from recbole.data import create_dataset, data_preparation

from recbole_llm import load_config
from recbole_llm.model.laser import Laser
from recbole_llm.trainer.llm_trainer import LLMTrainer
from conftest import first_batch, train_steps, write_tiny_dataset

FAST = {
    "id_model_config": {"epochs": 1, "train_batch_size": 64, "stopping_step": 1},
    "history_titles": 4,
    "title_max_tokens": 6,
    "n_experts": 3,
    "n_queries": 2,
    "router_top_k": 2,
    "suffix_tokens": 2,
    "llm_layers": None,
    "train_rows_per_epoch": None,
    "epochs": 1,
}


def _setup(tiny_data, tiny_llama_dir, **settings):
    name, overrides = tiny_data
    config = load_config("Laser", name, config_dict={**overrides, **FAST, "llm_path": str(tiny_llama_dir), **settings})
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    torch.manual_seed(0)
    return config, Laser(config, train._dataset), train, valid, test




@pytest.fixture
def laser(tiny_data, tiny_llama_dir):
    return _setup(tiny_data, tiny_llama_dir)


def test_llm_and_id_model_stay_frozen_while_the_pluggable_part_trains(laser):
    config, model, train, valid, _ = laser
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("llm.", "id_model."))}
    trainable_before = model.trainable_state_dict()
    assert trainable_before and all(not k.startswith(("llm.", "id_model.")) for k in trainable_before)
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.id_model.parameters())
    trainer = LLMTrainer(config, model)
    trainer.fit(train, valid, saved=False, show_progress=False)
    assert not model.llm.training and not model.id_model.training  # no dropout in frozen parts
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    changed = [k for k, v in model.trainable_state_dict().items() if not torch.equal(v, trainable_before[k])]
    assert any(k.startswith("mformer.") for k in changed) and "suffix" in changed
    # the optimizer holds only the trainable parameters
    in_optimizer = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert in_optimizer == sum(v.numel() for v in trainable_before.values())


def test_router_weights_sum_to_one_per_user_with_top_k_experts(laser):
    _, model, train, _, _ = laser
    interaction = first_batch(train)
    weights = model.router_weights(interaction)
    assert weights.shape == (interaction.length, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(interaction.length), atol=1e-6)
    assert ((weights > 0).sum(-1) == 2).all()  # router_top_k=2 of 3 experts
    _, balance = model.mformer.route(model.id_encodings(interaction["item_id_list"], interaction["item_length"])[2])
    assert balance.item() >= 1.0 - 1e-5  # Switch-style balance loss is >= 1, = 1 when balanced


def test_full_sort_covers_every_item_and_predict_agrees(laser):
    _, model, _, _, test = laser
    interaction = first_batch(test)
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
        chosen = model.predict(interaction)
    assert scores.shape == (interaction.length, model.n_items)
    assert torch.isfinite(scores).all()
    assert torch.allclose(chosen, scores.gather(1, interaction["item_id"].unsqueeze(1)).squeeze(1), atol=1e-5)


def test_untrained_laser_starts_next_to_its_frozen_sasrec(laser, tiny_data, tiny_llama_dir):
    """id_residual: the mapped suffix output starts small (output_init_std), so training starts next to
    SASRec's scores; output_init_std=0 is exactly SASRec."""
    _, model, _, _, test = laser
    interaction = first_batch(test)
    with torch.no_grad():
        ours = model.eval().full_sort_predict(interaction)
        theirs = model.id_model.full_sort_predict(interaction)
        gap = (ours - theirs).abs().max()
        assert 0 < gap < 0.05 * theirs.std()
        _, exact, *_ = _setup(tiny_data, tiny_llama_dir, output_init_std=0.0)
        assert torch.allclose(exact.eval().full_sort_predict(interaction), theirs, atol=1e-5)


def test_save_load_round_trip_gives_identical_scores(laser, tiny_data, tiny_llama_dir, tmp_path):
    config, model, train, _, test = laser
    train_steps(model, train)
    interaction = first_batch(test)
    with torch.no_grad():
        before = model.full_sort_predict(interaction)
    path = tmp_path / "laser.pt"
    model.save_pluggable(path)
    assert path.stat().st_size < 2_000_000  # the pluggable part only, not the LLM
    _, fresh, *_ = _setup(tiny_data, tiny_llama_dir)
    fresh.load_pluggable(path)
    fresh.eval()
    with torch.no_grad():
        after = fresh.full_sort_predict(interaction)
    assert torch.equal(before, after)


def test_id_checkpoint_of_another_dataset_is_a_clear_error(tiny_data, tiny_llama_dir, tmp_path):
    from recbole.model.sequential_recommender import SASRec

    name, overrides = tiny_data
    write_tiny_dataset(tmp_path / "data", name="other", n_items=20)
    other_config = load_config("SASRec", "other", config_dict={**overrides, "MAX_ITEM_LIST_LENGTH": 8})
    other = SASRec(other_config, create_dataset(other_config))
    checkpoint = tmp_path / "other-sasrec.pth"
    torch.save({"state_dict": other.state_dict()}, checkpoint)
    with pytest.raises(ValueError, match="id_model_checkpoint.*does not fit this dataset"):
        _setup(tiny_data, tiny_llama_dir, id_model_checkpoint=str(checkpoint))


def test_too_many_virtual_tokens_is_an_error_with_the_numbers(tiny_data, tiny_llama_dir):
    # the tiny Llama's context is 2048 positions
    with pytest.raises(ValueError, match=r"2 prefix tokens .* \+ 3000 suffix tokens = \d+ > max_position_embeddings=2048"):
        _setup(tiny_data, tiny_llama_dir, suffix_tokens=3000)


@pytest.mark.parametrize(
    "ablation",
    [{"use_prefix": False}, {"suffix_tokens": 0}, {"n_experts": 1, "router_top_k": 1},
     {"item_repr": "id", "id_residual": False, "llm_layers": 1, "suffix_pooling": "last", "train_rows_per_epoch": 10}],
    ids=["no_prefix", "no_suffix", "one_expert", "id_items_no_residual"],
)
def test_ablations_build_valid_models(tiny_data, tiny_llama_dir, ablation):
    _, model, train, _, test = _setup(tiny_data, tiny_llama_dir, **ablation)
    loss = model.calculate_loss(first_batch(train))
    assert torch.isfinite(loss)
    loss.backward()
    interaction = first_batch(test)
    with torch.no_grad():
        scores = model.eval().full_sort_predict(interaction)
    assert scores.shape == (interaction.length, model.n_items) and torch.isfinite(scores).all()
