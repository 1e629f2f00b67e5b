"""The trainable ("pluggable") part of a model built around a frozen LLM.

A model that mixes in :class:`PluggableMixin` saves and loads only the parameters that
train (LoRA, projections, heads, virtual tokens), so one LLM on disk serves many
datasets and a checkpoint is megabytes, not the LLM's gigabytes. RecBole's Trainer
stores ``model.state_dict()`` and reloads the best one with ``load_state_dict``;
:class:`recbole_llm.trainer.llm_trainer.LLMTrainer` stores the pluggable part instead
and ``load_state_dict`` below accepts it.

:meth:`PluggableMixin.save_pretrained` writes the pluggable part the Hugging Face way, as a
folder: the LLM's LoRA as a PEFT adapter (``adapter_config.json`` and
``adapter_model.safetensors``, which PEFT's ``PeftModel.from_pretrained`` loads onto the
same LLM), the other trained tensors in ``pluggable.safetensors``;
:meth:`PluggableMixin.load_pretrained` reads it back (the ``pluggable_dir`` setting does so
when a model is built).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from recbole_llm.cache_io import atomic_target
from recbole_llm.errors import InputError, MissingInputError

#: The trained tensors of a pluggable part other than the LLM's LoRA, in a save_pretrained folder.
PLUGGABLE_FILE = "pluggable.safetensors"


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)``: how many parameters of ``module`` train, and how many it has."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


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

    def peft_model(self):
        """The PEFT model whose LoRA adapter trains, or None (a model with LoRA overrides this)."""
        return None

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the trainable part to ``folder`` (see the module docstring), through a temp
        folder and one rename."""
        from safetensors.torch import save_file

        peft_model = self.peft_model()
        state = self.trainable_state_dict()
        with atomic_target(folder) as tmp:
            tmp.mkdir()
            if peft_model is not None:
                peft_model.save_pretrained(str(tmp))
                state = {name: tensor for name, tensor in state.items() if "lora_" not in name}
            save_file(state, str(tmp / PLUGGABLE_FILE), metadata={"model": type(self).__name__})

    def load_pretrained(self, folder: str | os.PathLike) -> None:
        """Load what :meth:`save_pretrained` wrote (the same model class on the same LLM)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / PLUGGABLE_FILE
        if not path.is_file():
            raise MissingInputError(f"{folder} has no {PLUGGABLE_FILE}: not a folder that save_pretrained of "
                                    f"{type(self).__name__} wrote.")
        with safe_open(str(path), framework="pt") as f:
            saved_by = (f.metadata() or {}).get("model")
        if saved_by != type(self).__name__:
            raise InputError(f"{folder} holds the pluggable part of {saved_by}, not of {type(self).__name__}")
        state = load_file(str(path))
        peft_model = self.peft_model()
        if peft_model is not None:
            from peft import set_peft_model_state_dict

            loaded = set_peft_model_state_dict(peft_model, load_file(str(folder / "adapter_model.safetensors")))
            if loaded.unexpected_keys:
                raise InputError(f"{folder}'s adapter does not fit this model's LoRA (e.g. {loaded.unexpected_keys[0]})")
            state.update({name: p.detach().cpu() for name, p in self.named_parameters()
                          if p.requires_grad and "lora_" in name})
        self.load_state_dict(state)


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
