"""Nothing lost, nothing random: resume after an interruption, same seed -> same metrics (issue 7).

Interruptions are simulated by raising KeyboardInterrupt (what SIGINT does) in the middle of
training; a SIGTERM or a kill stops the process at a point no later than that, and the
resume state is written atomically, so the rerun sees the last complete state either way.
"""
import json

import pytest
from recbole.trainer import Trainer

from recbole_llm import run_recbole_llm
from recbole_llm.knowledge.generator import generate_knowledge
from recbole_llm.knowledge.prompts import KNOWLEDGE_PROMPT
from recbole_llm.knowledge.store import KnowledgeCache
from recbole_llm.model.llamarec import LlamaRec
from recbole_llm.trainer.two_stage import LlamaRecTrainer


def _run(model, tiny_data, checkpoint_dir, **overrides):
    name, config = tiny_data
    config = {**config, "checkpoint_dir": str(checkpoint_dir), **overrides}
    return run_recbole_llm(model, name, config_dict=config)


def _resume_files(checkpoint_dir):
    return sorted(p.name for p in (checkpoint_dir / "resume").glob("*.pth")) if (checkpoint_dir / "resume").exists() else []


LRUREC = {"epochs": 4, "stopping_step": 10}


def test_lrurec_same_seed_same_metrics(tiny_data, tmp_path):
    first = _run("LRURec", tiny_data, tmp_path / "a", **LRUREC)
    second = _run("LRURec", tiny_data, tmp_path / "b", **LRUREC)
    assert first["test_result"] == second["test_result"]
    assert first["best_valid_result"] == second["best_valid_result"]


def test_retriever_training_resumes_after_an_interrupt(tiny_data, tmp_path, monkeypatch, caplog):
    """Interrupted at the start of epoch 2, rerun: epochs 2-3 see the same batches, dropout masks
    and weights as in an uninterrupted run, so their losses and the result are identical."""
    train_epoch, losses = Trainer._train_epoch, []

    def recorded(self, train_data, epoch_idx, *args, **kwargs):
        loss = train_epoch(self, train_data, epoch_idx, *args, **kwargs)
        losses.append((epoch_idx, loss))
        return loss

    monkeypatch.setattr(Trainer, "_train_epoch", recorded)
    reference = _run("LRURec", tiny_data, tmp_path / "reference", **LRUREC)
    reference_losses, losses[:] = list(losses), []

    def interrupted(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx == 2:
            raise KeyboardInterrupt
        return recorded(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run("LRURec", tiny_data, tmp_path / "run", **LRUREC)
    assert len(_resume_files(tmp_path / "run")) == 1
    monkeypatch.setattr(Trainer, "_train_epoch", recorded)

    with caplog.at_level("INFO"):
        resumed = _run("LRURec", tiny_data, tmp_path / "run", **LRUREC)
    assert "resuming LRURec training at epoch 2" in caplog.text
    assert losses == reference_losses  # epochs 0-1 before the interrupt, 2-3 after it
    assert resumed["test_result"] == reference["test_result"]
    assert _resume_files(tmp_path / "run") == []  # a finished run leaves no resume state


def test_resume_false_starts_over(tiny_data, tmp_path, monkeypatch, caplog):
    """Interrupted at epoch 2 (a resume state written), rerun with resume: False: epochs from 0."""
    train_epoch, epochs = Trainer._train_epoch, []

    def interrupted(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx == 2:
            raise KeyboardInterrupt
        return train_epoch(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run("LRURec", tiny_data, tmp_path, **LRUREC)
    assert len(_resume_files(tmp_path)) == 1  # there is a state to resume from

    def recorded(self, train_data, epoch_idx, *args, **kwargs):
        epochs.append(epoch_idx)
        return train_epoch(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_epoch", recorded)
    with caplog.at_level("INFO"):
        _run("LRURec", tiny_data, tmp_path, resume=False, **LRUREC)
    assert "resuming" not in caplog.text
    assert epochs == list(range(LRUREC["epochs"]))


@pytest.fixture
def ranker_settings(tiny_llama_dir):
    return {"llm_path": str(tiny_llama_dir), "candidate_k": 5, "retriever_config": {"epochs": 1},
            "train_batch_size": 4, "ranker_micro_batch_size": 4, "ranker_max_train_examples": 16, "ranker_eval_step": 2,
            "ranker_valid_users": 8, "ranker_warmup_steps": 1, "fusion_weights": [0.0, 1.0]}  # one loss per step


def test_llamarec_same_seed_same_metrics(tiny_data, tmp_path, ranker_settings):
    first = _run("LlamaRec", tiny_data, tmp_path / "a", **ranker_settings)
    second = _run("LlamaRec", tiny_data, tmp_path / "b", **ranker_settings)
    assert first["test_result"] == second["test_result"]


def test_ranker_training_resumes_after_an_interrupt(tiny_data, tmp_path, monkeypatch, caplog, ranker_settings):
    """4 ranker steps, validated (and resumable) every 2: interrupted in step 3, rerun from step 2
    with the same batches, sampled negatives and adapter weights (identical losses)."""
    calculate_loss, losses = LlamaRec.calculate_loss, []

    def recorded(self, interaction):
        loss = calculate_loss(self, interaction)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(LlamaRec, "calculate_loss", recorded)
    trainers, fit = [], LlamaRecTrainer.fit
    monkeypatch.setattr(LlamaRecTrainer, "fit", lambda self, *args, **kwargs: trainers.append(self) or fit(self, *args,
                                                                                                        **kwargs))
    reference = _run("LlamaRec", tiny_data, tmp_path / "reference", **ranker_settings)
    reference_losses, losses[:] = list(losses), []
    assert trainers[-1].ranker_resumed_at is None

    def interrupted(self, interaction):
        if len(losses) == 2:
            raise KeyboardInterrupt
        return recorded(self, interaction)

    monkeypatch.setattr(LlamaRec, "calculate_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run("LlamaRec", tiny_data, tmp_path / "run", **ranker_settings)
    assert any("-ranker-" in name for name in _resume_files(tmp_path / "run"))
    monkeypatch.setattr(LlamaRec, "calculate_loss", recorded)

    with caplog.at_level("INFO"):
        resumed = _run("LlamaRec", tiny_data, tmp_path / "run", **ranker_settings)
    assert "resuming ranker training at step 2 (8 examples)" in caplog.text
    assert trainers[-1].ranker_resumed_at == 2  # what a benchmark's timing of this run must say
    assert "stage 1: LRURec reused" in caplog.text  # the retriever finished before the interrupt: kept
    assert len(reference_losses) == 4 and losses == reference_losses  # steps 1-2, then 3-4 after the rerun
    assert resumed["test_result"] == reference["test_result"]
    assert _resume_files(tmp_path / "run") == []


def test_a_ranker_state_is_resumed_only_in_the_precision_it_trained_in(tiny_data, tmp_path, monkeypatch):
    """A resume state can travel to another CPU (a committed checkpoint folder): with ``llm_dtype: auto`` a CPU
    with bf16 units trains in bfloat16 autocast, one without in float32, and neither continues the other's
    state; a model without an LLM keeps one key. Caught: the precision left out of the resume key."""
    from recbole_llm.config import load_config
    from recbole_llm.llm import precision as llm_precision
    from recbole_llm.trainer.resume import resume_path

    name, settings = tiny_data
    paths = {}
    for units in (None, "AMX"):
        monkeypatch.setattr(llm_precision, "cpu_bf16_units", lambda units=units: units)
        paths[units] = {model: resume_path(load_config(model, name, config_dict={**settings,
                                                                                "checkpoint_dir": str(tmp_path)}), "fit")
                        for model in ("LlamaRec", "SASRec")}
    assert paths[None]["LlamaRec"] != paths["AMX"]["LlamaRec"]
    assert paths[None]["SASRec"] == paths["AMX"]["SASRec"]


class InterruptingGenerator:
    """A knowledge generator that is interrupted (SIGINT) at its second batch."""

    template, batch_size = KNOWLEDGE_PROMPT, 2

    def __init__(self, interrupt_at=None):
        self.batches, self.interrupt_at, self.seen = 0, interrupt_at, []

    def generate(self, fields):
        self.batches += 1
        if self.batches == self.interrupt_at:
            raise KeyboardInterrupt
        self.seen += [f["title"] for f in fields]
        return [json.dumps({"description": f"about {f['title']}", "summarization": "all"}) for f in fields]


def test_knowledge_generation_resumes_after_an_interrupt(tmp_path):
    items = [(i, f"tok{i}", {"title": f"Movie {i}"}) for i in range(1, 7)]
    cache = KnowledgeCache(tmp_path, "key")
    with pytest.raises(KeyboardInterrupt):
        generate_knowledge(InterruptingGenerator(interrupt_at=2), items, cache, show_progress=False)
    assert not cache.final.is_file()  # nothing half-done is presented as complete
    rerun = InterruptingGenerator()
    records = generate_knowledge(rerun, items, cache, show_progress=False)
    assert rerun.seen == ["Movie 3", "Movie 4", "Movie 5", "Movie 6"]  # the first batch was kept
    assert sorted(records) == [f"tok{i}" for i in range(1, 7)] and cache.final.is_file()
