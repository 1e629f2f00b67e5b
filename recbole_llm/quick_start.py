"""``run_recbole_llm``: RecBole's quick start for our models and RecBole's alike.

Same steps as ``recbole.quick_start.run_recbole`` (Config -> dataset -> split -> model ->
trainer -> fit -> evaluate) with three differences: the model and trainer come from
:mod:`recbole_llm.registry`; our property files are layered under the user's; and
``get_flops`` is skipped (it deep-copies the model, ruinous for an LLM).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
import tempfile
from logging import getLogger
from pathlib import Path

from recbole.data import create_dataset, data_preparation
from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_llm import checks, compat, distributed, registry, settings
from recbole_llm.cache_io import atomic_target
from recbole_llm.config import load_config, properties_dir, property_files  # noqa: F401 - public API
from recbole_llm.data.datasets import drop_exact_duplicates
from recbole_llm.errors import InputError
from recbole_llm.llm.preflight import check_llm_settings


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


def preflight(config) -> None:
    """The checks of an LLM model's LLM settings (``llm_path``, adapters, ``load_in_4bit``),
    reading config files only: :func:`build` runs them before the dataset
    and the model (stage 1 and the LLM) are built, the command line for every model first."""
    check_llm_settings(config)


def build(model, dataset, config_file_list=None, config_dict=None, *, config=None, around_model=None):
    """What ``run_recbole_llm`` sets up before training: ``(config, model, trainer, (train, valid, test))``.

    Every check runs before the model (and so stage 1) is built: settings, folders and data
    files in :func:`load_config`, the LLM settings in :func:`preflight`, the filtered dataset
    and its split sizes before RecBole's split. For callers that measure (the benchmarks):
    ``config`` is a Config already built (e.g. one pickled in a checkpoint), used instead of
    :func:`load_config`; ``around_model(config, train_data)`` returns a context manager entered
    around the model's construction (a timer, a memory probe)."""
    if config is None:
        config = load_config(model, dataset, config_file_list, config_dict)
    preflight(config)
    init_seed(config["seed"], config["reproducibility"])
    _init_logger(config)
    logger = getLogger()
    compat.note_device(config, logger)
    logger.info(sys.argv)
    changes = settings.changed_settings(config, config_file_list, config_dict, stream=sys.stderr)
    if changes:  # once per run, before RecBole's full list
        logger.info("settings changed from their defaults:\n  " + "\n  ".join(changes))
    logger.info(config)

    dataset = checks.filtered_dataset(config, create_dataset)
    dropped = drop_exact_duplicates(config, dataset)
    if dropped:
        logger.info(f"drop_exact_duplicates: dropped {dropped} exact duplicate interactions")
    logger.info(dataset)
    checks.check_split_sizes(config, dataset)
    checks.check_candidates_fit(config, dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model_class = registry.get_model(model)
    try:
        with around_model(config, train_data) if around_model else contextlib.nullcontext():
            model = model_class(config, train_data._dataset).to(config["device"])
    except ValueError as error:  # RecBole's models check their settings with ValueError
        if isinstance(error, InputError) or not model_class.__module__.startswith("recbole."):
            raise
        raise InputError(f"RecBole's {model_class.__name__} refused its settings: {error}") from None
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
    logger.info(set_color("test result", "yellow") + f": {overall(test_result)}")  # slices: their own table
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
    model_class = registry.get_model(model)
    distributed.check_distributed_trainer(registry.get_trainer(model_class), model_class.__name__)  # before spawning
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = dict(config_dict or {})
    world_size = nproc if world_size == -1 else world_size
    config_dict.update({"world_size": world_size, "ip": ip, "port": port, "nproc": nproc, "offset": group_offset})
    mp.spawn(_run_rank, args=(model, dataset, config_file_list, config_dict, saved, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def _run_rank(rank, model, dataset, config_file_list, config_dict, saved, queue):
    import torch.distributed as dist

    config_dict = dict(config_dict, local_rank=rank)
    try:
        run_recbole_llm(model, dataset, config_file_list, config_dict, saved, queue=queue if rank == 0 else None)
    finally:
        if dist.is_initialized():  # created by RecBole's Config (compat shim 5 on the CPU)
            dist.destroy_process_group()


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`recbole_llm.cache_io.atomic_target`."""
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def overall(result: dict | None) -> dict | None:
    """A RecBole result dict without its metrics by slice (``eval_slices``)."""
    return None if result is None else {k: v for k, v in result.items() if k != "slices"}


def slice_columns(result: dict, metric: str = "ndcg@10") -> dict[str, float]:
    """``{"ndcg@10 cold": value, ...}``: one column per slice of a test result with slices."""
    from recbole_llm.trainer.slices import SLICES

    slices = result.get("slices") or {}
    return {f"{metric} {name}": slices[group][name].get(metric, float("nan"))
            for group, names in SLICES.items() if group in slices for name in names}


def comparison_table(results: dict[str, dict], out_dir: str | os.PathLike, stem: str) -> str:
    """Write one row per model (test metrics, then NDCG@10 per slice where the runs have
    ``eval_slices``) to ``out_dir/stem.{csv,json}``; return it as text."""
    tests = {name: {**overall(r["test_result"]), **slice_columns(r["test_result"])} for name, r in results.items()}
    plain = sorted({m for t in results.values() for m in overall(t["test_result"])}, key=_metric_order)
    metrics = plain + [c for c in dict.fromkeys(c for t in tests.values() for c in t) if c not in plain]
    rows = [[name] + [f"{t.get(m, float('nan')):.4f}" for m in metrics] for name, t in tests.items()]
    out = Path(out_dir)
    write_atomically(out / f"{stem}.json", json.dumps({k: plain_json(v) for k, v in results.items()}, indent=2))
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


def plain_json(result: dict) -> dict:
    """``result`` with numpy / torch numbers turned into plain floats (JSON-ready)."""
    return json.loads(json.dumps(result, default=float))
