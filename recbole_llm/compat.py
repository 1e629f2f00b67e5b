"""Every shim RecBole 1.2.1 needs on today's torch / numpy stack, in one place.

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
"""
from __future__ import annotations

import functools
import logging
import sys
import warnings

import torch

_applied = False
_device_noted = False


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
    import recbole.model.sequential_recommender  # noqa: F401  (imports sine.py once)

    torch.autograd.set_detect_anomaly(False)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole(\.|$)")
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
