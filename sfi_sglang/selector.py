"""The Selector: attention logits of a refresh's queries -> top-k token positions per KV head.

For each refreshed request and KV head: softmax each query's logits over the
candidate region ``[lo, hi)`` (sinks and the live tail are kept anyway and do not
compete), aggregate the probabilities of the KV head's query group with a power
mean (order ``alpha``), mix in a prior on key norms and positions with the
closed-form weight of the reference code (clipped to ``prior_lambda_max``),
optionally spread each score to its neighbours (``neighbor_window``, so spans are
kept), and keep the top-k. Ties go to the earlier position. Batched over requests
of different region lengths (padding is masked); the logits come from
``sfi_sglang.kernels.candidate_logits``.
"""

from __future__ import annotations

import math

import torch

# Prior constants of the reference implementation (LV-NUS/SFI, alpha-fair selector).
NORM_GAMMA = 0.5
POS_WEIGHT = 0.7
POS_POWER = 1.8
POS_ETA = 0.4
POS_BETA = -math.log(0.6) / 0.9


def prior(log_norm: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Prior over candidates from log key norms ``[S, Hkv, N]`` and region lengths ``[S]``
    -> ``[S, Hkv, N]``, each row summing to 1 over its region.

    Favours small key norms and older positions; sharply penalises the last
    candidates before the live tail.
    """
    n = log_norm.shape[-1]
    j = torch.arange(n, device=log_norm.device, dtype=torch.float32)
    u = (j / (lengths.float().unsqueeze(-1) - 1).clamp_min(1)).clamp(max=1.0)  # [S, N]
    log_pos = -POS_BETA * u.pow(POS_POWER) + POS_ETA * torch.log1p(-u)
    x = -NORM_GAMMA * log_norm + POS_WEIGHT * log_pos.unsqueeze(1)
    valid = (j < lengths.unsqueeze(-1)).unsqueeze(1)
    return x.masked_fill(~valid, float("-inf")).softmax(dim=-1)


def mix_prior(f: torch.Tensor, r: torch.Tensor, lambda_max: float) -> torch.Tensor:
    """``(1-lam) f + lam r`` with lam minimising ``sum(mix^2)``, clipped to ``[0, lambda_max]``."""
    ff, fr, rr = (f * f).sum(-1), (f * r).sum(-1), (r * r).sum(-1)
    den = ff - 2 * fr + rr
    lam = torch.where(den > 0, (ff - fr) / den.clamp_min(1e-30), torch.zeros_like(den))
    lam = lam.clamp(0.0, lambda_max).unsqueeze(-1)
    return (1 - lam) * f + lam * r


def spread_to_neighbors(scores: torch.Tensor, window: int) -> torch.Tensor:
    """Average of each score and the best score within +-window (last dim): a peak still
    ranks first, then its neighbours, so top-k keeps spans around strongly attended tokens."""
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pooled = torch.nn.functional.max_pool1d(flat, 2 * window + 1, stride=1, padding=window)
    return 0.5 * (scores + pooled.view_as(scores))


def aggregate(
    logits: torch.Tensor,
    lengths: torch.Tensor,
    alpha: float,
    lambda_max: float = 0.0,
    log_norm: torch.Tensor | None = None,
    neighbor_window: int = 0,
) -> torch.Tensor:
    """Logits ``[S, Hkv, R, N]`` (``-inf`` past each request's region length ``lengths[S]``)
    -> score per KV head and candidate ``[S, Hkv, N]``; ``-1`` past the region."""
    f = logits.softmax(dim=-1).pow(alpha).mean(dim=2).pow(1.0 / alpha)
    f = f / f.sum(dim=-1, keepdim=True)
    if lambda_max > 0:
        f = mix_prior(f, prior(log_norm, lengths), lambda_max)
    if neighbor_window > 0:
        f = spread_to_neighbors(f, neighbor_window)
    valid = torch.arange(f.shape[-1], device=f.device) < lengths.unsqueeze(-1)
    return f.masked_fill(~valid.unsqueeze(1), -1.0)


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k candidates of each row of ``scores [..., N]``, ascending, int32 (``min(k, N)`` per row).

    A stable sort makes ties go to the earlier position, so results are deterministic;
    masked candidates (``-1``) sort last, so a region shorter than ``k`` yields its
    whole region first.
    """
    k = min(k, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values.to(torch.int32)
