"""Which training objective each model supports, checked before any training.

RecBole derives a sequential model's input from ``loss_type``: ``CE`` takes no sampled
negatives, ``BPR`` gets one sampled negative per row (``train_neg_sample_args``). A model
that cannot honour what the user set stops here with one line naming the fix, instead of
training on rows it misreads (e.g. sampled negatives with label 0 taken as true next items).
"""
from __future__ import annotations

from recbole_llm.errors import InputError


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
