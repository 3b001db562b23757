"""Selector top-k: each (row, KV head)'s k best-scored candidates, in one launch.

For row ``i``, KV head ``h``: scores ``f[i, h, :]`` (>= 0) of candidates at
``positions[i, 0 or h, :]`` (-1: padding or outside the region), optionally
spread to neighbours first (``window``: each score averaged with the best
within +-window candidates, as ``sfi_sglang.selector.spread_to_neighbors``
does for consecutive candidates) -> the positions of the ``k`` best, ties to
the earlier candidate, in candidate order; picked padding reads
``PAD_POSITION`` at the end.

One program per (row, head): two 8-bit radix-histogram passes over the row
find the k-th score exactly at the Selector's ranking precision (scores as
order-preserving 16-bit keys: ``sfi_sglang.selector.coarse``; the first pass
makes the keys, neighbour spread included, into a scratch row that the second
reads), then one pass compacts the winners in order with a running count.
This replaces a torch pipeline (topk, masks, two scans, scatter, sort) whose
launches and full-size temporaries cost more than the logits pass. A row runs
in one program because the backend batches layers, so rows are many: the time
grows with rows x candidates, not with a program's latency
(``tune_selector_h200.json``), and splitting rows into chunks (11-bit histograms
summed with atomics, five launches) measured slower on an H200 at batch 4-16
(``kernels_h200_chunked_topk.json``; both in ``benchmarks/results``).

``topk_select_ref`` is the torch reference (the Selector's own ops).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfi_sglang.selector import PAD_POSITION, spread_to_neighbors, topk_positions

BLOCK_N = 4096  # with 8 warps: best or near it at every shape of benchmarks/tune_selector.py (H200)
NUM_WARPS = 8


def topk_select_ref(f: torch.Tensor, positions: torch.Tensor, k: int, window: int = 0) -> torch.Tensor:
    """f ``[S, Hkv, N]``, positions ``[S, 1 or Hkv, N]`` ascending among valid ones -> ``[S, Hkv, min(k, N)]``."""
    if window > 0:
        f = spread_to_neighbors(f, positions, window, contiguous=True)
    return topk_positions(f.masked_fill(positions < 0, -1.0), positions, k)


@triton.jit
def _keys(F, Pos, j, N, WINDOW: tl.constexpr):
    """Order-preserving keys of candidates ``j`` at ranking precision (0: padding or out of range) and
    their positions."""
    inb = j < N
    p = tl.load(Pos + j, mask=inb, other=-1)
    s = tl.load(F + j, mask=inb, other=0.0)
    if WINDOW > 0:
        m = s
        for d in tl.static_range(1, WINDOW + 1):
            m = tl.maximum(m, tl.load(F + j - d, mask=inb & (j >= d), other=float("-inf")))
            m = tl.maximum(m, tl.load(F + j + d, mask=(j + d) < N, other=float("-inf")))
        s = 0.5 * (s + m)
    # scores are >= 0, so their float bits order as ints; the top 16 bits are the coarse score
    # (sfi_sglang.selector.coarse); +1 puts every real candidate above padding
    key = tl.where(p >= 0, (s.to(tl.int32, bitcast=True) >> 16) + 1, 0)
    return key, p


@triton.jit
def _topk_select(F, Pos, Keys, Out, N, K, stride_fs, stride_fh, stride_ps, stride_ph,
                 H: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr, PAD: tl.constexpr):
    ih = tl.program_id(0)
    i = ih // H
    h = ih % H
    F += i * stride_fs + h * stride_fh
    Pos += i * stride_ps + h * stride_ph
    Keys += ih.to(tl.int64) * N
    Out += ih.to(tl.int64) * K
    bins = tl.arange(0, 256)
    offs = tl.arange(0, BLOCK)
    # radix select of the K-th largest key, 8 bits at a time from the top (keys are < 2**16); the
    # first pass makes the keys (neighbour spread included) and keeps them for the second
    prefix = 0
    want = K  # how many still to pick among keys matching the prefix
    for shift in tl.static_range(8, -1, -8):
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, N, BLOCK):
            j = start + offs
            match = j < N
            if shift == 8:
                key, _ = _keys(F, Pos, j, N, WINDOW)
                tl.store(Keys + j, key, mask=match)
            else:
                key = tl.load(Keys + j, mask=match, other=0)
                match = match & ((key >> 8) == (prefix >> 8))
            hist += tl.histogram((key >> shift) & 255, 256, mask=match)
        if shift == 8:
            tl.debug_barrier()  # the keys stored above are read back by other threads
        above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # matching keys in higher bins
        b = tl.max(tl.where((above < want) & (above + hist >= want), bins, -1), 0)
        want -= tl.sum(tl.where(bins == b, above, 0), 0)
        prefix = prefix | (b << shift)
    # compaction in candidate order: keys above the K-th, then its first `want` ties
    taken = 0
    ties = 0
    for start in range(0, N, BLOCK):
        j = start + offs
        key = tl.load(Keys + j, mask=j < N, other=0)
        p = tl.load(Pos + j, mask=j < N, other=-1)
        tie = (key == prefix) & (j < N)
        take = (key > prefix) | (tie & (ties + tl.cumsum(tie.to(tl.int32), 0) <= want))
        take = take & (p >= 0)  # picked padding goes to the end instead
        at = taken + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(Out + at, p, mask=take)
        taken += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(tie.to(tl.int32), 0)
    for start in range(taken, K, BLOCK):
        j = start + offs
        tl.store(Out + j, tl.full([BLOCK], PAD, tl.int32), mask=j < K)


def topk_select(f: torch.Tensor, positions: torch.Tensor, k: int, window: int = 0,
                block: int = BLOCK_N, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Triton version of :func:`topk_select_ref` (same arguments and result); ``block`` (candidates
    per loop step) and ``num_warps`` are the launch shape (``benchmarks/tune_selector.py``)."""
    s_rows, hkv, n = f.shape
    k = min(k, n)
    out = torch.empty(s_rows, hkv, k, dtype=torch.int32, device=f.device)
    if k == 0 or s_rows == 0:
        return out
    assert f.stride(-1) == 1 and positions.stride(-1) == 1 and f.dtype == torch.float32
    pos = positions.expand(s_rows, -1, n)
    keys = torch.empty(s_rows * hkv, n, dtype=torch.int32, device=f.device)
    _topk_select[(s_rows * hkv,)](
        f, pos, keys, out, n, k, f.stride(0), f.stride(1), pos.stride(0), pos.stride(1) if pos.shape[1] > 1 else 0,
        H=hkv, WINDOW=window, BLOCK=block, PAD=PAD_POSITION, num_warps=num_warps,
    )
    return out
