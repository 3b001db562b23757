"""Coverage: how much of a slow step's attention the previous fast steps' memory held.

A slow step attends densely, and the refresh after it computes that step's logits
over the whole context anyway (``SFIBackend._select``). From the same logits, per
(request, layer, KV head): the softmax probability mass, averaged over the KV head's
query group, that falls on the tokens the previous selection let fast steps see
(sinks, the selected positions, and every token from the previous tail start on).
1.0 means the fast steps saw everything this query attends to; no extra pass over
the KV cache and no host sync.

The adaptive policy (``adaptive_refresh``) turns it into a per-request gap: a boundary
token triggers a slow step only ``gap`` steps after the last one; ``gap`` doubles
(up to ``max_fast_steps``) after a slow step whose coverage reached ``coverage_target``
and falls back to ``min_refresh_gap`` after one that did not.
"""

from __future__ import annotations

import torch

from sfi_sglang.config import SFIConfig


def kept_mask(positions: torch.Tensor, sinks: int, prev_hi: torch.Tensor, prev_sel: torch.Tensor,
              prev_cnt: torch.Tensor) -> torch.Tensor:
    """Which candidates the previous memory held: ``positions [S, 1, N]`` (-1: padding), previous
    tail start ``prev_hi [S]``, selected positions ``prev_sel [S, Hkv, K]`` of which the first
    ``prev_cnt [S]`` are valid -> bool ``[S, Hkv, N]``."""
    s, hkv, k = prev_sel.shape
    n = positions.shape[-1]
    pos = positions.expand(s, hkv, n).long()
    valid_sel = torch.arange(k, device=prev_sel.device) < prev_cnt.view(-1, 1, 1)
    # candidates are positions [0, N): a position is its own column; invalid entries go to column N
    col = torch.where(valid_sel & (prev_sel >= 0) & (prev_sel < n), prev_sel.long(), n)
    member = torch.zeros(s, hkv, n + 1, dtype=torch.bool, device=prev_sel.device)
    member.scatter_(-1, col, True)
    held = member[..., :n] | (pos < sinks) | (pos >= prev_hi.view(-1, 1, 1))
    return held & (pos >= 0)


def coverage(logits: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """Logits ``[S, Hkv, R, N]`` over the whole context (-inf: padding), ``held [S, Hkv, N]``
    -> attention mass on held tokens per KV head ``[S, Hkv]``, averaged over the R queries."""
    p = logits.float().softmax(dim=-1)
    return (p * held.unsqueeze(2)).sum(-1).mean(-1)


def next_gap(gap: torch.Tensor, cov: torch.Tensor, cfg: SFIConfig) -> torch.Tensor:
    """The adaptive boundary gap after a slow step with coverage ``cov``."""
    grown = (gap * 2).clamp(max=cfg.max_fast_steps)
    return torch.where(cov >= cfg.coverage_target, grown, torch.full_like(gap, cfg.min_refresh_gap))
