"""Nothing lost: an interrupted training run continues where it stopped.

A run writes its resume state (atomically: temp file + rename, so a kill at any moment
leaves the previous state readable) to ``checkpoint_dir/resume/<model>-<dataset>-<what>-<key>.pth``
at every safe point: the start of each epoch for RecBole's epoch loop, each validation
step for the LlamaRec ranker. The state is what the rest of the run depends on: the
weights that train (the pluggable part for LLM models), optimizer (and scheduler), the
epoch or step, early-stopping counter, best score and result so far, the file holding the
best weights, and the random number generators, the training loader's included. So
rerunning the same command after SIGINT, SIGTERM or a kill continues with the very
batches and draws the uninterrupted run would have used, and ends with the same result.

``key`` hashes the settings and data files (:func:`recbole_llm.cache_io.config_key`), and for an LLM
model the precision its LLM computes in here (:func:`resume_path`): a changed setting starts afresh
instead of resuming an unrelated run. ``resume: False``
starts over. A resume state belongs to one run at a time (a lock per key): a second
identical command started while the first trains neither resumes from nor writes it. A
finished run deletes its resume file. Work lost to an interruption: at most one epoch (one
``ranker_eval_step`` for the ranker).
"""
from __future__ import annotations

import contextlib
import functools
import random
from logging import getLogger
from pathlib import Path

import numpy as np
import torch
from recbole.trainer import Trainer

from recbole_llm.cache_io import atomic_save, config_key, content_key, guarded_load, try_lock, unique_checkpoint_name


def resume_path(config, what: str) -> Path:
    """Where the run that ``config`` describes keeps its resume state for stage ``what``. An LLM model's key
    also names how its LLM computes on this machine (``llm_dtype`` resolved: ``auto`` is bfloat16 autocast on
    a CPU with bf16 units, float32 elsewhere), so a state moved to another CPU (a committed checkpoint folder)
    is continued only where it trains in the same precision, never half in one and half in the other."""
    key = config_key(config)
    if "llm_dtype" in config.final_config_dict:
        from recbole_llm.llm.backbone import precision_identity

        key = content_key(key, precision_identity(config), length=16)
    return Path(config["checkpoint_dir"]) / "resume" / f"{config['model']}-{config['dataset']}-{what}-{key}.pth"


def wants_resume(config) -> bool:
    return config["resume"] is not False


def rng_state(loader=None) -> dict:
    """The global generators (torch, numpy, random) and ``loader``'s own shuffling generator."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader is not None and getattr(loader, "generator", None) is not None:
        state["loader"] = loader.generator.get_state()
    return state


def set_rng_state(state: dict, loader=None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader is not None and "loader" in state:
        loader.generator.set_state(state["loader"])


def save_state(path: Path, state: dict) -> None:
    """Write ``state`` so that a reader sees the old file or the new one, never half of one."""
    atomic_save(state, path)


def load_state(path: Path) -> dict | None:
    """The resume state at ``path``; None when there is none, or when it is unreadable (then it
    is logged and removed, and the run starts over)."""
    return guarded_load(path, what="resume state")  # our own file (numpy RNG state inside)


def claim_resume(config, path: Path):
    """The lock of the resume state at ``path`` for this run (release it with :func:`release`),
    or None when another run with the same key holds it (said once). A distributed run's ranks
    share one state through rank 0, so they take no lock."""
    if not config["single_spec"]:
        return contextlib.nullcontext()
    lock = try_lock(path)
    if lock is None:
        getLogger().warning(f"another run with the same settings holds {path}: this run neither resumes from "
                            "nor saves a resume state")
    return lock


def release(claim) -> None:
    if hasattr(claim, "release"):
        claim.release()


def trainable_weights(model) -> dict:
    """The weights a resume must restore: the pluggable part of an LLM model, else all."""
    return model.trainable_state_dict() if hasattr(model, "trainable_state_dict") else model.state_dict()


def trainer_state(trainer, rng: dict, **position) -> dict:
    """The one resume-state format: what every training loop restores (the weights that train, the
    optimizer, the best score so far and its step, the file of the best weights, the random
    generators ``rng`` from :func:`rng_state`), plus the loop's own ``position`` (RecBole's epoch
    loop: the epoch; the LlamaRec ranker: step, examples, pass, scheduler...)."""
    return {
        "state_dict": trainable_weights(trainer.model),
        "optimizer": trainer.optimizer.state_dict(),
        "cur_step": trainer.cur_step,
        "best_valid_score": trainer.best_valid_score,
        "saved_model_file": trainer.saved_model_file,
        "rng": rng,
        **position,
    }


def restore_trainer(trainer, state: dict) -> None:
    """Put back into ``trainer`` what :func:`trainer_state` saved for every loop (not the random
    generators: a loop restores ``state["rng"]`` where its batches need them)."""
    trainer.model.load_state_dict(state["state_dict"])  # an LLM model's load_state_dict takes its pluggable part
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.cur_step, trainer.best_valid_score = state["cur_step"], state["best_valid_score"]
    trainer.saved_model_file = state["saved_model_file"]


class ResumableTrainer:
    """Mixin for a RecBole trainer that runs RecBole's epoch loop (``Trainer.fit``): the
    resume state is saved at the start of every epoch and restored by ``fit``."""

    _resume_file: Path | None = None

    def __init__(self, config, model):
        super().__init__(config, model)
        self.saved_model_file = unique_checkpoint_name(self.saved_model_file)  # runs started together differ

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        path = resume_path(self.config, "fit")
        claim = claim_resume(self.config, path)
        try:
            state = load_state(path) if claim is not None and wants_resume(self.config) else None
            if state is not None:
                self._restore(state, train_data, path)
            self._resume_file = path if claim is not None and self._is_main_process() else None
            result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
            if self._resume_file is not None:
                self._resume_file.unlink(missing_ok=True)
        finally:
            self._resume_file = None
            release(claim)
        return result

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        if self._resume_file is not None:
            save_state(self._resume_file, trainer_state(
                self, rng_state(train_data), epoch=epoch_idx, other_parameter=self.model.other_parameter(),
                best_valid_result=self.best_valid_result,
            ))
        return super()._train_epoch(train_data, epoch_idx, *args, **kwargs)

    def _restore(self, state: dict, train_data, path: Path) -> None:
        restore_trainer(self, state)
        self.model.load_other_parameter(state["other_parameter"])
        self.start_epoch, self.best_valid_result = state["epoch"], state["best_valid_result"]
        set_rng_state(state["rng"], train_data)
        getLogger().info(
            f"resuming {self.config['model']} training at epoch {self.start_epoch} from {path} "
            "(set resume: False to start over)"
        )

    def _is_main_process(self) -> bool:
        return self.config["single_spec"] or self.config["local_rank"] == 0


@functools.cache
def resumable(trainer_class: type) -> type:
    """``trainer_class`` with :class:`ResumableTrainer` mixed in, when it runs RecBole's
    epoch loop (``Trainer.fit``, or a ``fit`` that ends in it and says so with ``resumable_fit``); a
    trainer with its own ``fit`` (LlamaRec's, SeRALM's) handles its stages itself."""
    runs_epoch_loop = trainer_class.fit is Trainer.fit or getattr(trainer_class, "resumable_fit", False)
    if issubclass(trainer_class, ResumableTrainer) or not runs_epoch_loop:
        return trainer_class
    name = f"Resumable{trainer_class.__name__}"  # its own name: a traceback or log tells it from the original
    return type(name, (ResumableTrainer, trainer_class), {"__module__": trainer_class.__module__})
