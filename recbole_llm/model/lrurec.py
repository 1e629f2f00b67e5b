"""LRURec: Linear Recurrent Units for Sequential Recommendation.

Zhenrui Yue, Yueqi Wang, Zhankui He, Huimin Zeng, Julian McAuley, Dong Wang.
WSDM 2024 (arXiv:2310.02367). Follows the authors' reference design:

* item embedding -> dropout -> LayerNorm; ``n_layers`` blocks of (LRU layer, feed-forward);
* LRU layer: a complex diagonal recurrence ``h_k = lambda * h_{k-1} + gamma * (B x_k + b)``
  with ``lambda = exp(-exp(nu_log) + i exp(theta_log))``, eigenvalues initialised on the
  ring ``r_min <= |lambda| <= r_max`` and ``gamma = sqrt(1 - |lambda|^2)``;
  output ``LayerNorm(dropout(Re(C h + c)) + x)``; the state has ``2 * hidden_size`` complex units;
* the recurrence runs as a log-depth parallel scan over sequences left-padded to a
  power of two, with a mask so that padding never leaks into real positions;
* feed-forward ``LayerNorm(dropout(W2 dropout(GELU(W1 x))) + x)`` with inner size ``4 d``;
* scores: dot product with the tied item embeddings plus an item bias, cross-entropy
  over all items (in chunks of positions whose scores are recomputed in the backward pass when a
  batch's scores would pass 256 MiB: :func:`~recbole_llm.model.objectives.chunked_cross_entropy`).

Training objective, as the authors: cross-entropy at every position of each user's
training sequence (split into windows of ``MAX_ITEM_LIST_LENGTH``). RecBole expands a
sequence into all of its prefixes; LRURec's dataset (``SequenceWindowDataset``) keeps
one row per window, so every target is still predicted exactly once per epoch, with
one pass over each window instead of one per prefix.

``loss_type: BPR`` (beyond the authors, as RecBole's SASRec offers it): RecBole's rows of
every prefix, each with the negatives ``train_neg_sample_args`` draws, and the BPR loss of
the target's score against the negative's at the last position.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from recbole_llm.llm.batching import left_align
from recbole_llm.model.objectives import check_loss_type, chunked_cross_entropy


def parallel_scan(u: torch.Tensor, lamb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """All states of ``h_k = lamb * h_{k-1} * mask_{k-1} + u_k`` in ``log2(L)`` steps.

    ``u``: [B, L, N] complex inputs, ``L`` a power of two; ``lamb``: [N] complex;
    ``mask``: [B, L] bool, False on (left) padding. At level ``i`` each block of
    ``2^i`` positions adds its first half's last state, decayed by ``lamb^1..lamb^(2^(i-1))``,
    to its second half; a masked carry is dropped so padding does not leak.
    """
    batch, length, n = u.shape
    levels = int(math.log2(length))
    if 2**levels != length:
        raise ValueError(f"parallel_scan needs a power-of-two length, got {length}")
    h = u
    powers = lamb.unsqueeze(0)  # lamb^1 .. lamb^(2^(i-1)), [half, N]
    carry_ok = mask.to(u.real.dtype)
    for level in range(1, levels + 1):
        block, half = 2**level, 2 ** (level - 1)
        h = h.reshape(batch * length // block, block, n)
        m = carry_ok.reshape(batch * length // block, block)
        first, second = h[:, :half], h[:, half:]
        carry = first[:, -1:] * m[:, half - 1 : half].unsqueeze(-1)
        h = torch.cat([first, second + powers * carry], dim=1)
        powers = torch.cat([powers, powers * powers[-1]], dim=0)
    return h.reshape(batch, length, n)


def sequential_scan(u: torch.Tensor, lamb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Step-by-step reference of :func:`parallel_scan` (used by the tests)."""
    states, h = [], torch.zeros_like(u[:, 0])
    for k in range(u.size(1)):
        h = u[:, k] + (lamb * h if k > 0 else 0)
        states.append(h)
        h = h * mask[:, k].unsqueeze(-1)
    return torch.stack(states, dim=1)


class LRULayer(nn.Module):
    """One linear recurrent unit with residual connection and LayerNorm."""

    def __init__(self, hidden_size: int, dropout: float, r_min: float = 0.8, r_max: float = 0.99):
        super().__init__()
        state_size = 2 * hidden_size
        u1, u2 = torch.rand(state_size), torch.rand(state_size)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = torch.log(u2 * 2 * math.pi)
        modulus = torch.exp(-torch.exp(nu_log))
        gamma_log = torch.log(torch.sqrt(1 - modulus**2))
        self.params_log = nn.Parameter(torch.stack([nu_log, theta_log, gamma_log]))
        self.in_proj = nn.Linear(hidden_size, state_size, dtype=torch.cfloat)
        self.out_proj = nn.Linear(state_size, hidden_size, dtype=torch.cfloat)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_size)

    def eigenvalues(self) -> torch.Tensor:
        nu, theta, _ = torch.exp(self.params_log)
        return torch.exp(torch.complex(-nu, theta))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gamma = torch.exp(self.params_log[2])
        u = self.in_proj(x.to(torch.cfloat)) * gamma
        h = parallel_scan(u, self.eigenvalues(), mask)
        return self.layer_norm(self.dropout(self.out_proj(h).real) + x)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(hidden_size, inner_size)
        self.w_2 = nn.Linear(inner_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.dropout(F.gelu(self.w_1(x)))
        return self.layer_norm(self.dropout(self.w_2(inner)) + x)


class LRURec(SequentialRecommender):
    """LRURec as a RecBole sequential recommender (see the module docstring)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        check_loss_type(config, "LRURec", ("CE", "BPR"))
        self.loss_type = config["loss_type"]
        self.hidden_size = config["hidden_size"]
        self.n_layers = config["n_layers"]
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.embedding_dropout = nn.Dropout(config["dropout_prob"])
        self.embedding_norm = nn.LayerNorm(self.hidden_size)
        self.lru_layers = nn.ModuleList(
            LRULayer(self.hidden_size, config["attn_dropout_prob"], config["r_min"], config["r_max"])
            for _ in range(self.n_layers)
        )
        self.feed_forwards = nn.ModuleList(
            PositionwiseFeedForward(self.hidden_size, 4 * self.hidden_size, config["dropout_prob"])
            for _ in range(self.n_layers)
        )
        self.item_bias = nn.Parameter(torch.zeros(self.n_items))
        self.loss_fct = BPRLoss()  # loss_type BPR; CE: chunked_cross_entropy (calculate_loss)
        self._init_weights()

    def _init_weights(self):
        # Truncated normal as in the authors' code (std 0.02, +-2 std) for real-valued weights.
        for name, param in self.named_parameters():
            if "params_log" in name or "layer_norm" in name or "embedding_norm" in name:
                continue
            if param.is_complex():
                real, imag = torch.empty_like(param.real), torch.empty_like(param.real)
                nn.init.trunc_normal_(real, std=0.02, a=-0.04, b=0.04)
                nn.init.trunc_normal_(imag, std=0.02, a=-0.04, b=0.04)
                with torch.no_grad():
                    param.copy_(torch.complex(real, imag))
            elif name != "item_bias":
                nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Hidden state at every position, [B, L, d], of LEFT-padded item sequences."""
        length = items.size(1)
        padded = 2 ** math.ceil(math.log2(max(length, 2)))
        items = F.pad(items, (padded - length, 0))
        mask = items > 0
        x = self.embedding_norm(self.embedding_dropout(self.item_embedding(items)))
        for lru, ffn in zip(self.lru_layers, self.feed_forwards):
            x = ffn(lru(x, mask))
        return x[:, -length:]

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """User representation: the state after the last item of each history, [B, d]."""
        return self.encode(left_align(item_seq, item_seq_len))[:, -1]

    def _scores(self, states: torch.Tensor) -> torch.Tensor:
        return states @ self.item_embedding.weight.t() + self.item_bias

    def calculate_loss(self, interaction):
        """Cross-entropy at every real position of the window: each position predicts the
        next item, the last one the row's target (see :mod:`recbole_llm.data.sequence_windows`).
        With BPR: the target's score above the sampled negative's, at the last position."""
        if self.loss_type == "BPR":
            user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
            return self.loss_fct(self._item_scores(user, interaction[self.POS_ITEM_ID]),
                                 self._item_scores(user, interaction[self.NEG_ITEM_ID]))
        items = left_align(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        labels = torch.cat([items[:, 1:], interaction[self.POS_ITEM_ID].unsqueeze(1)], dim=1)
        real = items > 0
        states = self.encode(items)[real]
        return chunked_cross_entropy(states, labels[real], self._scores, self.n_items)

    def _item_scores(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of one item per user, [B]: the same as :meth:`_scores` at those items."""
        return (user * self.item_embedding(items)).sum(-1) + self.item_bias[items]

    def predict(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self._item_scores(user, interaction[self.ITEM_ID])

    def full_sort_predict(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self._scores(user)
