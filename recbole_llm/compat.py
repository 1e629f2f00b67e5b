"""Every shim RecBole 1.2.1 needs on today's torch / numpy / hyperopt stack, in one place.

``apply()`` is idempotent and runs when ``recbole_llm`` is imported. Each shim
names the failure it fixes; none changes behaviour outside RecBole's own calls.

1. ``torch.load`` under torch>=2.6 defaults to ``weights_only=True``. RecBole pickles
   its ``Config`` (and numpy / enum objects) inside checkpoints, so
   ``Trainer.evaluate(load_best_model=True)`` and ``Trainer.resume_checkpoint`` fail with
   ``_pickle.UnpicklingError: Weights only load failed ... Unsupported global``.
   Fix: calls made from inside the ``recbole`` package (and only those) default to
   ``weights_only=False``; they load files RecBole itself wrote.
2. ``recbole/model/sequential_recommender/sine.py`` calls
   ``torch.autograd.set_detect_anomaly(True)`` at import time, and importing any RecBole
   sequential model imports it. Anomaly mode then slows every backward pass of the
   process several-fold. Fix: import it once, then switch anomaly detection back off.
3. pandas 2.x and torch warn (FutureWarning) at every chained ``fillna(inplace=True)`` and
   ``torch.cuda.amp.GradScaler`` call inside RecBole, burying the log. Fix: those
   FutureWarnings, raised from RecBole's modules only, are not shown.
4. RecBole's ``Config`` silently picks the CPU when ``use_gpu`` is set but no CUDA device
   exists. Fix: :func:`note_device` says so once in the log (called by quick_start).

Distributed runs (``nproc`` > 1 or ``world_size`` > 0: ``local_rank`` is in the config).
RecBole 1.2.1 supports them on GPUs only; 5-9 make them work on CPUs (gloo) and leave the
GPU path as RecBole wrote it, except for 7-9, which fix it on GPUs too.

5. ``Config._init_device`` asserts one ``gpu_id`` per process, creates the process group
   with ``backend="nccl"`` and puts the model on ``cuda:<local_rank>``: on a machine
   without CUDA it fails with ``AssertionError`` (``assert len(gpu_id.split(",")) >= nproc``)
   or, given enough ids, ``RuntimeError: Distributed package doesn't have NCCL built in``.
   Fix: without CUDA (or with ``use_gpu: False`` or an empty ``gpu_id``) the same process
   group is created with the ``gloo`` backend and the device is the CPU.
6. ``AbstractTrainer.__init__`` builds ``DistributedDataParallel(model,
   device_ids=[local_rank])`` after ``SyncBatchNorm.convert_sync_batchnorm``: for a CPU model
   DDP raises ``ValueError: DistributedDataParallel device_ids and output_device arguments
   only work with single-device/multiple-device GPU modules or CPU modules, but got
   device_ids [0] ...``, and for a model with BatchNorm ``ValueError: SyncBatchNorm layers
   only work with GPU modules``. Fix: on the CPU ``device_ids=None`` and BatchNorm stays
   BatchNorm (DDP broadcasts its buffers from rank 0).
7. ``AbstractTrainer.sync_grad_loss`` (added to every distributed step's loss so that each
   parameter gets a gradient) adds ``sum(param) * 0`` in place over ALL parameters: with a
   complex parameter (LRURec's recurrence) it fails with ``RuntimeError: result type
   ComplexFloat can't be cast to the desired output type Float``, and it sums a frozen LLM's
   weights too, a pass over the whole LLM per step for a zero. Fix: the real part, added out
   of place, over the parameters that train only (the sum is 0 either way).
8. Only rank 0 saves the best checkpoint, every rank names it after its own clock
   (``saved_model_file``), and nothing waits for rank 0 to finish writing it: in
   ``evaluate(load_best_model=True)`` another rank fails with ``FileNotFoundError`` or,
   reading rank 0's half-written file, ``EOFError: Ran out of input`` / ``OSError: [Errno 22]``;
   on another node there is no file at all.
   Fix: in a distributed run rank 0 reads the checkpoint and broadcasts its bytes, and every
   rank loads those.
9. ``recbole.utils.ensure_dir`` checks ``os.path.exists`` and then calls ``os.makedirs``: two
   ranks creating ``checkpoint_dir`` or ``log/<model>`` at once fail now and then with
   ``FileExistsError: [Errno 17] File exists``. Fix: ``os.makedirs(exist_ok=True)``, in every
   RecBole module that imported ``ensure_dir``.

Stage 1 of the LLM models (:func:`recbole_llm.model.pretrained.pretrained_id_model`) is
trained and cached by rank 0 alone and broadcast to the other ranks. A trainer with its own
training loop either synchronises its ranks itself (the LlamaRec ranker's: RecBole's gradient
hook, :func:`recbole_llm.distributed.load_checkpoint`) or says ``supports_distributed = False``
(SeRALM's alignment): a distributed run of that one stops at once with an
:class:`~recbole_llm.errors.InputError` (:func:`recbole_llm.distributed.check_distributed_trainer`).

Hyper-parameter search (``recbole.trainer.hyper_tuning.HyperTuning``, used by :mod:`recbole_llm.hyper`).

10. ``exhaustive_search`` (``algo="exhaustive"``) draws its samples with
    ``np.random.RandomState(seed)``, but hyperopt>=0.2.7 samples through the numpy Generator API,
    so the first trial fails with ``AttributeError: 'numpy.random.mtrand.RandomState' object has
    no attribute 'integers'``. Fix: the same function (its code object, unchanged) with ``np``
    bound to a namespace whose ``random.RandomState`` is ``np.random.default_rng``; both build
    a seeded generator from the int seed hyperopt passes. ``np`` is used nowhere else in it.
11. ``HyperTuning.trial`` takes ``if not self.best_score:`` to mean "no trial yet", so a best
    valid score of 0.0 is replaced by the next trial's score whatever it is: a tie goes to the
    later trial and, when smaller is better (RMSE: 0.0 is perfect), a worse trial becomes the
    best. Fix: after each trial the best score is stored as a float whose truth value is True.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch

from recbole_llm.distributed import check_distributed_trainer, is_distributed, rank0_bytes

_applied = False
_device_noted = False


@contextlib.contextmanager
def recbole_argv(args=()):
    """RecBole's ``Config`` reads ``--key=value`` settings from ``sys.argv``, above any
    ``config_dict``: for the block, ``sys.argv`` holds the program name and ``args`` only (none:
    a config built inside a run, e.g. stage 1, sees no setting of the command line)."""
    argv = sys.argv
    sys.argv = argv[:1] + list(args)
    try:
        yield
    finally:
        sys.argv = argv


def _recbole_trusting_load(original):
    @functools.wraps(original)
    def load(*args, **kwargs):
        if "weights_only" not in kwargs:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller == "recbole" or caller.startswith("recbole."):
                kwargs["weights_only"] = False
        return original(*args, **kwargs)

    load.__recbole_llm_shim__ = True
    return load


def apply() -> None:
    """Install the shims (safe to call many times)."""
    global _applied
    if _applied:
        return
    if not getattr(torch.load, "__recbole_llm_shim__", False):
        torch.load = _recbole_trusting_load(torch.load)
    importlib.import_module("recbole.model.sequential_recommender")  # imports sine.py once

    torch.autograd.set_detect_anomaly(False)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole(\.|$)")
    _apply_distributed()
    _apply_hyper_tuning()
    _applied = True


def note_device(config, logger: logging.Logger | None = None) -> None:
    """Log once when a GPU was asked for but the run falls back to the CPU."""
    global _device_noted
    wants_gpu = bool(config["use_gpu"]) and str(config["gpu_id"]).strip() != ""
    if wants_gpu and not torch.cuda.is_available() and not _device_noted:
        (logger or logging.getLogger()).warning(
            "use_gpu=True but no CUDA device is available: running on the CPU "
            "(set use_gpu: False to silence this)."
        )
        _device_noted = True


# ---------------------------------------------------------------- distributed runs (5-9)
def _patch(owner, name: str, make) -> None:
    original = getattr(owner, name)
    if not getattr(original, "__recbole_llm_shim__", False):
        patched = make(original)
        patched.__recbole_llm_shim__ = True
        setattr(owner, name, patched)


def _apply_distributed() -> None:
    from recbole.config.configurator import Config
    from recbole.trainer.trainer import AbstractTrainer, Trainer

    _patch(Config, "_init_device", _init_device_on_cpu)
    _patch(AbstractTrainer, "__init__", _ddp_on_cpu)
    _patch(AbstractTrainer, "sync_grad_loss", lambda original: _sync_grad_loss)
    _patch(Trainer, "evaluate", _evaluate_with_rank0_checkpoint)
    for module in ("recbole.utils", "recbole.utils.utils", "recbole.utils.logger", "recbole.trainer.trainer",
                   "recbole.data.utils", "recbole.data.dataset.dataset"):
        _patch(importlib.import_module(module), "ensure_dir", lambda original: _ensure_dir)


def _gpu_id_text(gpu_id) -> str:
    return ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple) else str(gpu_id)


def _init_device_on_cpu(original):
    """Shim 5: RecBole's distributed ``_init_device`` with gloo and the CPU when there is no GPU."""

    @functools.wraps(original)
    def _init_device(self):
        settings = self.final_config_dict
        if "local_rank" not in settings:
            return original(self)
        settings["gpu_id"] = _gpu_id_text(settings["gpu_id"])
        os.environ["CUDA_VISIBLE_DEVICES"] = settings["gpu_id"]  # as RecBole does
        on_gpu = settings.get("use_gpu") is not False and settings["gpu_id"].strip() != ""
        if on_gpu and torch.cuda.is_available():
            return original(self)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(
                backend="gloo",
                rank=settings["local_rank"] + settings["offset"],
                world_size=settings["world_size"],
                init_method=f"tcp://{settings['ip']}:{settings['port']}",
            )
        settings["device"] = torch.device("cpu")
        settings["single_spec"] = False
        if settings["local_rank"] != 0:  # as RecBole: only local rank 0 logs and shows progress
            settings["state"] = "error"
            settings["show_progress"] = False
            settings["verbose"] = False

    return _init_device


def _ddp_on_cpu(original):
    """Shim 6: ``DistributedDataParallel`` without ``device_ids`` (and no SyncBatchNorm) on the CPU."""

    @functools.wraps(original)
    def __init__(self, config, model):
        if not config["single_spec"]:
            check_distributed_trainer(type(self), config["model"])
        if config["single_spec"] or config["device"].type == "cuda":
            return original(self, config, model)
        from torch.nn.parallel import DistributedDataParallel

        self.config = config
        self.model = model
        self.distributed_model = DistributedDataParallel(model, device_ids=None)

    return __init__


def _sync_grad_loss(self):
    """Shim 7: RecBole's zero-valued loss that touches every parameter, over those that train."""
    sync_loss = 0
    for param in self.model.parameters():
        if param.requires_grad:
            sync_loss = sync_loss + torch.sum(param).real * 0
    return sync_loss


def _evaluate_with_rank0_checkpoint(original):
    """Shim 8: every rank loads the best checkpoint rank 0 wrote, sent as bytes."""

    @functools.wraps(original)
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not load_best_model or not eval_data or not is_distributed(self.config):
            return original(self, eval_data, load_best_model, model_file, show_progress)
        import torch.distributed as dist

        path = Path(model_file or self.saved_model_file)
        data = rank0_bytes(path)
        if dist.get_rank() == 0:
            return original(self, eval_data, True, str(path), show_progress)
        with tempfile.TemporaryDirectory(prefix="recbole_llm_rank") as folder:
            copy = Path(folder) / path.name
            copy.write_bytes(data)
            return original(self, eval_data, True, str(copy), show_progress)

    return evaluate


def _ensure_dir(dir_path):
    """Shim 9: RecBole's ``ensure_dir`` without the race between two processes."""
    os.makedirs(dir_path, exist_ok=True)


# ---------------------------------------------------------------- hyper-parameter search (10-11)
def _apply_hyper_tuning() -> None:
    from recbole.trainer import hyper_tuning

    _patch(hyper_tuning, "exhaustive_search", _exhaustive_search_with_generator)
    _patch(hyper_tuning.HyperTuning, "trial", _trial_keeping_a_zero_best)


def _exhaustive_search_with_generator(original):
    """Shim 10: RecBole's ``exhaustive_search`` with ``np.random.RandomState`` meaning ``np.random.default_rng``."""
    import numpy as np

    numpy_with_generator = types.SimpleNamespace(random=types.SimpleNamespace(RandomState=np.random.default_rng))
    patched = types.FunctionType(original.__code__, {**original.__globals__, "np": numpy_with_generator},
                                 original.__name__, original.__defaults__, original.__closure__)
    return functools.update_wrapper(patched, original)


class _BestScore(float):
    """A best valid score that counts as set even when it is 0.0 (shim 11)."""

    def __bool__(self) -> bool:
        return True


def _trial_keeping_a_zero_best(original):
    """Shim 11: ``HyperTuning.trial`` whose best score of 0.0 still counts as a best score."""

    @functools.wraps(original)
    def trial(self, params):
        status = original(self, params)
        if self.best_score is not None:
            self.best_score = _BestScore(self.best_score)
        return status

    return trial
