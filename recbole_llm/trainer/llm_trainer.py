"""RecBole's Trainer for models around a frozen LLM (E4SRec, Laser, the LlamaRec ranker).

Changes to ``recbole.trainer.Trainer``: the optimizer receives only the parameters that
train (RecBole would hand it the frozen LLM's too), in the model's own groups where it has
them (``model.optimizer_groups()``: each group's learning rate is ``learning_rate`` times its
``lr_scale``); checkpoints hold only the model's pluggable part
(:class:`recbole_llm.llm.pluggable.PluggableMixin`), written atomically, and the same part the
Hugging Face way in a folder beside it (``<checkpoint>.pluggable``: a PEFT adapter for the
LLM's LoRA, safetensors for the rest; the ``pluggable_dir`` setting loads it);
``gradient_accumulation_steps`` sums the gradients of that many batches into one optimizer
step (each batch's loss divided by the number of batches in the step, so a step equals one
batch of all their rows when the batches are equally large); and the learning rate follows
``lr_schedule`` per optimizer step after ``warmup_steps`` of linear warm-up, as HF's Trainer
does for E4SRec's authors (RecBole keeps it constant). Everything else (epochs, early
stopping, evaluation, logging) is RecBole's.
"""
from __future__ import annotations

import math
from pathlib import Path

from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_llm import distributed
from recbole_llm.cache_io import atomic_save, unique_checkpoint_name
from recbole_llm.errors import InputError


def cosine_factor(step: int, total: int) -> float:
    """Half a cosine from 1 (step 0) to 0 (step ``total``); HF's ``get_cosine_schedule_with_warmup``
    without warm-up."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def linear_factor(step: int, total: int) -> float:
    """A straight line from 1 (step 0) to 0 (step ``total``), 0 after; HF's
    ``get_linear_schedule_with_warmup`` without warm-up (LlamaRec's ranker)."""
    return max(0.0, (total - step) / max(1, total))


#: The decays after warm-up, by name: ``lr_schedule``'s values (cosine) and the ranker's (linear).
DECAYS = {"linear": linear_factor, "cosine": cosine_factor}


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The learning rate's factor at optimizer step ``step`` of ``total``: linear warm-up from 0 over
    ``warmup`` steps, then constant, or a straight line or half a cosine to 0 over the remaining steps
    (HF's ``get_constant_schedule_with_warmup``, ``get_linear_schedule_with_warmup``,
    ``get_cosine_schedule_with_warmup``). The one schedule of every trainer here."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return DECAYS[schedule](step - warmup, total - warmup)


class LLMTrainer(Trainer):
    #: Beside each checkpoint ``<name>.pth``, the model's trained parts as a folder ``<name><suffix>``
    #: (:meth:`~recbole_llm.llm.pluggable.PluggableMixin.save_pretrained`).
    pretrained_suffix = ".pluggable"

    def __init__(self, config, model):
        super().__init__(config, model)
        self.saved_model_file = unique_checkpoint_name(self.saved_model_file)  # runs started together differ
        self.lr_schedule = config["lr_schedule"]
        self.world_size = distributed.world_size(config)

    def _backward(self, compute_loss):
        """``compute_loss()`` and its backward pass, the DDP way of RecBole's ``_train_epoch`` in a
        distributed run: first the reduce hook (DDP then averages the gradients over the ranks) and a
        zero term on every parameter (so every rank reduces the same ones). Returns the loss."""
        sync = 0
        if self.world_size > 1:
            self.set_reduce_hook()
            sync = self.sync_grad_loss()
        loss = compute_loss()
        (loss + sync).backward()
        return loss

    # Read when an epoch runs: the models whose trainer runs RecBole's epoch loop (E4SRec, Laser) set them in
    # their property files; LlamaRec's ranker has its own loop and settings.
    @property
    def accumulation(self) -> int:
        steps = self.config["gradient_accumulation_steps"]
        if steps > 1 and not self.config["single_spec"]:
            raise InputError("gradient_accumulation_steps > 1 runs in one process; set it to 1 for a distributed run")
        return steps

    @property
    def warmup_steps(self) -> int:
        return self.config["warmup_steps"]

    def _build_optimizer(self, **kwargs):
        if "params" not in kwargs:
            groups = getattr(self.model, "optimizer_groups", None)
            if groups is None:
                kwargs["params"] = [p for p in self.model.parameters() if p.requires_grad]
            else:
                lr = kwargs.get("learning_rate", self.learning_rate)
                kwargs["params"] = [dict(group, lr=lr * group.get("lr_scale", 1.0)) for group in groups()]
        return super()._build_optimizer(**kwargs)

    def _steps_per_epoch(self, train_data) -> int:
        return math.ceil(len(train_data) / self.accumulation)

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        """RecBole's epoch with gradient accumulation; with a schedule or warm-up each optimizer step
        first sets the learning rate for its global step ``epoch_idx * steps + k`` of ``epochs * steps``
        (a function of the epoch, so a resumed run continues the same curve)."""
        if self.lr_schedule == "constant" and not self.warmup_steps:
            return self._accumulating_epoch(train_data, epoch_idx, *args, **kwargs)
        steps = self._steps_per_epoch(train_data)
        step = epoch_idx * steps

        def set_learning_rate(optimizer, *_):
            nonlocal step
            factor = lr_factor(self.lr_schedule, step, self.epochs * steps, self.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate * group.get("lr_scale", 1.0) * factor
            step += 1

        handle = self.optimizer.register_step_pre_hook(set_learning_rate)
        try:
            return self._accumulating_epoch(train_data, epoch_idx, *args, **kwargs)
        finally:
            handle.remove()

    def _accumulating_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        """RecBole's ``_train_epoch`` (loss parts summed per part over the epoch, NaN check, clipping),
        with one optimizer step per ``gradient_accumulation_steps`` batches."""
        if self.accumulation == 1:
            return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        total_loss = None
        batches = len(train_data)
        iter_data = (
            tqdm(train_data, total=batches, ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"))
            if show_progress else train_data
        )
        self.optimizer.zero_grad()
        for batch_idx, interaction in enumerate(iter_data):
            interaction = interaction.to(self.device)
            losses = loss_func(interaction)
            if isinstance(losses, tuple):
                loss = sum(losses)
                parts = tuple(part.item() for part in losses)
                total_loss = parts if total_loss is None else tuple(map(sum, zip(total_loss, parts)))
            else:
                loss = losses
                total_loss = losses.item() if total_loss is None else total_loss + losses.item()
            self._check_nan(loss)
            group_start = batch_idx - batch_idx % self.accumulation
            in_step = min(self.accumulation, batches - group_start)  # the last step may hold fewer batches
            (loss / in_step).backward()
            if batch_idx + 1 - group_start == in_step:
                if self.clip_grad_norm:
                    clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return total_loss

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
        self.model.save_pretrained(Path(saved_model_file).with_suffix(self.pretrained_suffix))
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")
