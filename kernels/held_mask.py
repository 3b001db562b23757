"""Coverage input: which candidates the previous selection held, in two launches.

Candidates are the positions ``[0, N)`` of a slow step's refresh, candidate ``j`` at position
``positions[i, 0 or h, j]`` which is ``j`` or -1 (padding, never held), as
:func:`held_mask_ref` (the torch reference) assumes. For refresh row ``i`` and KV
head ``h``, candidate ``j`` is held if it is a sink (``j < sinks``), in the previous live tail
(``j >= prev_hi[i]``), or one of the first ``prev_cnt[i]`` previous selected positions
``prev_sel[i, h]``. The first launch writes the sinks and the tail over every candidate, the second
marks the selected positions, each a store into its own column: the work follows the selection's
size, not the candidates' (a binary search per candidate in the selection was several times slower).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 1024
BLOCK_K = 1024


@triton.jit
def _held_ranges(Pos, PrevHi, Out, N, sinks, stride_ps, stride_ph, H: tl.constexpr, BLOCK: tl.constexpr):
    """Sinks and the previous tail: every candidate's entry, 0 or 1."""
    ih = tl.program_id(0)
    i = ih // H
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    p = tl.load(Pos + i * stride_ps + (ih % H) * stride_ph + j, mask=j < N, other=-1)
    held = ((p < sinks) | (p >= tl.load(PrevHi + i))) & (p >= 0)
    tl.store(Out + ih.to(tl.int64) * N + j, held.to(tl.int8), mask=j < N)


@triton.jit
def _held_selected(Pos, Sel, PrevCnt, Out, N, K, stride_ps, stride_ph, stride_ss, stride_sh,
                   H: tl.constexpr, BLOCK: tl.constexpr):
    """The previous selected positions: 1 in their columns (padding columns excepted)."""
    ih = tl.program_id(0)
    i = ih // H
    h = ih % H
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cnt = tl.minimum(tl.load(PrevCnt + i), K)
    p = tl.load(Sel + i * stride_ss + h * stride_sh + t, mask=t < cnt, other=-1)
    ok = (p >= 0) & (p < N)
    ok = ok & (tl.load(Pos + i * stride_ps + h * stride_ph + p, mask=ok, other=-1) >= 0)
    tl.store(Out + ih.to(tl.int64) * N + p, tl.full([BLOCK], 1, tl.int8), mask=ok)


def held_mask_ref(positions: torch.Tensor, sinks: int, prev_hi: torch.Tensor, prev_sel: torch.Tensor,
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


def held_mask(positions: torch.Tensor, sinks: int, prev_hi: torch.Tensor, prev_sel: torch.Tensor,
              prev_cnt: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`held_mask_ref` (same arguments and result)."""
    s_rows, hkv, k = prev_sel.shape
    n = positions.shape[-1]
    pos = positions.expand(s_rows, -1, n)
    assert pos.stride(-1) == 1 and prev_sel.stride(-1) == 1
    out = torch.empty(s_rows, hkv, n, dtype=torch.int8, device=positions.device)
    if s_rows == 0 or n == 0:
        return out.view(torch.bool)
    strides = (pos.stride(0), pos.stride(1) if pos.shape[1] > 1 else 0)
    _held_ranges[(s_rows * hkv, triton.cdiv(n, BLOCK_N))](
        pos, prev_hi.to(torch.int32).contiguous(), out, n, sinks, *strides, H=hkv, BLOCK=BLOCK_N, num_warps=4)
    if k > 0:
        _held_selected[(s_rows * hkv, triton.cdiv(k, BLOCK_K))](
            pos, prev_sel, prev_cnt.to(torch.int32).contiguous(), out, n, k, *strides,
            prev_sel.stride(0), prev_sel.stride(1), H=hkv, BLOCK=BLOCK_K, num_warps=4)
    return out.view(torch.bool)
