"""Batches of prompts for a decoder-only LLM: left padding, and a prefix shared by every row.

* :func:`left_align`: RecBole's right-padded item sequences moved to the right end (left padding).
* :func:`left_pad`: token sequences of different lengths, padded on the left with explicit
  position ids (real tokens at 0, 1, ...; :func:`position_ids`), so a padded row scores as it
  would alone.
* :func:`forward_shared_prefix`: rows that start with the same prefix (an instruction) run it
  once, at batch size 1 and with gradients where the model has them; its keys and values are
  repeated for every row, and each row's own tokens follow at positions counted over its real
  tokens (padding sits between the prefix and the row, masked). The same computation as
  feeding ``[prefix | row]`` per row, at a fraction of the prefix's cost.
"""
from __future__ import annotations

import functools
import inspect

import torch


def left_align(item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
    """Move RecBole's right-padded sequences to the right end (left padding with 0)."""
    length = item_seq.size(1)
    index = (torch.arange(length, device=item_seq.device) + item_seq_len.unsqueeze(1)) % length
    return item_seq.gather(1, index)


def left_pad(sequences: list[list[int]], pad_id: int, device=None):
    """``(input_ids, attention_mask, position_ids)`` of ``sequences`` left-padded to the longest."""
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], device=device)
    attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return input_ids, attention, position_ids(attention)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over the real tokens of each row (0, 1, ...; padding gets 0), so a
    left-padded row is seen at the positions it would have alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix every sequence starts with."""
    first, length = sequences[0], min(len(s) for s in sequences)
    for other in sequences[1:]:
        length = next((i for i in range(length) if other[i] != first[i]), length)
    return length


@functools.cache
def cache_keyword(model_class: type) -> str:
    """Transformers 5 renamed the KV-cache argument and output ``past_key_values`` -> ``cache``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _transformers_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_body(model):
    """The transformer body (no LM head) of a causal LM, a PEFT model or a body: LoRA layers
    are injected in place, so the body runs with them."""
    base = _transformers_model(model)
    return base.get_decoder() if hasattr(base, "lm_head") else base


def forward_shared_prefix(model, prefix: dict, rows: dict, rows_mask: torch.Tensor, **kwargs):
    """``model`` on ``[prefix | row]`` for every row (see the module docstring).

    ``prefix``: ``{"input_ids": [1, P]}`` or ``{"inputs_embeds": [1, P, H]}``; ``rows``: the same
    key with ``[B, T]`` / ``[B, T, H]``, left-padded, ``rows_mask`` [B, T] their attention mask.
    Returns the model's output for the row positions (``kwargs`` go to that call).
    """
    keyword = cache_keyword(type(_transformers_model(model)))
    prefix_len = next(iter(prefix.values())).size(1)
    batch, device = rows_mask.size(0), rows_mask.device
    positions = torch.arange(prefix_len, device=device).unsqueeze(0)
    cache = getattr(decoder_body(model)(**prefix, position_ids=positions, use_cache=True), keyword)
    cache.batch_repeat_interleave(batch)
    mask = torch.cat([rows_mask.new_ones(batch, prefix_len), rows_mask], dim=1)
    row_positions = prefix_len + rows_mask.cumsum(dim=1) - 1
    return model(**rows, **{keyword: cache}, attention_mask=mask, position_ids=row_positions, **kwargs)
