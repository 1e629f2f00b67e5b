"""Laser: frozen LLM and ID model, a gradient for every trainable part at the first step, the router sets the
mix of query experts, prefix and suffix each move the scores, full ranking, pluggable save/load, ablations, bad input.

Each mechanism test was checked by breaking the mechanism by hand; its docstring names the breakages it caught."""
import pytest
import torch
from recbole.data import create_dataset, data_preparation

from recbole_llm import load_config
from recbole_llm.model.laser import Laser
from recbole_llm.trainer.llm_trainer import LLMTrainer
from conftest import first_batch, total_loss, train_steps, write_tiny_dataset

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




def _parameters_without_gradient(model, interaction):
    """Names of the parameters phase 2 trains (all trainable ones but a held item side) whose gradient is
    missing or all zero after one backward pass."""
    model.train()
    model.zero_grad(set_to_none=True)
    total_loss(model.calculate_loss(interaction)).backward()
    held = {id(p) for p in model.item_side_parameters()} if model.item_side_held else set()
    return [name for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in held and (p.grad is None or not p.grad.abs().max() > 0)]


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
    # the optimizer holds only the parameters phase 2 trains: not the held item side
    in_optimizer = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    held = sum(p.numel() for p in model.item_side_parameters())
    assert held and in_optimizer == sum(v.numel() for v in trainable_before.values()) - held


def test_router_weights_sum_to_one_per_user_with_top_k_experts(laser):
    """Caught: routing to every expert instead of the top k."""
    _, model, train, _, _ = laser
    interaction = first_batch(train)
    weights = model.router_weights(interaction)
    assert weights.shape == (interaction.length, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(interaction.length), atol=1e-6)
    assert ((weights > 0).sum(-1) == 2).all()  # router_top_k=2 of 3 experts


def test_balance_loss_is_one_for_a_uniform_router_grows_when_users_crowd_and_joins_the_loss(laser):
    """The loss comes in two parts (RecBole logs each): the cross-entropy alone, and balance_weight x balance.

    Caught: the balance term left out of calculate_loss; the balance term added into the first part."""
    _, model, train, _, _ = laser
    interaction = first_batch(train)
    user = model.id_encodings(interaction["item_id_list"], interaction["item_length"])[2]
    router = model.mformer.router
    model.eval()  # no dropout: the two losses below differ only by the balance term
    with torch.no_grad():
        router.weight.zero_()
        router.bias.zero_()
        uniform = model.mformer.route(user)[1]
        router.bias.copy_(torch.tensor([5.0, 5.0, -5.0]))  # everyone to experts 0 and 1
        crowded = model.mformer.route(user)[1]
        cross_entropy, balance_part = model.calculate_loss(interaction)
        user_vectors = model.forward(interaction["item_id_list"], interaction["item_length"])[0]
        expected_ce = torch.nn.functional.cross_entropy(user_vectors @ model.item_representations().t(),
                                                        interaction["item_id"])
    assert uniform.item() == pytest.approx(1.0, abs=1e-5)
    assert crowded.item() > 1.4  # 3 * (0.5 * 0.5 + 0.5 * 0.5) = 1.5 when two of three experts take everyone
    assert model.balance_weight > 0
    assert balance_part.item() == pytest.approx(model.balance_weight * crowded.item(), rel=1e-3)
    assert cross_entropy.item() == pytest.approx(expected_ce.item(), rel=1e-5)  # the first part is the pure cross-entropy


def test_every_trainable_parameter_gets_a_gradient_at_the_first_step(laser):
    """The gate on the LLM correction starts small, not zero: a zero gate (or a zero projection) would give
    the projection, the suffix, the prefix projection and M-Former exactly zero gradient at the first step.

    Caught: output_gate_init 0; a zero-initialised output projection; the prefix or the suffix left out of
    the LLM input; M-Former without its cross-attention to the ID encodings."""
    _, model, train, _, _ = laser
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("mformer.") for n in trainable) and "suffix" in trainable
    assert _parameters_without_gradient(model, first_batch(train)) == []


def test_routing_users_to_other_experts_changes_their_scores(laser):
    """Caught: experts averaged uniformly whatever the router says; the prefix left out of the LLM input;
    a zero gate."""
    _, model, _, _, test = laser
    interaction = first_batch(test)
    router = model.mformer.router
    model.eval()
    routed = {}
    with torch.no_grad():
        router.weight.zero_()
        for name, bias in {"experts 0, 1": [5.0, 5.0, -5.0], "experts 1, 2": [-5.0, 5.0, 5.0]}.items():
            router.bias.copy_(torch.tensor(bias))
            routed[name] = model.router_weights(interaction), model.full_sort_predict(interaction)
    (weights_a, scores_a), (weights_b, scores_b) = routed.values()
    assert torch.allclose(weights_a, torch.tensor([0.5, 0.5, 0.0]).expand_as(weights_a), atol=1e-4)
    assert torch.allclose(weights_b, torch.tensor([0.0, 0.5, 0.5]).expand_as(weights_b), atol=1e-4)
    assert ((scores_a - scores_b).abs().amax(1) > 1e-5).all()  # every user's scores follow the routing


def test_prefix_is_the_router_weighted_mix_of_expert_outputs_over_each_users_id_encodings(laser, monkeypatch):
    """Caught: experts averaged uniformly whatever the router says; M-Former without its cross-attention."""
    _, model, _, _, test = laser
    interaction = first_batch(test)
    model.eval()
    encodings, padding, user = model.id_encodings(interaction["item_id_list"], interaction["item_length"])

    def prefix(weights):  # M-Former's output with the router's weights forced to ``weights`` for every user
        monkeypatch.setattr(model.mformer, "route", lambda u: (weights.expand(u.size(0), -1), u.new_zeros(())))
        with torch.no_grad():
            return model.mformer(encodings, padding, user)[0]

    experts = [prefix(torch.eye(3)[e]) for e in range(3)]
    mixed = prefix(torch.tensor([0.25, 0.75, 0.0]))
    assert torch.allclose(mixed, 0.25 * experts[0] + 0.75 * experts[1], atol=1e-5)
    assert (experts[0] - experts[1]).abs().max() > 1e-2 and (experts[1] - experts[2]).abs().max() > 1e-2
    # the queries read each user's own ID encodings: users with different histories get different prefixes
    assert (experts[0][0] - experts[0][1]).abs().max() > 1e-2


def test_prefix_and_suffix_each_change_every_users_scores(laser):
    """Caught: the prefix, or the suffix, left out of the LLM input; a zero gate."""
    _, model, _, _, test = laser
    interaction = first_batch(test)
    model.eval()
    scale = model.suffix.detach().std()  # the token-embedding scale

    def scores():
        with torch.no_grad():
            return model.full_sort_predict(interaction)

    base = scores()
    assert torch.equal(base, scores())  # deterministic: any difference below comes from the perturbation
    torch.manual_seed(1)
    with torch.no_grad():
        model.suffix.add_(scale * torch.randn_like(model.suffix))
    after_suffix = scores()
    with torch.no_grad():
        model.prefix_projection.bias.add_(scale * torch.randn_like(model.prefix_projection.bias))
    after_prefix = scores()
    assert ((after_suffix - base).abs().amax(1) > 1e-5).all()
    assert ((after_prefix - after_suffix).abs().amax(1) > 1e-5).all()


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
    """scoring residual: the gated correction starts small (output_gate_init), so training starts next to
    SASRec's scores; output_gate_init=0 is exactly SASRec.

    Caught: the SASRec user vector not added; a zero gate at the start."""
    _, model, _, _, test = laser
    interaction = first_batch(test)
    with torch.no_grad():
        ours = model.eval().full_sort_predict(interaction)
        theirs = model.id_model.full_sort_predict(interaction)
        gap = (ours - theirs).abs().max()
        assert 0 < gap < 0.05 * theirs.std()
        _, exact, *_ = _setup(tiny_data, tiny_llama_dir, output_gate_init=0.0)
        assert torch.allclose(exact.eval().full_sort_predict(interaction), theirs, atol=1e-5)


def test_save_load_round_trip_gives_identical_scores(laser, tiny_data, tiny_llama_dir, tmp_path):
    config, model, train, _, test = laser
    train_steps(model, train)
    interaction = first_batch(test)
    with torch.no_grad():
        before = model.full_sort_predict(interaction)
    folder = tmp_path / "laser.pluggable"
    model.save_pretrained(folder)
    assert (folder / "pluggable.safetensors").stat().st_size < 2_000_000  # the pluggable part only, not the LLM
    _, fresh, *_ = _setup(tiny_data, tiny_llama_dir)
    fresh.load_pretrained(folder)
    fresh.eval()
    _, from_folder, *_ = _setup(tiny_data, tiny_llama_dir, pluggable_dir=str(folder))
    from_folder.eval()
    with torch.no_grad():
        assert torch.equal(before, fresh.full_sort_predict(interaction))
        assert torch.equal(before, from_folder.full_sort_predict(interaction))


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
    "ablation, removed",
    [({"use_prefix": False}, ("mformer.", "prefix_projection.")),
     ({"suffix_tokens": 0}, ("suffix",)),
     ({"n_experts": 1, "router_top_k": 1}, ("mformer.router.",)),
     ({"item_repr": "id", "scoring": "paper", "llm_layers": 1, "suffix_pooling": "last", "train_rows_per_epoch": 10},
      ("text_projection.",))],
    ids=["no_prefix", "no_suffix", "one_expert", "id_items_paper_scoring"],
)
def test_ablations_drop_their_part_and_train_every_remaining_parameter(tiny_data, tiny_llama_dir, ablation, removed):
    """Caught: use_prefix ignored; a router built (and never trained) with one expert."""
    _, model, train, _, test = _setup(tiny_data, tiny_llama_dir, **ablation)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and not [name for name in trainable if name.startswith(removed)]
    assert _parameters_without_gradient(model, first_batch(train)) == []
    interaction = first_batch(test)
    with torch.no_grad():
        scores = model.eval().full_sort_predict(interaction)
    assert scores.shape == (interaction.length, model.n_items)


def test_llm_outputs_are_normalised_before_both_projections(laser):
    """The frozen LLM's vectors (norms ~30 for SmolLM2) reach the output and title projections at unit scale
    per dimension, like the ID model's vectors.

    Caught: the pooled suffix output, or the title vectors, projected without normalisation."""
    _, model, train, _, _ = laser
    seen = []
    handle = model.output_projection.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model.eval().full_sort_predict(first_batch(train))
    handle.remove()
    for vectors in (seen[0], model.item_text_vectors[1:]):
        assert torch.allclose(vectors.mean(-1), torch.zeros(len(vectors)), atol=1e-4)
        assert torch.allclose(vectors.var(-1, unbiased=False), torch.ones(len(vectors)), atol=1e-2)


@pytest.mark.parametrize("scoring", ["residual", "paper"])
def test_scoring_paper_uses_the_mapped_suffix_output_alone_and_residual_adds_it_gated_to_sasrec(
        tiny_data, tiny_llama_dir, scoring):
    """scoring paper: the user embedding is the mapped suffix output alone (the paper's), scored by dot product
    with the item representations; residual: SASRec's user vector + gate x that output.

    Caught: the SASRec user vector added in paper scoring; a zero gate in residual scoring."""
    _, model, _, _, test = _setup(tiny_data, tiny_llama_dir, scoring=scoring, output_gate_init=0.3)
    assert hasattr(model, "output_gate") == (scoring == "residual")
    interaction = first_batch(test)
    seen = []
    handle = model.output_projection.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        scores = model.eval().full_sort_predict(interaction)
        id_user = model.id_encodings(interaction["item_id_list"], interaction["item_length"])[2]
        items = model.item_representations()
    handle.remove()
    user = seen[0] if scoring == "paper" else id_user + 0.3 * seen[0]
    assert torch.allclose(scores, user @ items.t(), atol=1e-5)


def _changed(before, model):
    return {name for name, value in model.trainable_state_dict().items() if not torch.equal(value, before[name])}


def test_two_phases_item_side_on_all_rows_without_the_llm_then_the_rest_with_the_item_side_held(
        tiny_data, tiny_llama_dir):
    """Phase 1 trains only the title projection, on every training row, with no LLM pass; its validation result
    becomes the best so far; phase 2 trains the LLM side with the title projection held (item_side_lr_scale 0).

    Caught: phase 1 on a share of the rows; the item side not held in phase 2 (the groups' lr_scale ignored).
    (Handing phase 1's optimizer every parameter is not a breakage: its loss reaches only the item side.)"""
    from recbole_llm.registry import get_trainer
    from recbole_llm.trainer.laser import LaserTrainer

    config, model, train, valid, _ = _setup(tiny_data, tiny_llama_dir, item_phase_epochs=2, train_rows_per_epoch=20,
                                            train_batch_size=16)
    assert issubclass(get_trainer(Laser), LaserTrainer)
    trainer = LaserTrainer(config, model)
    llm_calls, rows_seen = [], []
    handle = model.llm.register_forward_pre_hook(lambda module, args: llm_calls.append(1))
    loss = model.item_phase_loss
    model.item_phase_loss = lambda users, targets: rows_seen.append(len(targets)) or loss(users, targets)
    before = model.trainable_state_dict()
    trainer.item_phase(train, 2)
    handle.remove()
    del model.item_phase_loss
    assert llm_calls == [] and sum(rows_seen) == 2 * len(train._dataset)
    assert _changed(before, model) == {"text_projection.weight"}

    after_phase_1 = model.trainable_state_dict()
    trainer._train_epoch(train, 0)
    changed = _changed(after_phase_1, model)
    assert "text_projection.weight" not in changed and "suffix" in changed and "output_gate" in changed

    fresh_config, fresh, *_ = _setup(tiny_data, tiny_llama_dir, item_phase_epochs=1, epochs=1)
    fitted = LaserTrainer(fresh_config, fresh)
    validations = []
    valid_epoch = fitted._valid_epoch
    fitted._valid_epoch = lambda *args, **kwargs: validations.append(1) or valid_epoch(*args, **kwargs)
    fitted.fit(train, valid, saved=False, show_progress=False)
    assert len(validations) == 2  # after phase 1, and after the one phase-2 epoch


def test_gradient_accumulation_equals_one_batch_of_all_the_rows(tiny_data, tiny_llama_dir):
    """Two batches of 16 rows accumulated into one step move the parameters as one batch of their 32 rows (SGD,
    no clipping: Adam's first step and clipping would hide a wrong scale; no balance term, which depends on
    the batch's routing statistics and so is not a sum over rows).

    Caught: the losses not divided by the number of batches in a step; a step after every batch."""
    from recbole_llm.trainer.llm_trainer import LLMTrainer

    config, model, train, _, _ = _setup(tiny_data, tiny_llama_dir, mformer_dropout=0.0, train_rows_per_epoch=None,
                                        learner="sgd", learning_rate=0.5, clip_grad_norm=None, balance_weight=0.0)
    start = model.trainable_state_dict()
    batch = first_batch(train)[:32]
    results = []
    for steps, batches in ((1, [batch]), (2, [batch[:16], batch[16:]])):
        model.load_state_dict(start)
        config["gradient_accumulation_steps"] = steps
        LLMTrainer(config, model)._train_epoch(batches, 0)
        results.append(model.trainable_state_dict())
    one, accumulated = results
    assert _changed(start, model)
    for name in one:
        assert torch.allclose(one[name], accumulated[name], atol=1e-5), name


def test_history_prompts_are_built_on_the_device_as_the_rows_they_stand_for(embedded_tokenizer):
    """``HistoryPrompt.batch`` (tensors, no per-row host copy) gives, row for row, head + the last
    ``history_titles`` titles joined by the separator + tail, left-padded: histories shorter and
    longer than ``history_titles``, and items without a title.
    Breakages checked by hand (caught): a separator before the first title; the oldest instead of
    the latest titles; padding trimmed from the wrong end."""
    from recbole_llm.llm.batching import left_pad
    from recbole_llm.model.laser import HistoryPrompt

    titles = ["", "Toy Story (1995)", "", "Heat", "A Very Long Title Of A Film That Goes On And On", "Fargo"]
    prompt = HistoryPrompt(embedded_tokenizer, titles, "User watched:{history}. Next:", history_titles=3,
                           title_max_tokens=5)
    histories = [[1], [2, 3], [1, 3, 4, 5, 1], [5, 4, 3, 2, 1, 5, 4], [2]]
    width = max(len(h) for h in histories)
    item_seq = torch.tensor([h + [0] * (width - len(h)) for h in histories])
    item_seq_len = torch.tensor([len(h) for h in histories])
    pad = embedded_tokenizer.pad_token_id

    expected = []
    for history in histories:
        body = []
        for position, item in enumerate(history[-3:]):
            body += (prompt.separator if position else []) + prompt.titles[item]
        expected.append(prompt.head + body + prompt.tail)
    expected_ids, expected_mask, _ = left_pad(expected, pad)
    ids, mask = prompt.batch(item_seq, item_seq_len, pad)
    assert torch.equal(mask, expected_mask)
    assert torch.equal(ids, expected_ids)


def test_held_item_side_gets_no_gradient_so_clipping_sees_only_what_phase_two_trains(tiny_data, tiny_llama_dir):
    """Phase 2 with the item side held (item_side_lr_scale 0): the item side takes no gradient at all and is
    out of the optimizer, so gradient clipping measures only the user side; slowed (0.1), it trains.

    Caught (on the code before the fix): the held item side kept a gradient with a learning rate of 0, which
    entered the clipping norm and shrank the user side's step; the stage-1 SASRec, trained in this process,
    kept its last training step's gradients, which entered the clipping norm too."""
    for scale, held in ((0.0, True), (0.1, False)):
        config, model, train, _, _ = _setup(tiny_data, tiny_llama_dir, item_side_lr_scale=scale)
        assert model.item_side_held is held
        assert all(p.grad is None for p in model.parameters())  # nothing left over from stage 1's training
        item_side = {id(p) for p in model.item_side_parameters()}
        assert item_side
        model.train()
        total_loss(model.calculate_loss(first_batch(train))).backward()
        with_gradient = [p for p in model.parameters() if p.grad is not None]
        assert any(id(p) in item_side for p in with_gradient) is not held
        in_optimizer = {id(p) for group in LLMTrainer(config, model).optimizer.param_groups for p in group["params"]}
        assert (item_side <= in_optimizer) is not held and not (held and item_side & in_optimizer)
        if held:  # what clipping measures (parameters without a gradient are skipped) is the user side alone
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
            user_side = [p.grad for p in model.parameters() if id(p) in in_optimizer and p.grad is not None]
            assert torch.allclose(norm, torch.linalg.vector_norm(torch.stack([g.norm() for g in user_side])))


@pytest.fixture
def paper_laser(tiny_data, tiny_llama_dir):
    return _setup(tiny_data, tiny_llama_dir, scoring="paper")


def _item_vectors(model):
    """Every item's vector with the item side live (as phase 1 computes it)."""
    model.train()
    model.item_side_held = False
    with torch.no_grad():
        return model.item_representations()


def test_paper_items_are_the_llm_over_their_title_and_the_item_suffix(paper_laser):
    """scoring paper: items are the frozen LLM over [title | item suffix], pooled and mapped by their own
    projection; an item's vector moves when the item suffix moves (every item) and when its title changes (that
    item alone); the cached title keys/values and a full pass give the same vectors.

    Caught: the item suffix left out of the item pass (zeroed); the title cache of another chunk used."""
    from recbole_llm.model.laser import ItemTitles

    _, model, _, _, _ = paper_laser
    assert model.item_repr == "suffix" and {n.split(".")[0] for n, _ in _named(model.item_side_parameters(), model)} \
        == {"item_suffix", "item_projection"}
    before = _item_vectors(model)
    assert before.shape == (model.n_items, model.id_model.item_embedding.embedding_dim)
    with torch.no_grad():
        model.item_suffix.add_(0.5)
    moved = _item_vectors(model)
    assert not torch.isclose(moved[1:], before[1:], atol=1e-4).all(dim=1).any()  # every item moved
    with torch.no_grad():
        model.item_suffix.sub_(0.5)

    titles = list(model.prompt.titles)
    changed_item = 3
    titles[changed_item] = titles[changed_item + 1]
    original = model.item_titles
    model.item_titles = ItemTitles(model.llm, titles, model.pad_token_id, batch_size=4)  # several chunks
    retitled = _item_vectors(model)
    differs = ~torch.isclose(retitled, before, atol=1e-4).all(dim=1)
    assert differs.nonzero().flatten().tolist() == [changed_item]

    model.item_titles = ItemTitles(model.llm, model.prompt.titles, model.pad_token_id, batch_size=4, cache=False)
    uncached = _item_vectors(model)
    model.item_titles = original
    assert torch.allclose(uncached, before, atol=1e-4)


def _named(parameters, model):
    wanted = {id(p) for p in parameters}
    return [(name, p) for name, p in model.named_parameters() if id(p) in wanted]


def test_phase_one_fits_the_item_side_to_the_models_own_user_vectors(paper_laser, tiny_data, tiny_llama_dir):
    """Phase 1 trains only the item side, against the held user side's own vectors: the mapped suffix output
    under scoring paper (not SASRec's, which paper scoring never scores with), SASRec's under residual; a held
    item side is computed once and then reused, and recomputed when its weights change.

    Caught: phase 1 on SASRec's user vectors under paper scoring (the old code; that checkpoint validated at
    0.0018 on ml-100k); the held item cache not refreshed after an optimizer step."""
    from recbole_llm.trainer.laser import LaserTrainer

    config, model, train, _, _ = paper_laser
    rows = first_batch(train)[:8]
    seq, length = rows["item_id_list"], rows["item_length"]
    model.eval()
    with torch.no_grad():
        own = model.forward(seq, length)[0]
        sasrec = model.id_encodings(seq, length)[2]
    assert torch.allclose(model.phase_one_users(seq, length), own) and not torch.allclose(own, sasrec)

    before = model.trainable_state_dict()
    calls = []
    handle = model.item_titles.decoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    config["item_phase_rows"], config["item_phase_batch_size"] = 24, 8
    LaserTrainer(config, model).item_phase(train, 1)
    assert _changed(before, model) == {"item_suffix", "item_projection.weight", "item_projection.bias"}
    model.eval()
    calls.clear()
    first = model.item_representations()
    again = model.item_representations()
    assert calls and first is not None and torch.equal(first, again)
    passes = len(calls)
    model.item_representations()
    assert len(calls) == passes  # held and unchanged: no new LLM pass
    with torch.no_grad():
        model.item_projection.bias.add_(1.0)
    assert not torch.equal(model.item_representations(), first)
    handle.remove()

    _, residual, _, _, _ = _setup(tiny_data, tiny_llama_dir, scoring="residual")
    residual.eval()
    assert torch.allclose(residual.phase_one_users(seq, length), residual.id_encodings(seq, length)[2])
