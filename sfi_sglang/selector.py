"""The Selector: dense attention of a slow step -> top-k token positions per KV head.

For one request and one layer: softmax each query head's logits over the
candidate region ``[lo, hi)`` (sinks and the live tail are kept anyway and do not
compete), aggregate the probabilities of a KV head's query group with a power mean
(order ``alpha``), mix in a prior on key norms and positions with the closed-form
weight of the reference code (clipped to ``prior_lambda_max``), optionally spread
each score to its neighbours (``neighbor_window``, so spans are kept), and keep the
top-k per KV head. Ties go to the earlier position. This is the torch reference; a fused
GPU kernel must match it.
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


def prior(keys: torch.Tensor) -> torch.Tensor:
    """Prior over candidates ``[n, Hkv, D]`` -> ``[Hkv, n]`` (rows sum to 1).

    Favours small key norms and older positions; sharply penalises the last
    candidates before the live tail.
    """
    n = keys.shape[0]
    log_norm = keys.float().norm(dim=-1).clamp_min(1e-6).log().T  # [Hkv, n]
    u = torch.arange(n, device=keys.device, dtype=torch.float32) / max(n - 1, 1)
    log_pos = -POS_BETA * u.pow(POS_POWER) + POS_ETA * torch.log1p(-u)
    return (-NORM_GAMMA * log_norm + POS_WEIGHT * log_pos).softmax(dim=-1)


def mix_prior(f: torch.Tensor, r: torch.Tensor, lambda_max: float) -> torch.Tensor:
    """``(1-lam) f + lam r`` with lam minimising ``sum(mix^2)``, clipped to ``[0, lambda_max]``."""
    ff, fr, rr = (f * f).sum(-1), (f * r).sum(-1), (r * r).sum(-1)
    den = ff - 2 * fr + rr
    lam = torch.where(den > 0, (ff - fr) / den.clamp_min(1e-30), torch.zeros_like(den))
    lam = lam.clamp(0.0, lambda_max).unsqueeze(-1)
    return (1 - lam) * f + lam * r


def spread_to_neighbors(scores: torch.Tensor, window: int) -> torch.Tensor:
    """Average of each score and the best score within +-window: a peak still ranks
    first, then its neighbours, so top-k keeps spans around strongly attended tokens."""
    pooled = torch.nn.functional.max_pool1d(scores.unsqueeze(1), 2 * window + 1, stride=1, padding=window)
    return 0.5 * (scores + pooled.squeeze(1))


def group_scores(
    q: torch.Tensor,
    keys: torch.Tensor,
    sm_scale: float,
    alpha: float,
    lambda_max: float,
    logit_cap: float = 0.0,
    neighbor_window: int = 0,
) -> torch.Tensor:
    """Aggregated score per KV head and candidate.

    q: ``[W, Hq, D]`` queries of one request (W = 1 at a decode slow step, the last
    prompt rows at prefill); keys: ``[n, Hkv, D]`` candidate keys. Returns ``[Hkv, n]``.
    """
    w, hq, d = q.shape
    hkv = keys.shape[1]
    qg = q.float().view(w, hkv, hq // hkv, d).permute(1, 0, 2, 3).reshape(hkv, -1, d)
    logits = torch.einsum("hrd,nhd->hrn", qg, keys.float()) * sm_scale
    if logit_cap > 0:
        logits = logit_cap * torch.tanh(logits / logit_cap)
    p = logits.softmax(dim=-1)
    f = p.pow(alpha).mean(dim=1).pow(1.0 / alpha)
    f = f / f.sum(dim=-1, keepdim=True)
    if lambda_max > 0:
        f = mix_prior(f, prior(keys), lambda_max)
    if neighbor_window > 0:
        f = spread_to_neighbors(f, neighbor_window)
    return f


def topk_positions(scores: torch.Tensor, k: int, lo: int) -> torch.Tensor:
    """Top-k candidates per row of ``scores [Hkv, n]`` as absolute positions, ascending, int32.

    A stable sort makes ties go to the earlier position, so results are deterministic.
    """
    k = min(k, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return (order.sort(dim=-1).values + lo).to(torch.int32)
