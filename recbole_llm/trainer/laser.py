"""Laser's two training phases (Zhang et al., arXiv:2409.01605) on RecBole's epoch loop.

Phase 1 trains the item side (``model.item_side_parameters()``: the item suffix and its projection,
or the title projection) at ``item_phase_learning_rate`` for ``item_phase_epochs`` passes over its
rows, against user vectors from the held user side (``model.phase_one_users``), computed once
before the first pass: the model's own (``scoring: paper``: one LLM pass over ``item_phase_rows``
random rows), or the frozen SASRec's over every row (``scoring: residual``, no LLM pass). It then
validates once and keeps that checkpoint as the best so far. Phase 2 is :class:`LLMTrainer`'s
``fit``: the user side trains, the item side held (no gradient, out of the optimizer) or slowed
(``item_side_lr_scale``), and a phase-2 epoch replaces the checkpoint only when it validates better.
A resumed run (best result already set) skips phase 1: its weights are in the resume state.
"""
from __future__ import annotations

import torch
from recbole.utils import set_color
from tqdm import tqdm

from recbole_llm.trainer.llm_trainer import LLMTrainer


class LaserTrainer(LLMTrainer):
    resumable_fit = True  # runs RecBole's epoch loop after phase 1 (recbole_llm.trainer.resume)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        epochs = int(self.config["item_phase_epochs"])
        if epochs and self.model.item_side_parameters() and self.start_epoch == 0 and self.best_valid_result is None:
            self.item_phase(train_data, epochs, show_progress)
            if valid_data is not None:
                score, result = self._valid_epoch(valid_data, show_progress=show_progress)
                self.best_valid_score, self.best_valid_result = score, result
                if verbose:
                    self.logger.info(set_color("phase 1 (item side) valid", "green") + f": {dict(result)}")
                if saved:
                    self._save_checkpoint(-1, verbose=verbose)
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    @torch.no_grad()
    def _phase_one_users(self, dataset, batch_size, show_progress=False):
        """Phase 1's rows: the held user side's vector and the target of each (all rows for ``residual``,
        ``item_phase_rows`` random ones otherwise), computed once in evaluation mode."""
        model = self.model
        inter = dataset.inter_feat
        rows = torch.arange(len(inter))
        cap = self.config["item_phase_rows"]
        if model.scoring != "residual" and cap and cap < len(inter):
            rows = torch.randperm(len(inter))[:cap].sort().values
        model.eval()
        users, targets = [], []
        for chunk in tqdm(rows.split(batch_size), desc="Laser phase 1, user vectors", disable=not show_progress):
            part = inter[chunk].to(self.device)
            users.append(model.phase_one_users(part[model.ITEM_SEQ], part[model.ITEM_SEQ_LEN]))
            targets.append(part[model.POS_ITEM_ID])
        return torch.cat(users), torch.cat(targets)

    def item_phase(self, train_data, epochs, show_progress=False):
        """Phase 1: Adam on the item side only, every phase-1 row once per epoch, shuffled."""
        model = self.model
        batch_size = self.config["item_phase_batch_size"] or self.config["train_batch_size"]
        users, targets = self._phase_one_users(train_data._dataset, self.config["eval_batch_size"], show_progress)
        params = model.item_side_parameters()
        optimizer = torch.optim.Adam(params, lr=float(self.config["item_phase_learning_rate"]))
        held = model.item_side_held
        model.item_side_held = False
        model.train()
        try:
            for epoch in range(epochs):
                order = torch.randperm(len(targets), device=users.device)
                chunks = order.split(batch_size)
                total = 0.0
                for chunk in tqdm(chunks, desc=f"Laser phase 1, epoch {epoch}", disable=not show_progress):
                    optimizer.zero_grad()
                    loss = model.item_phase_loss(users[chunk], targets[chunk])
                    self._check_nan(loss)
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(chunk)
                self.logger.info(
                    set_color(f"phase 1 (item side) epoch {epoch}", "green")
                    + f": {len(targets)} rows, cross-entropy {total / len(targets):.4f}"
                )
        finally:
            model.item_side_held = held
