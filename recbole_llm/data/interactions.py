"""How many training interactions each item and each user has, from a training split.

RecBole's sequential datasets hold one training row per target (every prefix of a user's
training sequence), so counting the targets misses each user's first interaction; it is the
one item of the row whose history has length 1. :class:`~recbole_llm.data.sequence_windows.SequenceWindowDataset`
keeps fewer rows, so it records these counts before it drops any (:data:`SAVED_COUNTS`).
"""
from __future__ import annotations

import torch

#: Attribute under which a training split keeps counts made before its rows were thinned.
SAVED_COUNTS = "training_interactions"


def training_interactions(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per item id, per user id)`` training interactions of the training split ``dataset``
    (internal ids; index 0 is padding)."""
    saved = getattr(dataset, SAVED_COUNTS, None)
    if saved is not None:
        return saved
    inter = dataset.inter_feat
    items, users = inter[dataset.iid_field], inter[dataset.uid_field]
    length_field = getattr(dataset, "item_list_length_field", None)
    list_field = getattr(dataset, "item_id_list_field", None)
    if length_field in inter and list_field in inter:  # sequential rows: add each user's first item
        first = inter[length_field] == 1
        items = torch.cat([items, inter[list_field][first, 0]])
        users = torch.cat([users, inter[dataset.uid_field][first]])
    return (torch.bincount(items, minlength=dataset.item_num),
            torch.bincount(users, minlength=dataset.user_num))
