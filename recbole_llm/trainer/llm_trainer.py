"""RecBole's Trainer for models around a frozen LLM (E4SRec, Laser, the LlamaRec ranker).

Two changes to ``recbole.trainer.Trainer``: the optimizer receives only the parameters
that train (RecBole would hand it the frozen LLM's too), and checkpoints hold only the
model's pluggable part (:class:`recbole_llm.llm.pluggable.PluggableMixin`), written
atomically. Everything else (epochs, early stopping, evaluation, logging) is RecBole's.
"""
from __future__ import annotations

import os

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color


class LLMTrainer(Trainer):
    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", [p for p in self.model.parameters() if p.requires_grad])
        return super()._build_optimizer(**kwargs)

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
        tmp = f"{saved_model_file}.tmp"
        torch.save(state, tmp, pickle_protocol=4)
        os.replace(tmp, saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")
