"""The losses of SeRALM's alignment training (Eq. 5-9 of "Enhancing Sequential Recommenders with
Augmented Knowledge from Aligned Large Language Models", Ren et al., SIGIR 2024,
doi:10.1145/3626772.3657782): per-token log-probabilities of sampled knowledge, the per-token KL
to the original LLM, the LLM's loss (with PPO's clipped importance ratio for stale samples) and
the knowledge-free recommender's ``log p(y|x)``. Pure functions of tensors and modules; the
module docstring of :mod:`recbole_llm.trainer.alignment` says how they fit together.
"""
from __future__ import annotations

import torch

from recbole_llm.llm.batching import position_ids


def token_log_probs(model, prompt_ids, prompt_mask, new_ids, new_mask, full: bool = False):
    """Log-probabilities of the generated tokens ``new_ids`` after left-padded prompts.

    Returns ``(log p(t_k|x,t_c) [N, T], log p(.|x,t_c) [N, T, V] or None)``; position ids skip
    the padding, as in generation.
    """
    ids = torch.cat([prompt_ids, new_ids], dim=1)
    mask = torch.cat([prompt_mask, new_mask.to(prompt_mask.dtype)], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    prompt_len = prompt_ids.size(1)
    log_probs = logits[:, prompt_len - 1:-1].float().log_softmax(dim=-1)
    chosen = log_probs.gather(-1, new_ids.unsqueeze(-1)).squeeze(-1)
    return chosen, (log_probs if full else None)


def per_token_kl(log_probs_align: torch.Tensor, log_probs_orig: torch.Tensor) -> torch.Tensor:
    """KL(p_align || p_orig) over the vocabulary at every position, [N, T]."""
    return (log_probs_align.exp() * (log_probs_align - log_probs_orig)).sum(dim=-1)


def reward_ratio(log_p_rec, log_p_ref, ratio_clip: float | None = None) -> torch.Tensor:
    """Eq. 6's weight ``p(y|x,s) / p(y|x)`` (no gradient), clipped above at ``ratio_clip`` when given."""
    ratio = (log_p_rec - log_p_ref).detach().exp()
    return ratio.clamp(max=float(ratio_clip)) if ratio_clip else ratio


def advantage(log_p_rec, log_p_current, log_p_ref, ratio_clip: float | None = None) -> torch.Tensor:
    """The per-instance advantage ``w(s) - w(s_now)``, ``w(.) = p(y|x, .) / p(y|x)`` [B].

    ``s`` is the sampled knowledge, ``s_now`` the knowledge the item has now, both scored by the
    same recommender for the same instance (``log_p_rec``, ``log_p_current``), so the offset
    between that recommender and the knowledge-free one (``log_p_ref``) cancels and the sign says
    whether ``s`` helps this user's target more than the item's current knowledge does. The
    baseline ``w(s_now)`` does not depend on ``s``, so the expected gradient is Eq. 6's (as in
    self-critical training, Rennie et al., "Self-critical Sequence Training for Image Captioning",
    arXiv:1612.00563, whose baseline is the current model's greedy output; here the current
    knowledge is the greedy answer that made the cache, and costs no extra generation). It keeps
    Eq. 6's scale ``1 / p(y|x)`` and matches Eq. 10's ``p(y|x,t_c,t_k) / p(y|x,t_c) - 1`` in sign.
    """
    return reward_ratio(log_p_rec, log_p_ref, ratio_clip) - reward_ratio(log_p_current, log_p_ref, ratio_clip)


def alignment_loss(logp_align, logp_orig, mask, log_p_rec, log_p_ref, log_p_current, kl_coef: float = 0.1,
                   ratio_clip: float | None = None, kl_tokens=None, logp_old=None,
                   importance_clip: float | None = None):
    """The LLM's loss whose gradient descent is the update of Eq. 8 (see the module docstring).

    ``logp_align`` [B, T] (with gradient) and ``logp_orig`` [B, T]: per-token log-probabilities of
    each instance's sampled knowledge (its resampled items' texts side by side) under the aligned
    and the original LLM; ``mask`` [B, T] marks real tokens; ``log_p_rec`` = log p(y|x,s),
    ``log_p_ref`` = log p(y|x) and ``log_p_current`` = log p(y|x,s_now), [B]: the advantage is
    :func:`advantage`. ``kl_tokens`` [B, T] (the ``full`` estimator) replaces the sampled-token KL
    term. ``logp_old`` [B, T]: the tokens' log-probabilities under the LLM that sampled them (a
    generator snapshot); each token's term is weighted by its importance ratio
    ``rho_t = pi_current / pi_snapshot`` in PPO's clipped surrogate
    ``min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A)`` with ``eps = importance_clip`` (``None``: no
    clip). ``logp_old=None`` means on-policy (``rho_t = 1``, the plain Eq. 6 gradient). Returns
    ``(loss, stats)``.
    """
    mask = mask.to(logp_align.dtype)
    gain = advantage(log_p_rec, log_p_current, log_p_ref, ratio_clip)
    old = logp_align.detach() if logp_old is None else logp_old.detach()
    rho = (logp_align - old).exp()  # value pi_current / pi_snapshot, gradient rho * grad log pi_current
    surrogate = rho * gain.unsqueeze(1)
    if importance_clip is not None:
        eps = float(importance_clip)
        surrogate = torch.minimum(surrogate, rho.clamp(1.0 - eps, 1.0 + eps) * gain.unsqueeze(1))
    policy = -(surrogate * mask).sum(dim=1).mean()
    if kl_tokens is not None:
        kl = (kl_tokens * mask).sum(dim=1).mean()
        kl_value = kl.detach()
    else:
        log_ratio = (logp_align.detach() - logp_orig.detach()) * mask
        kl = (log_ratio * logp_align * mask).sum(dim=1).mean()
        kl_value = log_ratio.sum(dim=1).mean()
    loss = policy + float(kl_coef) * kl
    tokens = mask.sum().clamp(min=1)
    rho = rho.detach()
    clipped = ((rho - 1).abs() > float(importance_clip)) if importance_clip is not None else torch.zeros_like(rho)
    stats = {"ratio": float(reward_ratio(log_p_rec, log_p_ref, ratio_clip).mean()),
             "advantage": float(gain.mean()), "advantage_std": float(gain.std(unbiased=False)),
             "kl": float(kl_value), "tokens": float(mask.sum(dim=1).mean()),
             "importance": float((rho * mask).sum() / tokens), "clipped": float((clipped * mask).sum() / tokens)}
    return loss, stats


def reference_log_prob(reference, interaction, target_field) -> torch.Tensor:
    """log p(y|x) from the frozen knowledge-free recommender (full softmax, padding excluded)."""
    scores = reference.full_sort_predict(interaction).clone()
    scores[:, 0] = float("-inf")
    return scores.log_softmax(dim=1).gather(1, interaction[target_field].unsqueeze(1)).squeeze(1)
