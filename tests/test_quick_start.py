"""The plugin's entry points: Python API, RecBole's own API, CLI, registry, bad input."""
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import yaml
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_trainer

from recbole_llm import cli, compat, load_config, registry, run_recbole_llm
from recbole_llm.model.lrurec import LRURec
from recbole_llm.quick_start import property_files


def test_run_recbole_llm_returns_recbole_result_dict(tiny_data):
    name, overrides = tiny_data
    result = run_recbole_llm(model="LRURec", dataset=name, config_dict=overrides)
    assert set(result) == {"best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}
    assert {"recall@5", "mrr@10", "ndcg@10", "hit@10"} <= set(result["test_result"])


def test_model_class_works_with_recboles_own_api(tiny_data):
    name, overrides = tiny_data
    config = Config(model=LRURec, dataset=name, config_file_list=property_files("LRURec", name), config_dict=overrides)
    dataset = create_dataset(config)
    assert type(dataset).__name__ == "SequenceWindowDataset"  # registered for RecBole's create_dataset
    train, valid, test = data_preparation(config, dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, LRURec(config, train._dataset))
    trainer.fit(train, valid, saved=True, show_progress=False)
    trainer.model.item_embedding.weight.data.zero_()  # evaluate must load the best checkpoint over these weights
    trainer.evaluate(test, load_best_model=True, show_progress=False)  # torch.load shim at work
    saved = torch.load(trainer.saved_model_file, weights_only=False)["state_dict"]
    assert all(torch.equal(value, trainer.model.state_dict()[key]) for key, value in saved.items())


def test_build_takes_a_built_config_and_wraps_the_models_construction(tiny_data):
    """``build``'s two options for the benchmarks: a Config already built is used as it is (none is loaded
    again), and ``around_model`` is entered around the model's construction alone, with the split's
    training data."""
    from recbole_llm.quick_start import build

    name, overrides = tiny_data
    config = load_config("SASRec", name, config_dict=overrides)
    seen = []

    class Around:
        def __init__(self, config, train):
            seen.append(("called", config, train))

        def __enter__(self):
            seen.append("enter")

        def __exit__(self, *exc):
            seen.append("exit")

    original = registry.get_model("SASRec").__init__

    def spying_init(self, *args):
        seen.append("construct")
        original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry.get_model("SASRec"), "__init__", spying_init)
        built, model, trainer, (train, _, _) = build("SASRec", name, config=config, around_model=Around)
    assert built is config and trainer.model is model
    assert seen == [("called", config, train), "enter", "construct", "exit"]


def test_recbole_baseline_runs_with_our_defaults(tiny_data):
    name, overrides = tiny_data
    config = load_config("SASRec", name, config_dict=overrides)
    assert config["valid_metric"] == "NDCG@10" and config["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert config["topk"] == [5, 10]


def test_cli_runs_several_models_and_writes_a_comparison(tiny_data, tmp_path, monkeypatch, capsys):
    name, overrides = tiny_data
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(overrides))
    argv = ["run_recbole_llm.py", "--model=LRURec,GRU4Rec", f"--dataset={name}", f"--config_files={config_file}", "--epochs=1"]
    monkeypatch.setattr(sys, "argv", argv)
    results = cli.main(argv[1:])
    assert set(results) == {"LRURec", "GRU4Rec"}
    table = capsys.readouterr().out
    assert "LRURec" in table and "GRU4Rec" in table and "ndcg@10" in table
    written = list((tmp_path / "saved").glob(f"comparison-{name}-*.json"))
    assert len(written) == 1
    assert set(json.loads(written[0].read_text())) == {"LRURec", "GRU4Rec"}
    assert list((tmp_path / "saved").glob(f"comparison-{name}-*.csv"))


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ValueError) as err:
        registry.get_model("LRURek")
    assert "LRURec" in str(err.value) and "SASRec" in str(err.value)


def test_missing_dataset_names_folder_and_files(tiny_data):
    _, overrides = tiny_data
    with pytest.raises(FileNotFoundError) as err:
        load_config("LRURec", "no-such-data", config_dict=overrides)
    assert "no-such-data.inter" in str(err.value) and "no-such-data" in str(err.value)


def test_ml100k_is_provisioned_offline(tmp_path, monkeypatch):
    """Into data_path/ml-100k, keeping what a clone already has there (the committed knowledge cache)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "ml-100k"
    (folder / "knowledge").mkdir(parents=True)
    (folder / "knowledge" / "cache.jsonl").write_text("{}\n")
    config = load_config("LRURec", "ml-100k", config_dict={"data_path": str(tmp_path / "data")})
    assert (folder / "knowledge" / "cache.jsonl").read_text() == "{}\n"
    assert config["data_path"] == str(folder)
    assert (folder / "ml-100k.inter").is_file()
    assert "movie_title" in (folder / "ml-100k.item").read_text().splitlines()[0]


def test_gpu_request_without_cuda_falls_back_once(tiny_data, caplog, monkeypatch):
    name, overrides = tiny_data
    monkeypatch.setattr(compat, "_device_noted", False)
    monkeypatch.setattr(compat.torch.cuda, "is_available", lambda: False)
    config = load_config("LRURec", name, config_dict={**overrides, "use_gpu": True, "gpu_id": "0"})
    with caplog.at_level(logging.INFO):
        compat.note_device(config)
        compat.note_device(config)
    assert config["device"].type == "cpu"
    notes = [r for r in caplog.records if "no CUDA device" in r.message]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO  # the default on a CPU: nothing to act on


def test_bitsandbytes_kernel_fetch_and_pkg_resources_warnings_are_dropped():
    """PEFT imports bitsandbytes on every run; its CPU backend's warning about an optional hub kernel
    (logged at import on CPUs with AVX-512 BF16) never reaches a run's log, nor ray's warning about
    pkg_resources."""
    import subprocess

    code = ("import logging; logging.basicConfig(level=logging.INFO); import recbole_llm, peft; "
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from tiny_models import tiny_llama; "
            "from recbole_llm.llm.lora import apply_lora; apply_lora(tiny_llama(64), 2, 4, 0.0, "
            "['q_proj']); "
            "[logging.getLogger(name).warning('Failed to load CPU gemm_4bit_forward from kernels-community "
            "quantization-bitsandbytes') for name in recbole_llm.compat.FOUR_BIT_KERNEL_FETCH_LOGGERS]")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "gemm_4bit_forward" not in run.stderr and "bitsandbytes" not in run.stderr
    assert "pkg_resources" not in run.stderr  # ray's deprecation warning, at RecBole's import of ray
    assert "Warning" not in run.stderr, run.stderr  # e.g. PEFT's call of a deprecated transformers method


def test_anomaly_detection_is_off_after_import():
    import torch

    assert not torch.is_anomaly_enabled()


def test_stage_one_ignores_the_main_models_command_line(tiny_data, monkeypatch):
    from recbole_llm.model.pretrained import id_model_config

    name, overrides = tiny_data
    monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py", "--epochs=7", "--learning_rate=0.5"])
    config = load_config("LRURec", name, config_dict=overrides)
    assert config["epochs"] == 7  # the main model does read its command line
    stage_one = id_model_config(config, "SASRec", {"epochs": 2})
    assert stage_one["epochs"] == 2 and stage_one["learning_rate"] != 0.5
    assert stage_one["data_path"] == config["data_path"]  # same dataset folder, same split settings


def _cli_args(tiny_data, tmp_path, models, *extra):
    name, overrides = tiny_data
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(overrides))
    return [f"--model={models}", f"--dataset={name}", f"--config_files={config_file}", *extra]


@pytest.mark.parametrize("models, extra, message", [
    ("LRURec,LlamaRek", (), "error: Unknown model 'LlamaRek': did you mean LlamaRec?"),
    ("LRURec,LlamaRec", ("--candidate_k=30",), "error: candidate_k=30 is out of range"),
], ids=["misspelt second name", "second model's setting"])
def test_cli_checks_every_model_before_the_first_trains(tiny_data, tmp_path, monkeypatch, models, extra, message):
    argv = _cli_args(tiny_data, tmp_path, models, *extra)
    monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py", *argv])
    trained = []
    monkeypatch.setattr(cli, "run", lambda model, *args, **kwargs: trained.append(model))
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert str(stop.value).startswith(message)
    assert trained == []


def test_cli_writes_the_table_of_the_finished_models_when_a_later_one_fails(tiny_data, tmp_path, monkeypatch, capsys):
    argv = _cli_args(tiny_data, tmp_path, "LRURec,GRU4Rec")
    monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py", *argv])

    def run(model, *args, **kwargs):
        if model == "GRU4Rec":
            raise RuntimeError("out of memory")
        return {"best_valid_score": 0.1, "valid_score_bigger": True, "best_valid_result": {"ndcg@10": 0.1},
                "test_result": {"ndcg@10": 0.2}}

    monkeypatch.setattr(cli, "run", run)
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(argv)
    assert "written (the models that finished)" in capsys.readouterr().out
    written = list((tmp_path / "saved").glob("comparison-tiny-*.json"))
    assert len(written) == 1 and set(json.loads(written[0].read_text())) == {"LRURec"}


class _Pickled:
    """Stands for the RecBole Config pickled inside its checkpoints."""


def test_torch_load_trusts_recboles_own_files_only(tmp_path):
    import importlib

    import torch

    path = tmp_path / "checkpoint.pth"
    torch.save({"config": _Pickled(), "state_dict": {}}, path)
    for module in compat.RECBOLE_TORCH_LOADERS:  # RecBole's loaders read their own checkpoints (compat shim 1)
        assert isinstance(importlib.import_module(module).torch.load(path)["config"], _Pickled), module
    with pytest.raises(Exception, match="(?i)weights only"):  # everyone else keeps torch's safe default
        torch.load(path)
