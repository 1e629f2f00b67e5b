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
of the models that train this way, and :class:`LastTargetsDataset` (each user's last
targets only, E4SRec's authors' rows) under E4SRec's.
"""
from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset

from recbole_llm.data.interactions import SAVED_COUNTS, training_interactions


def rows_from_end(user_ids: np.ndarray) -> np.ndarray:
    """For each row (rows of a user in time order): how many rows of the same user follow it."""
    order = np.argsort(user_ids, kind="stable")
    sorted_ids = user_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    sizes = np.diff(np.r_[starts, len(sorted_ids)])
    rank = np.arange(len(sorted_ids)) - np.repeat(starts, sizes)
    from_end = np.empty(len(user_ids), dtype=np.int64)
    from_end[order] = np.repeat(sizes, sizes) - 1 - rank
    return from_end


def window_rows(user_ids: np.ndarray, window: int) -> np.ndarray:
    """Indices of the rows to keep: per user (rows in time order), the last row and
    every ``window``-th row before it."""
    return np.flatnonzero(rows_from_end(user_ids) % window == 0)


def last_rows(user_ids: np.ndarray, per_user: int) -> np.ndarray:
    """Indices of each user's last ``per_user`` rows (rows of a user in time order)."""
    return np.flatnonzero(rows_from_end(user_ids) < per_user)


class SequenceWindowDataset(SequentialDataset):
    """A ``SequentialDataset`` whose training split holds one row per window."""

    def build(self):
        datasets = super().build()
        if self.config["loss_type"] != "CE":
            return datasets
        train = datasets[0]
        setattr(train, SAVED_COUNTS, training_interactions(train))  # counted on every row, for metrics by slice
        keep = window_rows(train.inter_feat[self.uid_field].numpy(), self.config["MAX_ITEM_LIST_LENGTH"])
        train.inter_feat = train.inter_feat[torch.from_numpy(keep)]
        return datasets


class LastTargetsDataset(SequentialDataset):
    """A ``SequentialDataset`` whose training split keeps, per user, the rows of the last
    ``train_targets_per_user`` training targets (E4SRec's authors: every position of the last 50
    items; each row's history is still the whole prefix before its target, cut to
    ``MAX_ITEM_LIST_LENGTH``). ``train_targets_per_user: ~`` keeps every row. Validation and test
    rows are untouched."""

    def build(self):
        datasets = super().build()
        per_user = self.config["train_targets_per_user"]
        if per_user:
            train = datasets[0]
            keep = last_rows(train.inter_feat[self.uid_field].numpy(), int(per_user))
            train.inter_feat = train.inter_feat[torch.from_numpy(keep)]
        return datasets
