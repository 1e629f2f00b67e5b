"""Full-sort scoring in item chunks, for catalogues where an all-item intermediate is large.

A model that scores users against a table built per item (E4SRec's tied head projects every
item's ID embedding into the LLM's hidden size; Laser projects every item's LLM text vector)
would otherwise hold that whole [n_items, hidden] table at once, on top of the [batch, n_items]
scores. :func:`chunked_scores` builds ``score_chunk_items`` items' rows at a time and writes
their scores into the one output tensor, so the extra memory is [chunk, hidden] + [batch, chunk].
The scores are the same dot products (BLAS may round a product of another shape differently in
the last bit).
"""
from __future__ import annotations

from typing import Callable

import torch


def chunked_scores(user: torch.Tensor, item_rows: Callable[[int, int], torch.Tensor], n_items: int,
                   chunk: int) -> torch.Tensor:
    """``user @ item_rows(0, n_items).T`` ([B, n_items]), computed ``chunk`` items at a time.

    ``item_rows(start, end)`` returns the [end - start, d] vectors of items ``start..end-1``. With
    gradients on (training) it is one product: backpropagation keeps every block anyway."""
    if not chunk or chunk >= n_items or torch.is_grad_enabled():  # training: autograd keeps every block anyway
        return user @ item_rows(0, n_items).t()
    scores = None
    for start in range(0, n_items, chunk):
        end = min(start + chunk, n_items)
        block = user @ item_rows(start, end).t()
        if scores is None:
            scores = block.new_empty(user.size(0), n_items)
        scores[:, start:end] = block
    return scores
