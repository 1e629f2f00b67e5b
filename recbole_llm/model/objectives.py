"""Which training objective each model supports, checked before any training.

RecBole derives a sequential model's input from ``loss_type``: ``CE`` takes no sampled
negatives, ``BPR`` gets one sampled negative per row (``train_neg_sample_args``). A model
that cannot honour what the user set stops here with one line naming the fix, instead of
training on rows it misreads (e.g. sampled negatives with label 0 taken as true next items).
Also the full-catalogue cross-entropy in bounded memory (:func:`chunked_cross_entropy`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recbole_llm.errors import InputError

#: Score elements (rows x items) :func:`chunked_cross_entropy` holds at once: 2**26 float32 = 256 MiB.
CHUNK_ELEMENTS = 2**26


def check_loss_type(config, model_name: str, supported: tuple[str, ...]) -> None:
    """Raise unless ``config['loss_type']`` is one of ``supported`` and sampled negatives
    come only with a pairwise loss."""
    loss_type = config["loss_type"]
    if loss_type not in supported:
        raise InputError(
            f"{model_name} trains with loss_type {' or '.join(supported)}, not {loss_type!r}: "
            f"set loss_type: {supported[0]}" + (" and train_neg_sample_args: ~." if supported == ("CE",) else ".")
        )
    negatives = config["train_neg_sample_args"] or {}
    if loss_type == "CE" and negatives.get("distribution", "none") not in ("none", None):
        raise InputError(
            f"{model_name} with loss_type CE scores every item and takes no sampled negatives, but "
            f"train_neg_sample_args is {negatives}: set train_neg_sample_args: ~"
            + (" (or loss_type: BPR to train on sampled negatives)." if "BPR" in supported else ".")
        )


def chunked_cross_entropy(states: torch.Tensor, labels: torch.Tensor, scores, n_items: int,
                          chunk_elements: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``scores(states)`` (rows x all items) against ``labels``, holding at most
    ``chunk_elements`` (default :data:`CHUNK_ELEMENTS`) scores at a time: when the rows' scores would
    exceed it, the rows go in chunks whose scores are recomputed in the backward pass (activation
    checkpointing) instead of kept.
    The same loss and gradients as ``F.cross_entropy(scores(states), labels)`` (up to float summation
    order) for one more matrix product; e.g. LRURec's every-position loss, 256 rows x 50 positions x
    100k items, would otherwise hold 5 GB of scores and as much again for their softmax."""
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(n_items, 1))
    if len(states) <= rows:
        return F.cross_entropy(scores(states), labels)

    def chunk_loss(part, part_labels):
        return F.cross_entropy(scores(part), part_labels, reduction="sum")

    total = sum(checkpoint(chunk_loss, states[start:start + rows], labels[start:start + rows], use_reentrant=False)
                for start in range(0, len(states), rows))
    return total / len(states)
