"""The Selector: a KV head's query-group attention over its candidates -> top-k token positions.

For each refreshed request and KV head, over its candidates (token positions;
``-1`` pads): each query's softmax over the candidates in the region (sinks and the
live tail are kept anyway and do not compete), aggregated over the KV head's query
group with a power mean (order ``alpha``) -- that part is
``sfi_sglang.kernels.group_scores`` --, then here: mix in a prior on key norms and
positions with the closed-form weight of the reference code (clipped to
``prior_lambda_max``), optionally spread each score to its neighbouring positions
(``neighbor_window``, so spans are kept), and keep the top-k, ranked at ``RANK_BITS`` bits of
precision (:func:`coarse`). Ties go to the earlier position.

Candidates are usually a contiguous region ``[lo, hi)``; a request that reuses a
cached selection (``sfi_sglang.radix``) has that selection's positions followed by
the tokens after it. Batched over requests of different candidate counts (padding
is masked); the logits come from ``sfi_sglang.kernels.candidate_logits``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from sfi_sglang.config import SFIConfig

# Prior constants of the reference implementation (LV-NUS/SFI, alpha-fair selector).
NORM_GAMMA = 0.5
POS_WEIGHT = 0.7
POS_POWER = 1.8
POS_ETA = 0.4
POS_BETA = -math.log(0.6) / 0.9

PAD_POSITION = torch.iinfo(torch.int32).max  # where topk_positions puts picked padding: last

# Candidate lists are padded to a multiple of this: the Selector's Triton kernels then always see
# 16-divisible widths and strides, so one compiled specialization serves every context length
# (instead of a second one, compiled mid-serving, for the other lengths) and rows stay aligned.
WIDTH_ALIGN = 16


def aligned(width: int) -> int:
    """``width`` rounded up to a multiple of ``WIDTH_ALIGN``."""
    return -(-width // WIDTH_ALIGN) * WIDTH_ALIGN


def region_positions(lo: torch.Tensor, hi: torch.Tensor, width: int) -> torch.Tensor:
    """Candidates ``[lo, hi)`` of each row, padded with -1 to ``width``: ``[S, 1, width]`` int32."""
    pos = lo.view(-1, 1).int() + torch.arange(width, device=lo.device, dtype=torch.int32)
    return pos.masked_fill(pos >= hi.view(-1, 1), -1).unsqueeze(1)


def restrict(positions: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Candidates ``[S, 1 or Hkv, N]`` outside each row's ``[lo, hi)`` become padding (-1): a refresh
    that scored the whole context ranks only the region."""
    return positions.masked_fill((positions < lo.view(-1, 1, 1)) | (positions >= hi.view(-1, 1, 1)), -1)


def prior(log_norm: torch.Tensor, positions: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Prior over candidates from log key norms ``[S, Hkv, N]`` and their positions in the
    region ``[lo, hi)`` -> ``[S, Hkv, N]``, each row summing to 1 over its candidates.

    Favours small key norms and older positions; sharply penalises the last
    candidates before the live tail.
    """
    span = (hi - lo - 1).clamp_min(1).float().view(-1, 1, 1)
    u = ((positions - lo.view(-1, 1, 1)).float() / span).clamp(0.0, 1.0)
    log_pos = -POS_BETA * u.pow(POS_POWER) + POS_ETA * torch.log1p(-u)
    x = -NORM_GAMMA * log_norm + POS_WEIGHT * log_pos
    return x.masked_fill(positions < 0, float("-inf")).softmax(dim=-1)


def mix_prior(f: torch.Tensor, r: torch.Tensor, lambda_max: float) -> torch.Tensor:
    """``(1-lam) f + lam r`` with lam minimising ``sum(mix^2)``, clipped to ``[0, lambda_max]``."""
    ff, fr, rr = (f * f).sum(-1), (f * r).sum(-1), (r * r).sum(-1)
    den = ff - 2 * fr + rr
    lam = torch.where(den > 0, (ff - fr) / den.clamp_min(1e-30), torch.zeros_like(den))
    lam = lam.clamp(0.0, lambda_max).unsqueeze(-1)
    return (1 - lam) * f + lam * r


def spread_to_neighbors(scores: torch.Tensor, positions: torch.Tensor, window: int,
                        contiguous: bool = False) -> torch.Tensor:
    """Average of each score and the best score of the candidates within +-window positions
    (candidates ascending along the last dim): a peak still ranks first, then its
    neighbours, so top-k keeps spans around strongly attended tokens. ``contiguous``:
    the candidates are consecutive positions (then padding), so a sliding max does it."""
    if contiguous:
        pooled = torch.nn.functional.max_pool1d(scores.reshape(-1, 1, scores.shape[-1]), 2 * window + 1, 1, window)
        return 0.5 * (scores + pooled.view_as(scores))
    pooled = scores.clone()
    for d in range(1, window + 1):
        for a, b in ((slice(d, None), slice(None, -d)), (slice(None, -d), slice(d, None))):
            near = (positions[..., a] - positions[..., b]).abs() <= window
            pooled[..., a] = torch.maximum(pooled[..., a], scores[..., b].masked_fill(~near, float("-inf")))
    return 0.5 * (scores + pooled)


def rank_scores(
    f: torch.Tensor,
    positions: torch.Tensor,
    lambda_max: float = 0.0,
    log_norm: torch.Tensor | None = None,
    region: tuple[torch.Tensor, torch.Tensor] | None = None,
    neighbor_window: int = 0,
    contiguous: bool = False,
    mask: bool = True,
) -> torch.Tensor:
    """Group attention ``f [S, Hkv, N]`` (summing to 1 over the region) of candidates
    at ``positions [S, 1 or Hkv, N]`` (-1: padding or outside the region, see :func:`restrict`)
    -> score per KV head and candidate ``[S, Hkv, N]``; ``-1`` on padding. The prior
    (``lambda_max > 0``) needs the key norms and the candidate ``region`` ``(lo, hi)``;
    ``contiguous``: candidates are consecutive positions (see :func:`spread_to_neighbors`).
    ``mask=False`` leaves padding at its score (0 from ``group_scores``, never above a real one):
    for a top-k that drops padding by position itself (``sfi_sglang.kernels.topk_select``)."""
    if lambda_max > 0:
        f = mix_prior(f, prior(log_norm, positions, *region), lambda_max)
    if neighbor_window > 0:
        f = spread_to_neighbors(f, positions, neighbor_window, contiguous)
    return f.masked_fill(positions < 0, -1.0) if mask else f


RANK_BITS = 7
"""Significant bits of a score the Selector ranks by (8 would be bfloat16's precision): 14-bit keys in
the top-k kernel, its fastest width on an H200 (``results/selector_ab_h200.log``, "Session 20")."""


def scaled(f: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Scores ``f [S, Hkv, N]`` times their rows' ``1 / total [S, Hkv]``: the reciprocal, then one product
    per score, as the top-k kernel rounds them (a multiply per candidate instead of a division)."""
    return f * total.reciprocal().unsqueeze(-1)


def coarse(scores: torch.Tensor) -> torch.Tensor:
    """Float32 scores rounded toward zero to ``RANK_BITS`` significant bits. The Selector ranks
    these: candidates within 2**-(RANK_BITS - 1) of each other (1.6% at 7 bits) may tie (and go
    to the earlier position), which changes nothing that matters here and lets the top-k kernel
    find the k-th score with two radix passes over 8 + RANK_BITS - 1 bit keys instead of four."""
    return (scores.view(torch.int32) & -(1 << (24 - RANK_BITS))).view(torch.float32)


def topk_positions(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the top-k candidates of each row of ``scores [..., N]`` (float32; ranked at
    :func:`coarse` precision), ascending, int32 (``min(k, N)`` per row; picked padding reads
    ``PAD_POSITION`` and sorts last).

    Ties at the k-th score go to the earlier candidates, so results are deterministic; padding
    scores ``-1`` and loses to every real candidate. Only the k-th score is searched for (a
    radix select, ``topk``), not a sort of all candidates: at 32K candidates it is the cheaper part.
    """
    scores = coarse(scores.float())
    k = min(k, scores.shape[-1])
    kth = scores.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above, tie = scores > kth, scores == kth
    ties_wanted = k - above.sum(-1, keepdim=True, dtype=torch.int32)
    take = above | (tie & (_count_along(tie) <= ties_wanted))
    # exactly k taken per row: compact them in candidate order (everything else to a dropped column)
    col = torch.where(take, _count_along(take) - 1, k).long()
    pos = positions.expand_as(scores).int()
    out = torch.empty((*scores.shape[:-1], k + 1), dtype=torch.int32, device=scores.device)
    out.scatter_(-1, col, pos.masked_fill(pos < 0, PAD_POSITION))
    return out[..., :k].sort(dim=-1).values


def _count_along(mask: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Inclusive running count of ``mask [..., N]`` along the last dim, int32. Scanned in blocks
    then offset: a scan of few long rows (batch 1, 128K candidates) is slow on GPUs."""
    n = mask.shape[-1]
    x = torch.nn.functional.pad(mask.to(torch.int32), (0, -n % block)).unflatten(-1, (-1, block))
    inner = x.cumsum(-1, dtype=torch.int32)
    ends = inner[..., -1]
    return (inner + (ends.cumsum(-1, dtype=torch.int32) - ends).unsqueeze(-1)).flatten(-2)[..., :n]


def select(
    f: torch.Tensor,
    positions: torch.Tensor,
    cfg: SFIConfig,
    region: tuple[torch.Tensor, torch.Tensor],
    log_norm: torch.Tensor | None = None,
    contiguous: bool = False,
    fused_topk: Callable[..., torch.Tensor] | None = None,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Selector under ``cfg`` after ``group_scores``: group attention ``f [S, Hkv, N]`` of
    candidates at ``positions`` (ascending; only those in the ``region`` ``(lo, hi)`` are ranked;
    scaled by ``1 / total [S, Hkv]`` if given: :func:`scaled`) -> ``[S, Hkv, min(topk, N)]`` selected positions (see
    :func:`topk_positions`). ``fused_topk`` (``sfi_sglang.kernels.topk_select``) does the top-k, the
    region, the scaling and the neighbour spread in its launches instead of these torch ops."""
    fused_window = cfg.neighbor_window if fused_topk is not None else 0
    if fused_topk is None or cfg.prior_lambda_max > 0:
        positions = restrict(positions, *region)  # torch ops come first: they take the region's candidates
        if total is not None:  # and the scaled scores
            f, total = scaled(f, total), None
    s = rank_scores(f, positions, cfg.prior_lambda_max, log_norm, region, cfg.neighbor_window - fused_window,
                    contiguous, mask=fused_topk is None)
    if fused_topk is None:
        return topk_positions(s, positions, cfg.topk)
    return fused_topk(s, positions, cfg.topk, fused_window, total, region, contiguous)
