"""How many training interactions each item and each user has, and which, from a training split.

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
    users, items = _training_pairs(dataset)
    return (torch.bincount(items, minlength=dataset.item_num),
            torch.bincount(users, minlength=dataset.user_num))


def training_sequences(dataset) -> list[list[int]]:
    """Each user's whole training sequence in time order (internal ids; index = user id), whatever
    ``MAX_ITEM_LIST_LENGTH`` keeps of it in the rows: the first item, then every row's target, from
    a training split with one row per prefix in time order (RecBole's sequential datasets)."""
    if getattr(dataset, SAVED_COUNTS, None) is not None:
        raise ValueError("training_sequences needs one training row per prefix; this split keeps fewer rows")
    inter = dataset.inter_feat
    first = inter[dataset.item_list_length_field] == 1
    sequences = [[] for _ in range(dataset.user_num)]
    for user, item in zip(inter[dataset.uid_field][first].tolist(), inter[dataset.item_id_list_field][first, 0].tolist()):
        sequences[user].append(item)
    for user, item in zip(inter[dataset.uid_field].tolist(), inter[dataset.iid_field].tolist()):
        sequences[user].append(item)
    return sequences


def item_sets(sequences: list[list[int]], n_items: int) -> torch.Tensor:
    """The items of each sequence as a sparse ``[len(sequences), n_items]`` matrix of ones."""
    users = [user for user, sequence in enumerate(sequences) for _ in sequence]
    pairs = torch.tensor([users, [item for sequence in sequences for item in sequence]], dtype=torch.long)
    return torch.sparse_coo_tensor(pairs, torch.ones(pairs.size(1)), (len(sequences), n_items),
                                   check_invariants=True).coalesce()


def _training_pairs(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(user ids, item ids)`` of every training interaction: each row's target and, for
    sequential rows, each user's first item (the one no row has as its target)."""
    inter = dataset.inter_feat
    items, users = inter[dataset.iid_field], inter[dataset.uid_field]
    length_field = getattr(dataset, "item_list_length_field", None)
    list_field = getattr(dataset, "item_id_list_field", None)
    if length_field in inter and list_field in inter:  # sequential rows: add each user's first item
        first = inter[length_field] == 1
        items = torch.cat([items, inter[list_field][first, 0]])
        users = torch.cat([users, inter[dataset.uid_field][first]])
    return users, items
