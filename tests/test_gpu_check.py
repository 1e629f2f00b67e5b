"""benchmarks/gpu_check.py's CPU path on the tiny Llama, so the GPU check cannot rot between GPU runs.

It runs in the default suite (about a minute on 2 cores: every LLM model is built)."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check  # noqa: E402


def test_random_weights_keep_the_config_but_not_the_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_llama

    tiny_llama(100).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").write_text("{}")  # stands in for the tokenizer files that travel
    kit = gpu_check.without_weights(tmp_path / "model", tmp_path / "kit")
    assert (kit / "config.json").is_file() and (kit / "tokenizer.json").is_file()
    assert not (kit / "model.safetensors").exists()
    random_dir = gpu_check.with_random_weights(kit, tmp_path / "random", causal=True, seed=1)
    original, random = (AutoModelForCausalLM.from_pretrained(d) for d in (tmp_path / "model", random_dir))
    assert original.config.to_dict()["hidden_size"] == random.config.to_dict()["hidden_size"]
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(original.state_dict()[weight], random.state_dict()[weight])


def test_cpu_path_runs_every_model_and_reports_its_numbers(tiny_data, tiny_llama_dir, tmp_path):
    name, overrides = tiny_data
    settings = {**overrides, "knowledge_max_new_tokens": 4, "align_batch_size": 2, "align_max_new_tokens": 4,
                "candidate_k": 4, "retriever_config": {"epochs": 1}, "id_model_config": {"epochs": 1},
                "reference_config": {"epochs": 1}, "llm_layers": None, "train_rows_per_epoch": None,
                "ranker_eval_batch_size": 16, "generator_mode": "sync", "lora_r": 4}
    argv = ["--cpu", "--dataset", name, "--steps", "2", "--align_steps", "1", "--precisions", "bf16", "--llm_path", str(tiny_llama_dir),
            "--out", str(tmp_path / "check.json"), "--random_weights"]
    argv += [f"--{key}={json.dumps(value)}" for key, value in settings.items()]
    rows = gpu_check.main(argv)
    assert [r["model"] for r in rows] == gpu_check.MODELS
    assert json.loads((tmp_path / "check.json").read_text()) == rows
    for row in rows:
        assert row["train_rows"] > 0 and row["rows_per_s"] > 0 and row["eval_users_per_s"] > 0, row
        assert 0.0 <= row["ndcg@10"] <= 1.0 and row["peak_gpu_gib"] is None
    assert "| LlamaRec | bf16 | 2 |" in gpu_check.table(rows)
