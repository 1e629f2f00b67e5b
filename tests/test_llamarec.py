"""LlamaRec: verbalizer, prompts, two-stage scores, frozen LLM, adapters, bad input."""
import re

import pytest
import torch
from recbole.data import create_dataset, data_preparation

from recbole_llm import load_config
from recbole_llm.llm.prompts import RankingPrompt
from recbole_llm.llm.verbalizer import LetterVerbalizer
from recbole_llm.model.llamarec import LlamaRec, recent_items, two_stage_scores
from recbole_llm.trainer.two_stage import LlamaRecTrainer, SubsetNDCG
from conftest import first_batch

K = 5


def _randomise_lora(model):
    """LoRA's B matrices drawn at random (they start at zero), so the adapter changes the scores."""
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def test_verbalizer_reads_the_ids_that_training_targets(embedded_tokenizer):
    """For every letter A..T of the real embedded tokenizer: the id the verbalizer reads is
    the token that follows the prompt when prompt + letter is tokenized as one text."""
    verbalizer = LetterVerbalizer(embedded_tokenizer, 20)
    prompt = RankingPrompt().build(["Heat (1995)", "Fargo (1996)"], [f"Movie {i}" for i in range(20)], verbalizer.letters)
    prompt_ids = embedded_tokenizer(prompt)["input_ids"]
    for index, letter in enumerate(verbalizer.letters):
        joint = embedded_tokenizer(prompt + letter)["input_ids"]
        assert joint == prompt_ids + [int(verbalizer.letter_ids[index])], letter
        assert verbalizer.answer_ids(index) == [int(verbalizer.letter_ids[index]), embedded_tokenizer.eos_token_id]


def test_candidate_count_above_the_letters_is_an_error(embedded_tokenizer):
    with pytest.raises(ValueError, match="candidate_k=27"):
        LetterVerbalizer(embedded_tokenizer, 27)


def test_prompt_lists_candidates_in_letter_order():
    titles = [f"Title {i}" for i in range(20)]
    letters = [chr(ord("A") + i) for i in range(20)]
    prompt = RankingPrompt(history_len=3).build([f"H{i}" for i in range(10)], titles, letters)
    assert re.findall(r"\(([A-T])\) (Title \d+)", prompt) == list(zip(letters, titles))
    assert re.findall(r"\((\d+)\) (H\d)", prompt) == [("1", "H7"), ("2", "H8"), ("3", "H9")]
    assert prompt.endswith("### Response:\n")


def test_two_stage_scores_keep_candidates_above_the_rest():
    torch.manual_seed(0)
    retrieval = torch.randn(4, 50) * 10
    candidates = torch.stack([torch.randperm(49)[:K] + 1 for _ in range(4)])
    ranker = torch.randn(4, K)
    scores = two_stage_scores(retrieval, candidates, ranker)
    for row in range(4):
        is_candidate = torch.zeros(50, dtype=torch.bool)
        is_candidate[candidates[row]] = True
        assert scores[row, is_candidate].min() > scores[row, ~is_candidate].max()
        assert torch.equal(scores[row, candidates[row]].argsort(), ranker[row].argsort())  # ranker's order
        rest = (~is_candidate).nonzero().squeeze(1)
        assert torch.equal(scores[row, rest].argsort(), retrieval[row, rest].argsort())  # retriever's order


def test_recent_items_keeps_the_last_n_right_padded():
    seq = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]])
    kept, length = recent_items(seq, torch.tensor([5, 2]), 3)
    assert kept.tolist() == [[3, 4, 5], [6, 7, 0]] and length.tolist() == [3, 2]


@pytest.fixture
def llamarec(tiny_data, tiny_llama_dir):
    name, overrides = tiny_data
    overrides = {**overrides, "llm_path": str(tiny_llama_dir), "candidate_k": K, "retriever_config": {"epochs": 1},
                 "ranker_max_train_examples": 8, "ranker_eval_step": 2, "ranker_valid_users": 8}
    config = load_config("LlamaRec", name, config_dict=overrides)
    train, valid, test = data_preparation(config, create_dataset(config))
    return config, LlamaRec(config, train._dataset), (train, valid, test)




def test_full_sort_predict_lifts_the_retrievers_top_k(llamarec):
    _, model, (_, _, test) = llamarec
    model.eval()
    interaction = first_batch(test)
    scores = model.full_sort_predict(interaction)
    assert scores.shape == (len(interaction), model.n_items)
    retrieval = model.retrieval_scores(interaction)
    candidates = model.top_candidates(retrieval, model.history_mask(interaction))
    top = scores.topk(K, dim=1).indices
    assert torch.equal(top.sort(1).values, candidates.sort(1).values)


def test_training_moves_only_the_adapter(llamarec):
    config, model, (train, valid, _) = llamarec
    base = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora" not in n}
    retriever = {n: p.detach().clone() for n, p in model.retriever.named_parameters()}
    lora_b = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_B" in n}
    trainer = LlamaRecTrainer(config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    assert all(torch.equal(p, base[n]) for n, p in model.llm.named_parameters() if n in base)
    assert all(torch.equal(p, retriever[n]) for n, p in model.retriever.named_parameters())
    assert any(not torch.equal(p, lora_b[n]) for n, p in model.llm.named_parameters() if n in lora_b)
    assert set(model.trainable_state_dict()) == {n for n, p in model.named_parameters() if "lora" in n}


def test_adapter_round_trip_gives_identical_scores(llamarec, tmp_path):
    config, model, (train, _, test) = llamarec
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.eval()
    interaction = first_batch(test)
    expected = model.full_sort_predict(interaction)
    model.save_pretrained(tmp_path / "adapter")
    other = LlamaRec(config, train._dataset)
    other.eval()
    other.load_pretrained(tmp_path / "adapter")
    assert torch.allclose(other.full_sort_predict(interaction), expected, atol=1e-5)
    config["ranker_adapter"] = str(tmp_path / "adapter")
    from_peft = LlamaRec(config, train._dataset)
    from_peft.eval()
    assert torch.allclose(from_peft.full_sort_predict(interaction), expected, atol=1e-5)


def test_padding_does_not_change_ranker_scores(llamarec):
    _, model, _ = llamarec
    model.eval()
    candidates = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    histories = [[11, 12, 13, 14, 15, 16], [17]]  # different prompt lengths: one is left-padded
    together = model.ranker_scores(histories, candidates)
    alone = torch.cat([model.ranker_scores([h], c.unsqueeze(0)) for h, c in zip(histories, candidates)])
    assert torch.allclose(together, alone, atol=1e-4)


def test_one_item_history(llamarec):
    _, model, _ = llamarec
    candidates, index = model.training_candidates([3], target=4)
    assert len(candidates) == K and candidates[index] == 4 and 3 not in candidates and 0 not in candidates
    model.eval()
    scores = model.ranker_scores([[3]], torch.tensor([candidates]))
    assert scores.shape == (1, K) and torch.isfinite(scores).all()


def test_candidate_cache_follows_the_retriever(llamarec):
    config, model, (_, valid, _) = llamarec
    trainer = LlamaRecTrainer(config, model)
    first = trainer._candidates(valid, show_progress=False)
    again = trainer._candidates(valid, show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.candidates, again.candidates))
    assert len(list(trainer.cache_dir.glob("candidates-*.pt"))) == 1
    with torch.no_grad():
        model.retriever.item_embedding.weight.add_(1.0)  # a changed retriever is a changed input
    trainer._candidates(valid, show_progress=False)
    assert len(list(trainer.cache_dir.glob("candidates-*.pt"))) == 2


def test_dataset_without_text_fields_names_them(tiny_data, tiny_llama_dir):
    name, overrides = tiny_data
    overrides = {**overrides, "llm_path": str(tiny_llama_dir), "candidate_k": K, "retriever_config": {"epochs": 1},
                 "item_text_fields": ["plot"]}
    config = load_config("LlamaRec", name, config_dict=overrides)
    train, _, _ = data_preparation(config, create_dataset(config))
    with pytest.raises(ValueError) as err:
        LlamaRec(config, train._dataset)
    assert "item_text_fields" in str(err.value) and "movie_title" in str(err.value)


def test_missing_llm_path_says_what_was_tried(tiny_data):
    name, overrides = tiny_data
    overrides = {**overrides, "llm_path": "./no/such/model", "retriever_config": {"epochs": 1}}
    config = load_config("LlamaRec", name, config_dict=overrides)
    train, _, _ = data_preparation(config, create_dataset(config))
    with pytest.raises(FileNotFoundError, match="llm_path"):
        LlamaRec(config, train._dataset)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluation_ranks_only_rows_with_the_target_among_candidates(llamarec, split):
    """Validation and test send to the LLM only the users whose target is a candidate; the metrics
    are those of scoring every user (the others' target sits below all k candidates either way)."""
    config, model, (_, valid, test) = llamarec
    data = {"valid": valid, "test": test}[split]
    _randomise_lora(model)  # a ranker whose order differs from the retriever's
    model.fusion_weight = 0.0
    trainer = LlamaRecTrainer(config, model)
    ranked = trainer.evaluate(data, load_best_model=False)
    phase = trainer._phase(data)
    candidates, targets = phase.flat("candidates"), phase.flat("targets")
    hits = int((candidates == targets.unsqueeze(1)).any(1).sum())
    assert trainer.ranked_rows == hits < phase.rows

    histories = [h for batch in phase.histories for h in batch]
    with torch.no_grad():
        every_row = model.ranker_scores(histories, candidates).float()
    phase.ranker = list(every_row.split([len(t) for t in phase.targets]))
    assert trainer.evaluate(data, load_best_model=False) == ranked


def _history_first_retriever(model, monkeypatch):
    """Make the retriever score every history item above all other items."""
    original = model.retrieval_scores

    def scores(interaction):
        return original(interaction) + 1000.0 * model.history_mask(interaction).float()

    monkeypatch.setattr(model, "retrieval_scores", scores)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluation_candidates_exclude_the_history(llamarec, monkeypatch, split):
    """The trainer's cached candidates (validation and test) and ``full_sort_predict`` leave out
    every item of the row's history, even when the retriever ranks the history first."""
    config, model, (_, valid, test) = llamarec
    loader = {"valid": valid, "test": test}[split]
    _history_first_retriever(model, monkeypatch)
    phase = LlamaRecTrainer(config, model)._phase(loader)
    histories = [h for batch in phase.histories for h in batch]
    assert sum(len(h) for h in histories) > 0
    for history, candidates in zip(histories, phase.flat("candidates").tolist()):
        assert not set(history) & set(candidates)
    model.eval()
    interaction = first_batch(loader)
    top = model.full_sort_predict(interaction).topk(K, dim=1).indices
    for history, candidates in zip(model._histories(interaction), top.tolist()):
        assert not set(history) & set(candidates)


def test_exclude_history_false_allows_repeats(llamarec, monkeypatch):
    config, model, (_, valid, _) = llamarec
    model.exclude_history = False
    _history_first_retriever(model, monkeypatch)
    phase = LlamaRecTrainer(config, model)._phase(valid)
    histories = [h for batch in phase.histories for h in batch]
    repeats = sum(bool(set(h) & set(c)) for h, c in zip(histories, phase.flat("candidates").tolist()))
    assert repeats == len(histories)  # the history items the retriever put first stay candidates
    random_draws = [model.training_candidates(list(range(1, 20)), target=25)[0] for _ in range(20)]
    assert any(set(c) & set(range(1, 20)) for c in random_draws)


def test_evaluation_phases_are_keyed_by_the_loaders_content(llamarec):
    """A second loader over the same rows shares the first one's candidates (no second retrieval);
    another split gets its own; a batch that is not the one the candidates were computed for is an
    error, not a silent mismatch."""
    from recbole.data.dataloader import FullSortEvalDataLoader

    config, model, (_, valid, test) = llamarec
    trainer = LlamaRecTrainer(config, model)
    phase = trainer._phase(valid)
    twin = FullSortEvalDataLoader(config, valid._dataset, valid._sampler)
    assert twin is not valid and trainer._phase(twin) is phase
    assert trainer._phase(test) is not phase and len(trainer._phases) == 2
    trainer._active, trainer._batch_pos = trainer._phase(test), 0
    with pytest.raises(RuntimeError, match="evaluation batches differ"):
        trainer._full_sort_batch_eval(next(iter(valid)))


def test_loss_supervises_the_logits_that_inference_reads(llamarec, monkeypatch):
    """calculate_loss is the mean cross-entropy of (a) the logit row the verbalizer reads at
    inference, against the true letter, and (b) the next row, against EOS; checked per row on
    a batch of prompts with different lengths (left padding)."""
    _, model, (train, _, _) = llamarec
    model.eval()  # no LoRA dropout: the two computations must agree exactly
    _randomise_lora(model)
    histories, targets = [[3, 4, 5, 6, 7, 8], [9]], [12, 13]
    chosen = {12: ([12, 1, 2, 20, 21], 0), 13: ([1, 2, 13, 20, 21], 2)}
    monkeypatch.setattr(model, "training_candidates", lambda history, target: chosen[target])
    seq = torch.zeros(2, model.max_seq_length, dtype=torch.long)
    for row, history in enumerate(histories):
        seq[row, : len(history)] = torch.tensor(history)
    from recbole.data.interaction import Interaction

    batch = Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: torch.tensor([6, 1]),
                         model.POS_ITEM_ID: torch.tensor(targets), model.USER_ID: torch.tensor([1, 2])})
    loss = model.calculate_loss(batch)
    expected = []
    for history, target in zip(histories, targets):
        candidates, index = chosen[target]
        prompt = model._prompt_ids(history, candidates)
        answer = model.verbalizer.answer_ids(index)
        with torch.no_grad():
            logits = model.llm(input_ids=torch.tensor([prompt + answer])).logits[0].float()
            read = model.ranker_scores([history], torch.tensor([candidates]))[0]
        letter_row, eos_row = logits[len(prompt) - 1], logits[len(prompt)]
        assert torch.allclose(read, letter_row[model.verbalizer.letter_ids], atol=1e-4)  # inference reads this row
        expected += [torch.nn.functional.cross_entropy(letter_row, torch.tensor(answer[0])),
                     torch.nn.functional.cross_entropy(eos_row, torch.tensor(answer[1]))]
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-4)
    # the letter's part, which the trainer logs next to ln(k): the rows' letter cross-entropies
    assert torch.allclose(model.letter_loss, torch.stack(expected[::2]).mean(), atol=1e-4)


def test_ranker_training_stops_after_validations_without_improvement(llamarec, monkeypatch):
    """Validation NDCG falls after the first check: with ranker_stopping_step 2 training stops at
    the third validation (not the eighth the example budget allows) and keeps the first adapter."""
    config, model, (train, valid, _) = llamarec
    steps = 8  # the example budget: 8 steps of one training batch, a validation after each
    config["ranker_max_train_examples"] = steps * train.step
    config["ranker_eval_step"], config["ranker_stopping_step"] = 1, 2
    trainer = LlamaRecTrainer(config, model)
    curve, snapshots = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01]), []

    def validation_ndcg(phase):
        snapshots.append({n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_B" in n})
        return SubsetNDCG(next(curve), 0.0, 8)

    monkeypatch.setattr(trainer, "_validation_ndcg", validation_ndcg)
    trainer._train_ranker(train, trainer._phase(valid), show_progress=False)
    assert len(snapshots) == 3 and trainer.cur_step == 1
    best = snapshots[0]
    assert all(torch.equal(p, best[n]) for n, p in model.llm.named_parameters() if n in best)


def test_ranker_learning_rate_warms_up_then_falls_in_a_straight_line_to_zero(llamarec, monkeypatch):
    """The ranker's schedule (the shared ``lr_factor``, its ``linear`` decay): 6 steps, 2 of warm-up."""
    config, model, (train, valid, _) = llamarec
    config["ranker_max_train_examples"], config["ranker_warmup_steps"] = 6 * train.step, 2
    config["ranker_eval_step"], config["ranker_stopping_step"] = 6, 0  # one validation, no early stop
    trainer = LlamaRecTrainer(config, model)
    monkeypatch.setattr(trainer, "_validation_ndcg", lambda phase: SubsetNDCG(0.5, 0.0, 8))
    used = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, *_: used.append(optimizer.param_groups[0]["lr"]))
    trainer._train_ranker(train, trainer._phase(valid), show_progress=False)
    lr = config["learning_rate"]
    assert used == pytest.approx([lr * f for f in (0.5, 1.0, 1.0, 0.75, 0.5, 0.25)])


@pytest.mark.parametrize("peak, chosen, tried", [(16.0, 16.0, [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]),
                                                  (1.0, 1.0, [0.0, 0.5, 1.0, 2.0, 4.0])])
def test_fusion_search_brackets_the_best_weight(llamarec, monkeypatch, peak, chosen, tried):
    """The grid is extended by doubling its largest weight while that weight is the best, so the
    chosen weight has a worse neighbour on each side."""
    import math

    config, model, (_, valid, _) = llamarec
    config["fusion_weights"] = [0.0, 0.5, 1.0, 2.0, 4.0]
    trainer = LlamaRecTrainer(config, model)
    seen = []

    def evaluate(data, load_best_model=True, **kwargs):
        seen.append(model.fusion_weight)
        return {"ndcg@10": 1.0 - abs(math.log2(model.fusion_weight + 1e-3) - math.log2(peak)) / 20}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    results = trainer._fusion_curve(valid)
    assert seen == tried and trainer._best_weight(results) == chosen


def test_shared_prompt_prefix_gives_the_same_scores_loss_and_gradients(llamarec, monkeypatch):
    """The instruction every prompt starts with runs once per batch: scores, training loss and
    LoRA gradients equal those of feeding every whole prompt."""
    import recbole_llm.model.llamarec as module
    from recbole.data.interaction import Interaction

    _, model, _ = llamarec
    _randomise_lora(model)
    shared_lengths = []
    real = module.forward_shared_prefix
    monkeypatch.setattr(module, "forward_shared_prefix", lambda m, prefix, *a, **k: (
        shared_lengths.append(prefix["input_ids"].size(1)), real(m, prefix, *a, **k))[1])
    candidates = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 2, 13, 4, 15]])
    histories = [[11, 12, 13, 14, 15, 16], [17], [20, 21]]
    seq = torch.zeros(3, model.max_seq_length, dtype=torch.long)
    for row, history in enumerate(histories):
        seq[row, : len(history)] = torch.tensor(history)
    batch = Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: torch.tensor([6, 1, 2]),
                         model.POS_ITEM_ID: torch.tensor([25, 26, 27]), model.USER_ID: torch.tensor([1, 2, 3])})
    outcomes = {}
    for share in (True, False):
        model.share_prompt_prefix = share
        model.eval()
        scores = model.ranker_scores(histories, candidates)
        random_state = __import__("random").getstate()
        __import__("random").seed(0)  # the same training candidates for both runs
        loss = model.calculate_loss(batch)
        __import__("random").setstate(random_state)
        model.llm.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.llm.named_parameters() if p.requires_grad}
        outcomes[share] = (scores, loss.detach(), grads)
    assert shared_lengths and min(shared_lengths) > 10  # the instruction's tokens were shared
    (s1, l1, g1), (s0, l0, g0) = outcomes[True], outcomes[False]
    assert torch.allclose(s1, s0, atol=1e-4) and torch.allclose(l1, l0, atol=1e-5)
    assert all(torch.allclose(g1[n], g0[n], atol=1e-5) for n in g0) and any(g0[n].abs().sum() > 0 for n in g0)


def test_fair_base_of_the_slices_benchmark_is_the_retriever_without_history(llamarec, monkeypatch):
    """benchmarks/slices.py compares LlamaRec with its retriever minus the user's history: the top-k are
    LlamaRec's own candidates (never a history item, even when the retriever ranks history first), in
    the retriever's order."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import slices

    _, model, (_, _, test) = llamarec
    model.eval()
    _history_first_retriever(model, monkeypatch)
    interaction = first_batch(test)
    scores = slices.RetrieverWithoutHistory(model).full_sort_predict(interaction)
    retrieval = model.retrieval_scores(interaction)
    expected = model.top_candidates(retrieval, model.history_mask(interaction))  # in retrieval order
    assert torch.equal(scores.topk(K, dim=1).indices, expected)
    for history, top in zip(model._histories(interaction), scores.topk(K, dim=1).indices.tolist()):
        assert history and not set(history) & set(top)


def _whole_histories(config) -> dict[int, list[int]]:
    """Each user's items in time order (internal ids), from the atomic files."""
    inter = create_dataset(config).inter_feat
    rows = sorted(zip(inter["user_id"].tolist(), inter["timestamp"].tolist(), inter["item_id"].tolist()))
    histories = {}
    for user, _, item in rows:
        histories.setdefault(user, []).append(item)
    return histories


def test_candidates_exclude_history_older_than_the_window(llamarec, monkeypatch):
    """Test users have 11 items before their target and the window keeps 8: the 3 oldest are
    excluded too (evaluation candidates), even when the retriever ranks the whole history first."""
    config, model, (_, _, test) = llamarec
    histories = _whole_histories(config)
    interaction = first_batch(test)
    users = interaction[model.USER_ID].tolist()
    assert all(len(histories[user]) - 1 > model.max_seq_length for user in users)

    def history_first(batch):
        scores = torch.zeros(len(batch), model.n_items)
        for row, user in enumerate(batch[model.USER_ID].tolist()):
            scores[row, histories[user][:-1]] = 1000.0
        return scores

    monkeypatch.setattr(model, "retrieval_scores", history_first)
    model.eval()
    top = model.full_sort_predict(interaction).topk(K, dim=1).indices
    for user, candidates in zip(users, top.tolist()):
        assert not set(histories[user][:-1]) & set(candidates), user


def test_training_negatives_avoid_history_older_than_the_window(llamarec, monkeypatch):
    """A training prefix longer than the window: its negatives are drawn outside every item before
    its target (as the authors), not only the window's."""
    config, model, _ = llamarec
    from recbole.data.interaction import Interaction

    histories = _whole_histories(config)
    user = next(iter(histories))
    sequence = histories[user]
    target_at = model.max_seq_length + 1  # the last training target: 9 items before it, 8 in the window
    window = sequence[target_at - model.max_seq_length:target_at]
    excluded = []

    def record(history, target):
        excluded.append(set(history))
        return [target] + [i for i in range(1, model.n_items) if i != target][:K - 1], 0

    monkeypatch.setattr(model, "training_candidates", record)
    batch = Interaction({model.ITEM_SEQ: torch.tensor([window]), model.ITEM_SEQ_LEN: torch.tensor([len(window)]),
                         model.POS_ITEM_ID: torch.tensor([sequence[target_at]]), model.USER_ID: torch.tensor([user])})
    model.calculate_loss(batch)
    assert excluded == [set(sequence[:target_at])]
    draws = [LlamaRec.training_candidates(model, set(sequence[:target_at]), sequence[target_at])[0] for _ in range(30)]
    assert not any(sequence[0] in draw for draw in draws)  # the one item older than the window


def test_scores_after_ranker_training_are_computed_in_eval_mode(llamarec):
    """The validation scores that pick the fusion weight do not depend on the mode training left
    the model in (LoRA dropout is off while scoring)."""
    config, model, (_, valid, _) = llamarec
    _randomise_lora(model)
    trainer = LlamaRecTrainer(config, model)
    phase = trainer._phase(valid)
    scores = []
    for mode in (True, False):
        model.train(mode)
        torch.manual_seed(0)
        phase.ranker = None
        trainer._score_phase(phase, show_progress=False)
        scores.append(torch.cat(phase.ranker))
    assert scores[0].abs().sum() > 0 and torch.equal(scores[0], scores[1])


def test_distributed_validation_reduces_on_the_models_device(llamarec, monkeypatch):
    """The validation NDCG of the ranks is summed by a collective on the trainer's device (NCCL
    needs GPU tensors); a fake collective records the device (``meta`` stands in for a GPU)."""
    import recbole_llm.distributed as distributed

    config, model, (_, valid, _) = llamarec
    trainer = LlamaRecTrainer(config, model)
    phase = trainer._phase(valid)
    trainer.world_size, trainer.device = 2, torch.device("meta")
    devices = []

    class Reduced(Exception):
        pass

    def all_reduce(tensor):
        devices.append(tensor.device)
        raise Reduced

    monkeypatch.setattr(distributed, "world_size", lambda config: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        trainer._validation_ndcg(phase)
    assert devices == [torch.device("meta")]


def test_retriever_is_selected_on_recall_and_the_ranker_on_ndcg(tiny_data):
    from recbole_llm.model.pretrained import id_model_config

    name, overrides = tiny_data
    config = load_config("LlamaRec", name, config_dict=overrides)  # the property files' retriever_config
    stage1 = id_model_config(config, config["retriever"], config["retriever_config"])
    assert (stage1["valid_metric"], config["valid_metric"]) == ("Recall@10", "NDCG@10")


def test_micro_batches_give_the_gradient_of_the_whole_batch(llamarec):
    """Ranker training runs ``ranker_micro_batch_size`` prompts per backward pass: the loss and the
    adapter's gradient are those of the whole batch (uneven micro-batches weighted by their size).
    Breakage checked by hand (caught): each micro-batch's loss weighted 1 / number of micro-batches."""
    import random

    config, model, (train, _, _) = llamarec
    model.eval()  # no LoRA dropout: the passes must agree
    _randomise_lora(model)
    trainer = LlamaRecTrainer(config, model)
    batch = first_batch(train)[:4]
    trainable = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for micro in (4, 3, 1):
        trainer.micro_batch = micro
        model.zero_grad()
        random.seed(0)  # the same negatives for every split
        loss, letter = trainer._backward_in_micro_batches(batch)
        results[micro] = (loss, [p.grad.clone() for p in trainable], letter)
    for micro in (3, 1):
        torch.testing.assert_close(results[micro][0], results[4][0])
        torch.testing.assert_close(results[micro][2], results[4][2])  # the letter's part, weighted the same way
        for split, whole in zip(results[micro][1], results[4][1]):
            torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-4)


# ----- training lists drawn from the retriever (ranker_train_candidates) -------------------------
def _training_rows(train):
    """Every training row of the tiny data (360 prefixes), as RecBole's loader gives them."""
    return list(train)


def _rigged_retriever(model, monkeypatch, histories):
    """A retriever with distinct random scores that ranks each row's whole history (also the items
    older than the window) first; the target of every second user (by id) third among the other
    items, every other user's target last of all."""
    def scores(interaction):
        out = torch.rand(len(interaction), model.n_items, generator=torch.Generator().manual_seed(0))
        for row, (user, target) in enumerate(zip(interaction[model.USER_ID].tolist(),
                                                 interaction[model.POS_ITEM_ID].tolist())):
            before = histories[user][:histories[user].index(target)]
            out[row, before] += 1000.0
            if user % 2:
                others = out[row].clone()
                others[[0, target, *before]] = -1.0
                second, third = others.topk(3).values[1:].tolist()
                out[row, target] = (second + third) / 2
            else:
                out[row, target] = -5.0
        return out

    monkeypatch.setattr(model, "retrieval_scores", scores)
    return scores


def _retriever_order(scores_row, excluded):
    return [i for i in scores_row.argsort(descending=True).tolist() if i not in excluded and i != 0]


@pytest.mark.parametrize("position", ["retriever", "random"])
def test_retriever_training_lists_are_its_top_k_with_the_target_once(llamarec, monkeypatch, position):
    """ranker_train_candidates=retriever: a training list is the retriever's top-k without any item
    before the target (also those older than the window), in its order; a target it proposed stays
    where it ranks it, one it did not replaces the k-th item and goes last (position retriever) or
    anywhere (position random), the other items keeping their order."""
    config, model, (train, _, _) = llamarec
    histories = _whole_histories(config)
    scores = _rigged_retriever(model, monkeypatch, histories)
    model.train_candidates, model.target_position = "retriever", position
    positions, beyond_window = set(), 0
    for batch in _training_rows(train):
        retrieval = scores(batch)
        lists = model.training_lists(batch)
        rows = zip(batch[model.USER_ID].tolist(), batch[model.POS_ITEM_ID].tolist(), retrieval, lists)
        for user, target, row_scores, (candidates, index) in rows:
            before = set(histories[user][:histories[user].index(target)])
            beyond_window += len(before) > model.max_seq_length
            top = _retriever_order(row_scores, before)[:K]
            assert candidates.count(target) == 1 and candidates[index] == target and len(candidates) == K
            assert not before & set(candidates)
            if user % 2:  # proposed, third: the list is the top-k as it stands
                assert candidates == top and index == 2
            else:
                assert [c for c in candidates if c != target] == top[:K - 1]
                positions.add(index)
    assert beyond_window > 0
    assert positions == {K - 1} if position == "retriever" else len(positions) > 1


def test_shuffled_retriever_training_lists_hide_the_retrievers_order(llamarec, monkeypatch):
    """ranker_train_target_position=shuffle: the same items as the retriever's list, the target once, in
    a shuffled order: a target the retriever ranks third is not always third.
    Breakage checked by hand (caught): shuffle treated as random (proposed targets kept their rank)."""
    config, model, (train, _, _) = llamarec
    histories = _whole_histories(config)
    scores = _rigged_retriever(model, monkeypatch, histories)
    model.train_candidates, model.target_position = "retriever", "shuffle"
    proposed_positions, orders_differ = set(), 0
    for batch in _training_rows(train):
        retrieval = scores(batch)
        rows = zip(batch[model.USER_ID].tolist(), batch[model.POS_ITEM_ID].tolist(), retrieval,
                   model.training_lists(batch))
        for user, target, row_scores, (candidates, index) in rows:
            before = set(histories[user][:histories[user].index(target)])
            top = _retriever_order(row_scores, before)[:K]
            assert candidates.count(target) == 1 and candidates[index] == target and len(candidates) == K
            if user % 2:  # proposed, third in the retriever's order
                assert sorted(candidates) == sorted(top)
                proposed_positions.add(index)
                orders_differ += candidates != top
    assert len(proposed_positions) > 1 and orders_differ > 0


def test_mixed_training_lists_hold_the_retrievers_top_half_and_random_items(llamarec, monkeypatch):
    """ranker_train_candidates=mix: the retriever's top k // 2 (the target in place of the last where
    it is not among them) and random items outside the history, all in the retriever's order."""
    config, model, (train, _, _) = llamarec
    histories = _whole_histories(config)
    scores = _rigged_retriever(model, monkeypatch, histories)
    model.train_candidates, model.target_position = "mix", "retriever"
    batch = _training_rows(train)[0]
    retrieval = scores(batch)
    draws = [model.training_lists(batch) for _ in range(2)]
    rows = zip(batch[model.USER_ID].tolist(), batch[model.POS_ITEM_ID].tolist(), retrieval, *draws)
    for user, target, row_scores, (candidates, index), (again, _) in rows:
        before = set(histories[user][:histories[user].index(target)])
        top = _retriever_order(row_scores, before)[:K // 2]
        proposed = top if target in top else [*top[:-1], target]
        assert candidates.count(target) == 1 and candidates[index] == target and len(candidates) == K
        assert set(proposed) <= set(candidates) and not before & set(candidates)
        assert candidates == sorted(candidates, key=lambda item: -float(row_scores[item]))
    assert any(set(a) != set(b) for (a, _), (b, _) in zip(*draws))  # the other half is random


def test_retriever_proposes_training_lists_in_eval_mode(llamarec):
    """While the ranker trains (LoRA dropout on) the frozen retriever runs without dropout: its
    training lists are its evaluation-mode top-k."""
    _, model, (train, _, _) = llamarec
    model.train_candidates, model.target_position = "retriever", "retriever"
    batch = first_batch(train)
    model.train()
    in_training = model.training_lists(batch)
    model.eval()
    assert in_training == model.training_lists(batch)
    rows = zip(model.retrieval_scores(batch), model._histories(batch), batch[model.USER_ID].tolist(),
               batch[model.POS_ITEM_ID].tolist(), in_training)
    for scores, history, user, target, (candidates, _) in rows:
        top = _retriever_order(scores, model.prior_items(user, history, target))[:K]
        assert [c for c in candidates if c != target] == [c for c in top if c != target][:K - 1]


def test_loss_is_computed_on_the_training_lists(llamarec, monkeypatch):
    """calculate_loss prompts each row with the list training_lists gives it (retriever lists here)."""
    config, model, (train, _, _) = llamarec
    _rigged_retriever(model, monkeypatch, _whole_histories(config))
    model.train_candidates, model.target_position = "retriever", "retriever"
    batch = first_batch(train)[:4]
    prompted, prompt_ids = [], model._prompt_ids
    monkeypatch.setattr(model, "_prompt_ids", lambda history, candidates: (prompted.append(candidates),
                                                                             prompt_ids(history, candidates))[1])
    model.calculate_loss(batch)
    assert prompted == [candidates for candidates, _ in model.training_lists(batch)]


def test_validation_check_gives_the_standard_error_over_its_users(llamarec):
    """Each validation check of ranker training reports the valid-subset NDCG@10 with its standard
    error over the users it ranked (sample standard deviation / sqrt(users)) and their number."""
    import statistics

    config, model, (_, valid, _) = llamarec
    _randomise_lora(model)
    trainer = LlamaRecTrainer(config, model)
    phase = trainer._phase(valid)
    ndcg, se, users = trainer._validation_ndcg(phase)
    candidates, targets = phase.flat("candidates"), phase.flat("targets")
    histories = [h for batch in phase.histories for h in batch]
    rows = [i for i in range(len(targets)) if int(targets[i]) in candidates[i].tolist()][:config["ranker_valid_users"]]
    model.eval()
    scores = model.ranker_scores([histories[i] for i in rows], candidates[rows])
    gains = []
    for row, row_scores in zip(rows, scores.tolist()):
        ranked = [c for _, c in sorted(zip(row_scores, candidates[row].tolist()), key=lambda pair: -pair[0])]
        rank = ranked.index(int(targets[row]))
        gains.append(1 / __import__("math").log2(rank + 2) if rank < 10 else 0.0)
    assert users == len(rows) > 2 and len(set(gains)) > 1
    assert ndcg == pytest.approx(statistics.mean(gains)) and se == pytest.approx(statistics.stdev(gains) / len(gains) ** 0.5)


def test_int8_ranking_uses_a_quantised_copy_of_the_current_adapter(llamarec):
    """``ranker_int8``: eval-mode ranking runs a dynamic-int8 copy with the adapter merged (scores within int8's
    rounding of float32's, not equal), the trained LLM and the checkpoint keep float32 weights, and training
    drops the copy (memory); a checkpoint loaded in eval mode makes a new one. Breakages checked by hand (caught):
    the adapter's fingerprint made constant (a loaded checkpoint ranked with the old copy); the copy kept when
    training resumes; ranking with ``self.llm`` whatever the setting."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    config, model, (train, _, _) = llamarec
    _randomise_lora(model)
    model.eval()
    candidates = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    histories = [[11, 12, 13, 14, 15, 16], [17, 18]]
    full = model.ranker_scores(histories, candidates)
    keys = set(model.state_dict())
    model.int8 = True
    int8 = model.ranker_scores(histories, candidates)
    copy = model.scoring_llm()
    assert copy is not model.llm and any(isinstance(m, Int8Linear) for m in copy.modules())
    assert not any(isinstance(m, Int8Linear) for m in model.llm.modules()) and set(model.state_dict()) == keys
    assert not torch.equal(int8, full) and torch.allclose(int8, full, atol=0.05 * full.abs().max().item())
    assert model.scoring_llm() is copy  # one copy per evaluation
    changed = {name: value + 0.3 for name, value in model.state_dict().items() if "lora_B" in name}
    model.load_state_dict(changed, strict=False)  # a checkpoint loaded in eval mode: a new copy
    model.int8 = False
    loaded = model.ranker_scores(histories, candidates)
    model.int8 = True
    assert not torch.allclose(loaded, full, atol=1e-3)
    assert torch.allclose(model.ranker_scores(histories, candidates), loaded, atol=0.05 * loaded.abs().max().item())
    model.train()
    assert model._int8_llm is None  # not held while training
    assert model.scoring_llm() is model.llm  # training scores (and learns) in float32
    _randomise_lora(model)
    model.eval()
    model.int8 = False
    moved = model.ranker_scores(histories, candidates)
    model.int8 = True
    assert torch.allclose(model.ranker_scores(histories, candidates), moved, atol=0.05 * moved.abs().max().item())


@pytest.mark.parametrize("settings, units, fails", [({"llm_dtype": "float32"}, "AMX", False),
                                                    ({"llm_dtype": "auto"}, None, False),
                                                    ({"llm_dtype": "auto"}, "AMX", True),
                                                    ({"llm_dtype": "bfloat16"}, None, True)])
def test_int8_ranking_needs_a_float32_llm_on_a_cpu(tiny_data, monkeypatch, settings, units, fails):
    from recbole_llm import quick_start
    from recbole_llm.errors import InputError
    from recbole_llm.llm import precision

    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
    name, overrides = tiny_data
    config = load_config("LlamaRec", name, config_dict={**overrides, "ranker_int8": True, **settings})
    if fails:
        with pytest.raises(InputError, match=r"ranker_int8: True ranks with an int8 copy of a float32 LLM on a CPU, "
                                             r"but this run's LLM computes in bfloat16.*set llm_dtype: float32"):
            quick_start.preflight(config)
    else:
        quick_start.preflight(config)
