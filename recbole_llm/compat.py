"""Every shim RecBole 1.2.1 needs on today's torch / numpy / hyperopt stack, in one place.

``apply()`` is idempotent and runs when ``recbole_llm`` is imported. Each shim changes
RecBole's own calls only; its function's docstring quotes the error it fixes.

1. ``torch.load`` in RecBole's modules defaults to ``weights_only=False`` (RecBole pickles its
   Config in the checkpoints it writes; torch>=2.6 refuses them).
2. Importing RecBole's sequential models (sine.py) turns on autograd anomaly detection for the
   whole process: turned off again.
3. RecBole's FutureWarnings (pandas ``fillna(inplace=True)``, ``torch.cuda.amp``) are hidden.
4. :func:`note_device` says once (INFO) when ``use_gpu`` falls back to the CPU.
5-9. Distributed runs (``nproc`` > 1 or ``world_size`` > 0), GPU-only in RecBole, work on
   CPUs with gloo: the device and process group (5), DDP without ``device_ids`` (6), the
   zero-valued sync loss over trained and real parameters only (7; also on GPUs), the best
   checkpoint read by rank 0 and broadcast (8), ``ensure_dir`` without a race (9).
10-11. Hyper-parameter search (:mod:`recbole_llm.hyper`): ``exhaustive_search`` on hyperopt's
   Generator API (10), a best valid score of 0.0 kept as the best (11).
12. bitsandbytes' CPU backend, imported by PEFT on every run, warns that it could not fetch an
   optional 4-bit kernel from the hub: dropped (a CPU run never computes in 4-bit).
13. Deprecation warnings of one library's call into another (ray's import of pkg_resources, PEFT's
   call of transformers' ``is_gradient_checkpointing``): hidden.
14. oneDNN's primitive cache capped at 64 shapes (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``): memory.
15. ``recbole.quick_start.load_data_and_model`` reads a checkpoint with an unpickler that rebuilds
   what RecBole's checkpoints hold and refuses anything else (torch>=2.6 refuses them all).

Stage 1 is trained by rank 0 alone and broadcast; a trainer with its own loop synchronises
its ranks or says ``supports_distributed = False`` (:mod:`recbole_llm.distributed`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import pickle
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


#: RecBole modules that call ``torch.load`` on files RecBole itself wrote (checkpoints, pretrained parts).
RECBOLE_TORCH_LOADERS = (
    "recbole.trainer.trainer", "recbole.quick_start.quick_start",
    "recbole.model.general_recommender.convncf", "recbole.model.general_recommender.nais",
    "recbole.model.general_recommender.ract", "recbole.model.general_recommender.neumf",
    "recbole.model.context_aware_recommender.kd_dagfm", "recbole.model.sequential_recommender.s3rec",
)


class _TorchTrustingRecBoleFiles(types.ModuleType):
    """Shim 1: ``torch`` as RecBole's modules see it, with ``load`` defaulting to ``weights_only=False``.

    torch>=2.6 defaults to ``weights_only=True``; RecBole pickles its ``Config`` (and numpy / enum
    objects) in its checkpoints, so ``Trainer.evaluate(load_best_model=True)`` and
    ``Trainer.resume_checkpoint`` fail with ``_pickle.UnpicklingError: Weights only load failed ...
    Unsupported global``. Only the modules in :data:`RECBOLE_TORCH_LOADERS` get this ``torch``;
    every other caller keeps torch's default."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def apply() -> None:
    """Install the shims (safe to call many times)."""
    global _applied
    if _applied:
        return
    # shim 13: deprecation warnings of one library's call into another, nothing a user of recbole-llm can
    # act on: RecBole's quick_start imports ray, whose import of pkg_resources prints "UserWarning:
    # pkg_resources is deprecated as an API ... Refrain from using this package or pin to Setuptools<81"
    # (setuptools>=81); PEFT's LoRA calls "FutureWarning: `is_gradient_checkpointing` is deprecated and
    # will be removed in v6. Use `is_activation_checkpointing` instead." (transformers 5)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    trusting_torch = _TorchTrustingRecBoleFiles("torch")
    for module in RECBOLE_TORCH_LOADERS:
        importlib.import_module(module).torch = trusting_torch
    # shim 2: recbole/model/sequential_recommender/sine.py calls torch.autograd.set_detect_anomaly(True) when
    # imported, which slows every backward pass of the process several-fold: import it once, switch it off
    importlib.import_module("recbole.model.sequential_recommender")
    torch.autograd.set_detect_anomaly(False)
    # shim 3: pandas 2.x and torch FutureWarnings at every chained fillna(inplace=True) / GradScaler in RecBole
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole(\.|$)")
    _apply_distributed()
    _apply_hyper_tuning()
    _apply_checkpoint_loading()
    # shim 14: oneDNN (bf16 matrix products on a CPU) keeps up to 1024 compiled primitives, one per input
    # shape; prompts of every length fill it and the process grows by GBs during LLM training. 64 measured
    # as fast as 1024 with less growth (docs/notes/2026-12-06-quickstart-time-memory.md); a user's own setting wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    for logger_name in FOUR_BIT_KERNEL_FETCH_LOGGERS:
        logging.getLogger(logger_name).addFilter(_drop_4bit_kernel_fetch)
    _applied = True


#: The loggers that report bitsandbytes' fetch of its optional CPU 4-bit kernel (shim 12).
FOUR_BIT_KERNEL_FETCH_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def _drop_4bit_kernel_fetch(record: logging.LogRecord) -> bool:
    """Shim 12: PEFT imports bitsandbytes whenever it is installed, and on a CPU with AVX-512 BF16
    its CPU backend logs ``WARNING Failed to load CPU gemm_4bit_forward from kernels-community:
    Kernel repository 'kernels-community/quantization-bitsandbytes' could not verify publisher trust
    status ...`` at import (offline: ``WARNING Skipping publisher trust check for
    'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode``).
    4-bit runs only on CUDA here (elsewhere ``load_in_4bit`` falls back to LoRA and says so), so
    that optional CPU kernel is never used: those records are dropped."""
    message = record.getMessage()
    return "gemm_4bit_forward" not in message and "quantization-bitsandbytes" not in message


def note_device(config, logger: logging.Logger | None = None) -> None:
    """Log once (INFO: ``use_gpu: True`` is the default, a CPU-only machine is nothing to fix)
    when a GPU was asked for but the run falls back to the CPU."""
    global _device_noted
    wants_gpu = bool(config["use_gpu"]) and str(config["gpu_id"]).strip() != ""
    if wants_gpu and not torch.cuda.is_available() and not _device_noted:
        (logger or logging.getLogger()).info("use_gpu=True but no CUDA device is available: running on the CPU.")
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
    """Shim 5: RecBole's distributed ``_init_device`` with gloo and the CPU when there is no GPU.

    RecBole asserts one ``gpu_id`` per process, creates the process group with ``backend="nccl"``
    and puts the model on ``cuda:<local_rank>``: without CUDA it fails with ``AssertionError``
    (``assert len(gpu_id.split(",")) >= nproc``) or ``RuntimeError: Distributed package doesn't
    have NCCL built in``. Without CUDA (or with ``use_gpu: False`` or an empty ``gpu_id``) the
    same process group is created with ``gloo`` and the device is the CPU."""

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
    """Shim 6: ``DistributedDataParallel`` without ``device_ids`` (and no SyncBatchNorm) on the CPU.

    RecBole builds ``DistributedDataParallel(model, device_ids=[local_rank])`` after
    ``SyncBatchNorm.convert_sync_batchnorm``: for a CPU model DDP raises ``ValueError:
    DistributedDataParallel device_ids and output_device arguments only work with ... GPU
    modules or CPU modules, but got device_ids [0]``, and BatchNorm ``ValueError: SyncBatchNorm
    layers only work with GPU modules``. BatchNorm stays BatchNorm (DDP broadcasts its buffers)."""

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
    """Shim 7: RecBole's zero-valued loss that touches every parameter, over those that train.

    ``sync_grad_loss`` adds ``sum(param) * 0`` in place over ALL parameters: with a complex
    parameter (LRURec's recurrence) it fails with ``RuntimeError: result type ComplexFloat can't
    be cast to the desired output type Float``, and it sums a frozen LLM's weights too. Here: the
    real part, out of place, over the parameters that train (the sum is 0 either way)."""
    sync_loss = 0
    for param in self.model.parameters():
        if param.requires_grad:
            sync_loss = sync_loss + torch.sum(param).real * 0
    return sync_loss


def _evaluate_with_rank0_checkpoint(original):
    """Shim 8: every rank loads the best checkpoint rank 0 wrote, sent as bytes.

    Only rank 0 saves it, every rank names it after its own clock, and nothing waits for the
    write: in ``evaluate(load_best_model=True)`` another rank fails with ``FileNotFoundError``
    or, reading a half-written file, ``EOFError: Ran out of input``; on another node there is
    no file at all."""

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
    """Shim 9: RecBole's ``ensure_dir`` without the race between two processes (``os.path.exists``
    then ``os.makedirs`` fails now and then with ``FileExistsError: [Errno 17] File exists``)."""
    os.makedirs(dir_path, exist_ok=True)


# ---------------------------------------------------------------- hyper-parameter search (10-11)
def _apply_hyper_tuning() -> None:
    from recbole.trainer import hyper_tuning

    _patch(hyper_tuning, "exhaustive_search", _exhaustive_search_with_generator)
    _patch(hyper_tuning.HyperTuning, "trial", _trial_keeping_a_zero_best)


def _exhaustive_search_with_generator(original):
    """Shim 10: RecBole's ``exhaustive_search`` with ``np.random.RandomState`` meaning ``np.random.default_rng``.

    hyperopt>=0.2.7 samples through the numpy Generator API, so the first trial fails with
    ``AttributeError: 'numpy.random.mtrand.RandomState' object has no attribute 'integers'``.
    The same code object runs with ``np`` bound to a namespace whose ``random.RandomState`` is
    ``default_rng`` (both build a seeded generator from hyperopt's int seed)."""
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
    """Shim 11: ``HyperTuning.trial`` whose best score of 0.0 still counts as a best score.

    ``if not self.best_score:`` means "no trial yet" to RecBole, so a best of 0.0 is replaced by
    the next trial's score whatever it is (with RMSE a worse trial becomes the best)."""

    @functools.wraps(original)
    def trial(self, params):
        status = original(self, params)
        if self.best_score is not None:
            self.best_score = _BestScore(self.best_score)
        return status

    return trial


# ---------------------------------------------------------------- RecBole's loading flow (15)
#: What a RecBole checkpoint pickles besides torch's own types: the Config, the YAML loader class
#: and the enums it keeps, numpy scalars (scores); the model class is allowed by :func:`_is_model_class`.
RECBOLE_CHECKPOINT_GLOBALS = frozenset({
    "recbole.config.configurator.Config", "yaml.loader.FullLoader",
    "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    *(f"recbole.utils.enum_type.{name}" for name in
      ("ModelType", "InputType", "EvaluatorType", "FeatureType", "FeatureSource", "KGDataLoaderState")),
})


def _is_model_class(module: str, name: str) -> bool:
    """A RecBole or recbole-llm model class (its module is imported only under those packages)."""
    if not module.startswith(("recbole.model.", "recbole_llm.model.")):
        return False
    from recbole.model.abstract_recommender import AbstractRecommender

    found = getattr(importlib.import_module(module), name, None)
    return isinstance(found, type) and issubclass(found, AbstractRecommender)


class RecBoleCheckpointUnpickler(pickle.Unpickler):
    """Shim 15: unpickles what RecBole's checkpoints hold, and refuses any other global.

    ``load_data_and_model`` calls ``torch.load(model_file)`` (torch imported inside the function,
    out of shim 1's reach), which on torch>=2.6 fails for every RecBole checkpoint, ours and
    RecBole's: ``_pickle.UnpicklingError: Weights only load failed ... Unsupported operand 149``
    (RecBole saves with pickle protocol 4, which torch's weights-only unpickler cannot read) or
    ``Unsupported global: GLOBAL recbole.config.configurator.Config``. This unpickler (Python's
    "restricting globals" pattern) reads any protocol and rebuilds only torch's weights-only types,
    :data:`RECBOLE_CHECKPOINT_GLOBALS` and model classes: a file naming anything else (``os.system``)
    is refused, as torch's safe default would refuse it."""

    def find_class(self, module, name):
        from torch import _weights_only_unpickler

        path = f"{module}.{name}"
        if path in _weights_only_unpickler._get_allowed_globals() or path in RECBOLE_CHECKPOINT_GLOBALS \
                or _is_model_class(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{path} is not something a RecBole checkpoint holds, so the file was not loaded; load it with "
            "torch.load(path, weights_only=False) only if you trust where it came from.")


#: ``torch.load(..., pickle_module=CHECKPOINT_PICKLE)`` reads a checkpoint with :class:`RecBoleCheckpointUnpickler`.
CHECKPOINT_PICKLE = types.ModuleType("recbole_checkpoint_pickle")
CHECKPOINT_PICKLE.Unpickler = RecBoleCheckpointUnpickler
CHECKPOINT_PICKLE.load = lambda file, **kwargs: RecBoleCheckpointUnpickler(file, **kwargs).load()


def load_recbole_checkpoint(model_file, map_location=None) -> dict:
    """A RecBole checkpoint (ours or RecBole's) read by :class:`RecBoleCheckpointUnpickler`."""
    return torch.load(model_file, map_location=map_location, pickle_module=CHECKPOINT_PICKLE, weights_only=False)


def _apply_checkpoint_loading() -> None:
    import recbole.quick_start
    from recbole.quick_start import quick_start

    _patch(quick_start, "load_data_and_model", _load_data_and_model_reading_checkpoints)
    recbole.quick_start.load_data_and_model = quick_start.load_data_and_model


def _load_data_and_model_reading_checkpoints(original):
    """Shim 15: ``load_data_and_model`` whose ``torch.load(model_file)`` is :func:`load_recbole_checkpoint`
    (any other ``torch.load`` during the call is torch's own)."""

    @functools.wraps(original)
    def load_data_and_model(model_file):
        load = torch.load

        def checkpoint_load(f, *args, **kwargs):
            if f is model_file and not args and not kwargs:
                return load_recbole_checkpoint(model_file)
            return load(f, *args, **kwargs)

        torch.load = checkpoint_load
        try:
            return original(model_file)
        finally:
            torch.load = load

    return load_data_and_model
