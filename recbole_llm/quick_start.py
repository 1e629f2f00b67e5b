"""``run_recbole_llm``: RecBole's quick start for our models and RecBole's alike.

Same steps as ``recbole.quick_start.run_recbole`` (Config -> dataset -> split -> model ->
trainer -> fit -> evaluate) with three differences: the model and trainer come from
:mod:`recbole_llm.registry`; our property files are layered under the user's; and
``get_flops`` is skipped (it deep-copies the model, ruinous for an LLM).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
import tempfile
from logging import getLogger
from pathlib import Path

from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_llm import compat, registry
from recbole_llm.data.datasets import resolve_data_path


def properties_dir() -> Path:
    """Our ``properties/`` folder: beside the package in a clone, under ``share/`` in a wheel."""
    candidates = [
        Path(__file__).resolve().parent.parent / "properties",
        Path(sys.prefix) / "share" / "recbole-llm" / "properties",
    ]
    for folder in candidates:
        if (folder / "overall.yaml").is_file():
            return folder
    raise FileNotFoundError(f"recbole-llm property files not found; looked in {[str(c) for c in candidates]}")


def property_files(model_name: str, dataset: str) -> list[str]:
    """overall.yaml, then dataset/<dataset>.yaml and model/<model>.yaml where they exist."""
    folder = properties_dir()
    files = [folder / "overall.yaml", folder / "dataset" / f"{dataset}.yaml", folder / "model" / f"{model_name}.yaml"]
    return [str(f) for f in files if f.is_file()]


def load_config(model, dataset, config_file_list=None, config_dict=None) -> Config:
    """A RecBole ``Config`` with our property files first, then the user's files and dict.

    ``model`` is a name (ours or RecBole's) or a model class.
    """
    compat.apply()
    model_class = registry.get_model(model)
    files = property_files(model_class.__name__, dataset) + list(config_file_list or [])
    config = Config(model=model_class, dataset=dataset, config_file_list=files, config_dict=config_dict)
    resolve_data_path(config, config.external_config_dict.get("data_path"))
    return config


_recbole_handlers: list[logging.Handler] = []


def _init_logger(config) -> None:
    """RecBole's ``init_logger``, once per run: RecBole installs its handlers with
    ``logging.basicConfig``, a no-op once the root logger has handlers, so the second
    model of a ``--model=A,B`` run would log to the first model's file. Ours go first."""
    root = logging.getLogger()
    for handler in _recbole_handlers:
        root.removeHandler(handler)
        handler.close()
    before = set(root.handlers)
    init_logger(config)
    _recbole_handlers[:] = [h for h in root.handlers if h not in before]


def build(model, dataset, config_file_list=None, config_dict=None):
    """What ``run_recbole_llm`` sets up before training: ``(config, model, trainer, (train, valid, test))``."""
    config = load_config(model, dataset, config_file_list, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    _init_logger(config)
    logger = getLogger()
    compat.note_device(config, logger)
    logger.info(sys.argv)
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model_class = registry.get_model(model)
    model = model_class(config, train_data._dataset).to(config["device"])
    logger.info(model)
    trainer = registry.get_trainer(model_class)(config, model)
    return config, model, trainer, (train_data, valid_data, test_data)


def run_recbole_llm(model, dataset, config_file_list=None, config_dict=None, saved=True, queue=None):
    """Train and evaluate one model; returns RecBole's result dict.

    Keys: best_valid_score, valid_score_bigger, best_valid_result, test_result.
    """
    config, model, trainer, (train_data, valid_data, test_data) = build(model, dataset, config_file_list, config_dict)
    logger = getLogger()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }
    if queue is not None:
        queue.put(result)
    return result


def run(model, dataset, config_file_list=None, config_dict=None, saved=True, nproc=1, world_size=-1,
        ip="localhost", port="5678", group_offset=0):
    """``recbole.quick_start.run`` for our runner: one process, or ``nproc`` spawned ranks."""
    if nproc == 1 and world_size <= 0:
        return run_recbole_llm(model, dataset, config_file_list, config_dict, saved)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = dict(config_dict or {})
    world_size = nproc if world_size == -1 else world_size
    config_dict.update({"world_size": world_size, "ip": ip, "port": port, "nproc": nproc, "offset": group_offset})
    mp.spawn(_run_rank, args=(model, dataset, config_file_list, config_dict, saved, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def _run_rank(rank, model, dataset, config_file_list, config_dict, saved, queue):
    config_dict = dict(config_dict, local_rank=rank)
    run_recbole_llm(model, dataset, config_file_list, config_dict, saved, queue=queue if rank == 0 else None)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def comparison_table(results: dict[str, dict], out_dir: str | os.PathLike, stem: str) -> str:
    """Write one row per model (test metrics) to ``out_dir/stem.{csv,json}``; return it as text."""
    metrics = sorted({m for r in results.values() for m in r["test_result"]}, key=_metric_order)
    rows = [[name] + [f"{r['test_result'].get(m, float('nan')):.4f}" for m in metrics] for name, r in results.items()]
    out = Path(out_dir)
    write_atomically(out / f"{stem}.json", json.dumps({k: _plain(v) for k, v in results.items()}, indent=2))
    with tempfile.TemporaryFile("w+", newline="") as buf:
        csv.writer(buf).writerows([["model"] + metrics] + rows)
        buf.seek(0)
        write_atomically(out / f"{stem}.csv", buf.read())
    widths = [max(len(str(x)) for x in col) for col in zip(["model"] + metrics, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(["model"] + metrics)] + [line(r) for r in rows])


def _metric_order(name: str):
    metric, _, k = name.partition("@")
    return (int(k) if k.isdigit() else 0, metric)


def _plain(result: dict) -> dict:
    return json.loads(json.dumps(result, default=float))
