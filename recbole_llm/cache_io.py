"""Cached artefacts on disk, written and read so that nothing half-written is ever used.

* :func:`atomic_target` / :func:`atomic_save`: every cache write goes to a unique temp name in
  the target's own folder, then one rename; a kill leaves the old file or the new one, and
  two runs writing the same cache never share a temp file.
* :func:`guarded_load`: every cache read; a truncated or corrupt file is logged with its path,
  removed, and reported as absent, so the caller rebuilds it instead of failing.
* :func:`cache_lock`: one inter-process lock per cache key (``filelock``), so two runs that
  need the same artefact build it once: the second waits, then reuses the first's;
  :func:`try_lock` the same without waiting (a resume state belongs to one run at a time).
* :func:`config_key`: the key of what a config trains (its settings and the dataset's files),
  for stage-1 checkpoints and resume states; :func:`shaping_settings`: the settings behind it; :func:`content_key`: the content hash behind it and
  every other cache key.
* :func:`unique_checkpoint_name`: RecBole names checkpoints ``<model>-<time>.pth`` to the
  second; two runs started together would write the same file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from logging import getLogger
from pathlib import Path

import torch
from filelock import FileLock


#: Config entries that do not change what a run learns (left out of :func:`config_key`).
_VOLATILE = {"device", "gpu_id", "use_gpu", "checkpoint_dir", "show_progress", "state", "data_path",
             "local_rank", "single_spec", "eval_batch_size", "worker", "log_wandb", "wandb_project", "resume", "verbose",
             "knowledge_vector_dir", "eval_slices"}
#: Settings added to the property files after caches were made, with the value their absence meant:
#: left out of :func:`config_key` while they hold it, so those caches stay valid (``item_noun``: every
#: default prompt spoke of a movie before it existed; ml-100k's still does).
_ADDED_LATER = {"drop_exact_duplicates": False, "lr_schedule": "constant", "pluggable_dir": None, "item_noun": "movie",
                "knowledge_source": "llm"}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """A unique temp path beside ``path`` to write a file or a folder to; when the block ends
    without error it replaces ``path`` in one rename, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():  # a folder cannot be renamed onto a non-empty one
            _remove(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def atomic_save(obj, path: str | os.PathLike, **kwargs) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_target`."""
    with atomic_target(path) as tmp:
        torch.save(obj, tmp, **kwargs)


def guarded_load(path: str | os.PathLike, load: Callable | None = None, what: str = "cache", logger=None):
    """``load(path)`` (default: ``torch.load`` on the CPU), or None when there is no file or it
    cannot be read: a truncated or corrupt file is logged with its path and removed, and the
    caller builds it again."""
    path = Path(path)
    if not path.exists():
        return None
    load = load or (lambda p: torch.load(p, map_location="cpu", weights_only=False))
    try:
        return load(path)
    except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt, whatever the reader raised
        (logger or getLogger()).warning(
            f"{what} {path} is unreadable ({type(error).__name__}: {str(error)[:120]}); removed, it is rebuilt."
        )
        _remove(path)
        return None


def _lock_of(path: str | os.PathLike) -> FileLock:
    """The inter-process lock of ``path``: the file ``<path>.lock`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(path.name + ".lock")))


def try_lock(path: str | os.PathLike) -> FileLock | None:
    """The lock of ``path`` if no other process holds it, else None; the caller releases it."""
    lock = _lock_of(path)
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        return None
    return lock


@contextmanager
def cache_lock(path: str | os.PathLike, logger=None) -> Iterator[None]:
    """Hold the lock of the cache at ``path`` (``<path>.lock``) for the block; says so once
    when another run holds it and this one waits."""
    lock = try_lock(path)
    if lock is None:
        (logger or getLogger()).info(f"waiting for another run that is building {path}")
        lock = _lock_of(path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def unique_checkpoint_name(saved_model_file: str) -> str:
    """RecBole's ``<dir>/<model>-<time>.pth`` with a short random tag before ``.pth``."""
    stem, suffix = os.path.splitext(saved_model_file)
    return f"{stem}-{uuid.uuid4().hex[:6]}{suffix}"


def shaping_settings(config, leave_out=frozenset()) -> dict:
    """The settings of ``config`` that shape what it trains: all of them but the volatile ones, those in
    ``leave_out``, and those added later while they hold the value their absence meant."""
    settings = {k: v for k, v in config.final_config_dict.items() if k not in _VOLATILE and k not in leave_out}
    for key, value in _ADDED_LATER.items():
        if key in settings and settings[key] in (value, None):
            settings.pop(key)
    return settings


def config_key(config) -> str:
    """Hash of everything that shapes a trained model: its config and the dataset files."""
    folder = Path(config["data_path"])
    files = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in folder.glob(f"{config['dataset']}.*"))
    return content_key([config["model"], config["dataset"], files, shaping_settings(config)], length=16)


def content_key(*parts, length: int | None = None) -> str:
    """The SHA-1 hex digest of ``parts`` in order, the content hash behind every cache key: bytes as
    they are, a str as UTF-8, a tensor as its values' bytes (on the CPU), anything else as JSON with
    sorted keys (``default=str``). ``length`` keeps that many leading hex digits."""
    digest = hashlib.sha1()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().numpy().tobytes()
        elif isinstance(part, str):
            part = part.encode()
        elif not isinstance(part, bytes):
            part = json.dumps(part, sort_keys=True, default=str).encode()
        digest.update(part)
    return digest.hexdigest()[:length]
