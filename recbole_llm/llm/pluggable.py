"""The trainable ("pluggable") part of a model built around a frozen LLM.

A model that mixes in :class:`PluggableMixin` saves and loads only the parameters that
train (LoRA, projections, heads, virtual tokens), so one LLM on disk serves many
datasets and a checkpoint is megabytes, not the LLM's gigabytes. RecBole's Trainer
stores ``model.state_dict()`` and reloads the best one with ``load_state_dict``;
:class:`recbole_llm.trainer.llm_trainer.LLMTrainer` stores the pluggable part instead
and ``load_state_dict`` below accepts it.
"""
from __future__ import annotations

import os

import torch

from recbole_llm.cache_io import atomic_save
from recbole_llm.errors import InputError


class PluggableMixin:
    """For ``nn.Module`` subclasses whose frozen parts never change after construction."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that train, by their ``state_dict`` names, detached on the CPU."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A full state dict as ``nn.Module`` does, or exactly the trainable part."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        if set(state_dict) == trainable:
            own = self.state_dict()
            mismatched = [k for k, v in state_dict.items() if v.shape != own[k].shape]
            if mismatched:
                raise InputError(f"pluggable weights do not fit this model (shape differs for {mismatched[:3]})")
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save_pluggable(self, path: str | os.PathLike) -> None:
        """Write the trainable part to one file (temp file, then rename)."""
        atomic_save({"model": type(self).__name__, "state_dict": self.trainable_state_dict()}, path)

    def load_pluggable(self, path: str | os.PathLike) -> None:
        """Load what :meth:`save_pluggable` wrote."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("model") != type(self).__name__:
            raise InputError(f"{path} holds pluggable weights of {saved.get('model')}, not {type(self).__name__}")
        self.load_state_dict(saved["state_dict"])


def rows_fraction(rows_per_epoch, n_rows: int) -> float:
    """The share of each training batch to keep so an epoch sees ``rows_per_epoch`` rows (1.0 = all)."""
    if not rows_per_epoch or not n_rows:
        return 1.0
    return min(1.0, int(rows_per_epoch) / n_rows)


def sample_rows(interaction, fraction: float):
    """A uniformly random ``fraction`` of ``interaction``'s rows (stochastic rounding, at least one).

    The CPU budget of the LLM models (setting ``train_rows_per_epoch``): every batch of RecBole's
    shuffled training rows keeps its share, so an epoch sees that many rows on average.
    """
    if fraction >= 1.0:
        return interaction
    batch = interaction.length
    keep = max(1, min(batch, int(batch * fraction + torch.rand(()).item())))
    return interaction[torch.randperm(batch)[:keep]]
