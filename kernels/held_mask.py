"""Coverage input: which candidates the previous selection held, in one launch.

For refresh row ``i``, KV head ``h`` and candidate ``j`` at position ``p = positions[i, 0 or h, j]``
(-1: padding, never held): held if ``p`` is a sink (``p < sinks``), in the previous live tail
(``p >= prev_hi[i]``), or among the first ``prev_cnt[i]`` previous selected positions
``prev_sel[i, h]``, which are ascending (as the Selector writes them), so a binary search finds
it. This replaces the reference's ~17 full-size torch ops (masks, a scatter into a bitmap) per
layer group. ``sfi_sglang.coverage.kept_mask`` is the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 1024


@triton.jit
def _held_mask(Pos, Sel, PrevHi, PrevCnt, Out, N, K, sinks, stride_ps, stride_ph, stride_ss, stride_sh,
               H: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    ih = tl.program_id(0)
    i = ih // H
    h = ih % H
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    p = tl.load(Pos + i * stride_ps + h * stride_ph + j, mask=j < N, other=-1)
    Sel += i * stride_ss + h * stride_sh
    cnt = tl.minimum(tl.maximum(tl.load(PrevCnt + i), 0), K)
    # lower bound of p among the selected positions: the first index whose entry is >= p
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = lo + cnt
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(Sel + mid, mask=active, other=0) < p
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    found = tl.load(Sel + lo, mask=lo < cnt, other=-1) == p
    held = ((p < sinks) | (p >= tl.load(PrevHi + i)) | found) & (p >= 0)
    tl.store(Out + ih.to(tl.int64) * N + j, held.to(tl.int8), mask=j < N)


def held_mask(positions: torch.Tensor, sinks: int, prev_hi: torch.Tensor, prev_sel: torch.Tensor,
              prev_cnt: torch.Tensor) -> torch.Tensor:
    """Triton version of ``kept_mask`` (same arguments and result) for ascending ``prev_sel[:cnt]``."""
    s_rows, hkv, k = prev_sel.shape
    n = positions.shape[-1]
    pos = positions.expand(s_rows, -1, n)
    assert pos.stride(-1) == 1 and prev_sel.stride(-1) == 1
    out = torch.empty(s_rows, hkv, n, dtype=torch.int8, device=positions.device)
    if s_rows == 0 or n == 0:
        return out.view(torch.bool)
    _held_mask[(s_rows * hkv, triton.cdiv(n, BLOCK_N))](
        pos, prev_sel, prev_hi.to(torch.int32).contiguous(), prev_cnt.to(torch.int32).contiguous(), out, n, k, sinks,
        pos.stride(0), pos.stride(1) if pos.shape[1] > 1 else 0, prev_sel.stride(0), prev_sel.stride(1),
        H=hkv, BLOCK=BLOCK_N, STEPS=max(1, k.bit_length()), num_warps=4,
    )
    return out.view(torch.bool)
