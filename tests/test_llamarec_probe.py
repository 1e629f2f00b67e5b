"""benchmarks/llamarec_probe.py: the copy task's lists, its held-out check, and one run as a record
that a later call with the same settings reuses."""
import json
import random
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import llamarec_probe

    return llamarec_probe


def test_the_answer_is_the_last_history_item_among_items_outside_the_history(probe):
    from recbole_llm.model.llamarec import LlamaRec

    model = SimpleNamespace(k=5, n_items=12, exclude_history=True)
    model._random_items = partial(LlamaRec._random_items, model)
    history = [3, 7, 9]
    for seed in range(20):
        candidates, answer = probe.copy_list(model, history, random.Random(seed))
        assert len(set(candidates)) == model.k and candidates[answer] == 9
        assert not {0, 3, 7} & set(candidates) and all(0 < item < model.n_items for item in candidates)
    assert len({probe.copy_list(model, history, random.Random(seed))[1] for seed in range(20)}) > 1  # shuffled


def test_the_check_ranks_the_answer_among_the_candidates(probe):
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.5], [0.1, 0.2, 0.3]])
    model = SimpleNamespace(ranker_scores=lambda histories, candidates: scores, eval=lambda: None, train=lambda: None)
    result = probe.check(model, ([[1]] * 3, torch.zeros(3, 3, dtype=torch.long), [1, 2, 2]))
    assert result["top1"] == pytest.approx(2 / 3)  # ranks 1, 2, 1
    assert result["mrr"] == pytest.approx((1 + 1 / 2 + 1) / 3)


def test_a_probe_run_is_a_record_that_a_later_call_reuses(probe, tiny_data, tiny_llama_dir, tmp_path, monkeypatch):
    name, overrides = tiny_data
    settings = {**overrides, "llm_path": str(tiny_llama_dir), "candidate_k": 5, "retriever_config": {"epochs": 1}}
    argv = ["--dataset", name, "--steps", "3", "--check_every", "2", "--check_rows", "4",
            "--records", str(tmp_path / "records"), "--results", str(tmp_path / "RESULTS.md"),
            *(f"--{key}={json.dumps(value)}" for key, value in settings.items())]
    probe.main(argv)
    [path] = (tmp_path / "records" / name).glob("*.json")
    record = json.loads(path.read_text())
    assert [c["step"] for c in record["numbers"]["checks"]] == [0, 2, 3]
    assert all(0 <= c["top1"] <= 1 for c in record["numbers"]["checks"])
    assert record["numbers"]["checks"][1]["letter_loss"] > 0

    monkeypatch.setattr(probe, "probe", lambda *a, **k: pytest.fail("the record should have been reused"))
    probe.main(argv)
    section = (tmp_path / "RESULTS.md").read_text()
    assert "copy probe" in section and "| 3 |" in section
