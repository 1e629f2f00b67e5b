"""Training on whole sequences with a loss at every position (the LRURec authors' setup).

RecBole's ``SequentialDataset`` turns a user's training sequence into one row per
target (every prefix). A model whose loss covers every position of its input would
see each target many times over. ``SequenceWindowDataset`` keeps, per user, only
the rows whose windows tile the sequence: the last row, then every
``MAX_ITEM_LIST_LENGTH``-th row before it, so each training target is predicted
exactly once per epoch (the same (prefix, target) pairs as RecBole's prefixes, at
a fraction of the cost). Validation and test rows are untouched. A pairwise loss
(``loss_type: BPR``) scores one target per row, so it keeps RecBole's rows of every prefix.

RecBole picks ``<Model>Dataset`` from ``recbole.data.dataset`` when it exists;
:func:`recbole_llm.registry.register_datasets` installs this class under the names
of the models that train this way.
"""
from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset


def window_rows(user_ids: np.ndarray, window: int) -> np.ndarray:
    """Indices of the rows to keep: per user (rows in time order), the last row and
    every ``window``-th row before it."""
    order = np.argsort(user_ids, kind="stable")
    sorted_ids = user_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    sizes = np.diff(np.r_[starts, len(sorted_ids)])
    rank = np.arange(len(sorted_ids)) - np.repeat(starts, sizes)
    from_end = np.repeat(sizes, sizes) - 1 - rank
    return np.sort(order[from_end % window == 0])


class SequenceWindowDataset(SequentialDataset):
    """A ``SequentialDataset`` whose training split holds one row per window."""

    def build(self):
        datasets = super().build()
        if self.config["loss_type"] != "CE":
            return datasets
        train = datasets[0]
        keep = window_rows(train.inter_feat[self.uid_field].numpy(), self.config["MAX_ITEM_LIST_LENGTH"])
        train.inter_feat = train.inter_feat[torch.from_numpy(keep)]
        return datasets
