"""RecBole's Trainer for models around a frozen LLM (E4SRec, Laser, the LlamaRec ranker).

Changes to ``recbole.trainer.Trainer``: the optimizer receives only the parameters that
train (RecBole would hand it the frozen LLM's too); checkpoints hold only the model's
pluggable part (:class:`recbole_llm.llm.pluggable.PluggableMixin`), written atomically; and
``lr_schedule: cosine`` decays the learning rate per optimizer step, as HF's Trainer does for
E4SRec's authors (RecBole keeps it constant). Everything else (epochs, early stopping,
evaluation, logging) is RecBole's.
"""
from __future__ import annotations

import math

from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_llm.cache_io import atomic_save, unique_checkpoint_name
from recbole_llm.errors import InputError

LR_SCHEDULES = ("constant", "cosine")


def cosine_factor(step: int, total: int) -> float:
    """Half a cosine from 1 (step 0) to 0 (step ``total``); HF's ``get_cosine_schedule_with_warmup``
    without warm-up."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


class LLMTrainer(Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.saved_model_file = unique_checkpoint_name(self.saved_model_file)  # runs started together differ
        self.lr_schedule = config["lr_schedule"]
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}")

    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", [p for p in self.model.parameters() if p.requires_grad])
        return super()._build_optimizer(**kwargs)

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        """RecBole's epoch; with ``lr_schedule: cosine`` each optimizer step first sets the learning
        rate for its global step ``epoch_idx * len(train_data) + k`` of ``epochs * len(train_data)``
        (a function of the epoch, so a resumed run continues the same curve)."""
        if self.lr_schedule == "constant":
            return super()._train_epoch(train_data, epoch_idx, *args, **kwargs)
        steps = len(train_data)
        step = epoch_idx * steps

        def set_learning_rate(optimizer, *_):
            nonlocal step
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate * cosine_factor(step, self.epochs * steps)
            step += 1

        handle = self.optimizer.register_step_pre_hook(set_learning_rate)
        try:
            return super()._train_epoch(train_data, epoch_idx, *args, **kwargs)
        finally:
            handle.remove()

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": self.model.trainable_state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }
        atomic_save(state, saved_model_file, pickle_protocol=4)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")
