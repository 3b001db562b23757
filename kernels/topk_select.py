"""Selector top-k: each (row, KV head)'s k best-scored candidates, in one launch.

For row ``i``, KV head ``h``: scores ``f[i, h, :]`` (>= 0) of candidates at
``positions[i, 0 or h, :]`` (-1: padding or outside the region), optionally
spread to neighbours first (``window``: each score averaged with the best
within +-window candidates, as ``sfi_sglang.selector.spread_to_neighbors``
does for consecutive candidates) -> the positions of the ``k`` best, ties to
the earlier candidate, in candidate order; picked padding reads
``PAD_POSITION`` at the end.

``total`` (optional, per row and head): the scores are ``f / total``, divided
here as they are read (IEEE rounding, as torch divides), which saves
``group_scores`` a full pass over ``f``.

One program per (row, head): two radix-histogram passes over the row find the
k-th score exactly at the Selector's ranking precision (scores as
order-preserving 15-bit keys: ``sfi_sglang.selector.coarse``; the first pass
makes the keys, division and neighbour spread included, into an int16 scratch
row and counts their high 7 bits, the second counts the low 8 bits of those in
the k-th one's high bin), then one pass compacts the winners in order with a
running count.
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


def topk_select_ref(f: torch.Tensor, positions: torch.Tensor, k: int, window: int = 0,
                    total: torch.Tensor | None = None) -> torch.Tensor:
    """f ``[S, Hkv, N]``, positions ``[S, 1 or Hkv, N]`` ascending among valid ones -> ``[S, Hkv, min(k, N)]``.
    ``total [S, Hkv]``: scores are ``f / total`` (the normalisation ``group_scores`` leaves to the top-k)."""
    if total is not None:
        f = f / total.unsqueeze(-1)
    if window > 0:
        f = spread_to_neighbors(f, positions, window, contiguous=True)
    return topk_positions(f.masked_fill(positions < 0, -1.0), positions, k)


@triton.jit
def _keys(F, Pos, j, N, total, WINDOW: tl.constexpr, NORM: tl.constexpr):
    """Order-preserving keys of candidates ``j`` at ranking precision (0: padding or out of range)."""
    inb = j < N
    p = tl.load(Pos + j, mask=inb, other=-1)
    s = tl.load(F + j, mask=inb, other=0.0)
    if WINDOW > 0:
        m = s
        for d in tl.static_range(1, WINDOW + 1):
            m = tl.maximum(m, tl.load(F + j - d, mask=inb & (j >= d), other=float("-inf")))
            m = tl.maximum(m, tl.load(F + j + d, mask=(j + d) < N, other=float("-inf")))
        if NORM:  # IEEE division, as torch's: rounding is monotone, so max-then-divide is divide-then-max
            s, m = tl.math.div_rn(s, total), tl.math.div_rn(m, total)
        s = 0.5 * (s + m)
    elif NORM:
        s = tl.math.div_rn(s, total)
    # scores are >= 0, so their float bits order as ints; the top 16 bits are the coarse score
    # (sfi_sglang.selector.coarse); +1 puts every real candidate above padding; < 2**15
    return tl.where(p >= 0, (s.to(tl.int32, bitcast=True) >> 16) + 1, 0)


@triton.jit
def _kth_bin(hist, want, BINS: tl.constexpr):
    """The bin holding the ``want``-th largest key of ``hist``, and how many to take from it."""
    bins = tl.arange(0, BINS)
    above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # keys in higher bins
    b = tl.max(tl.where((above < want) & (above + hist >= want), bins, -1), 0)
    return b, want - tl.sum(tl.where(bins == b, above, 0), 0)


@triton.jit
def _count(mask, BLOCK: tl.constexpr):
    """Inclusive running count of ``mask [BLOCK]``: scans of 128-long rows plus their offsets. For the
    winners it made the whole kernel 4-7% faster on an H200 than one scan of the block; for the ties
    (rarely more than a few) it did not pay."""
    x = tl.reshape(mask.to(tl.int32), [BLOCK // 128, 128])
    rows = tl.sum(x, 1)
    return tl.reshape(tl.cumsum(x, 1) + (tl.cumsum(rows, 0) - rows)[:, None], [BLOCK])


@triton.jit
def _topk_select(F, Total, Pos, Keys, Out, N, K, stride_fs, stride_fh, stride_ps, stride_ph,
                 H: tl.constexpr, WINDOW: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr,
                 PAD: tl.constexpr):
    ih = tl.program_id(0)
    i = ih // H
    h = ih % H
    F += i * stride_fs + h * stride_fh
    Pos += i * stride_ps + h * stride_ph
    Keys += ih.to(tl.int64) * N
    Out += ih.to(tl.int64) * K
    total = tl.load(Total + ih) if NORM else 1.0
    offs = tl.arange(0, BLOCK)
    # radix select of the K-th largest key (< 2**15): its high 7 bits, then its low 8; the first
    # pass makes the keys (normalisation and neighbour spread included) and keeps them (int16)
    hist = tl.zeros([128], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        j = start + offs
        key = _keys(F, Pos, j, N, total, WINDOW, NORM)
        tl.store(Keys + j, key.to(tl.int16), mask=j < N)
        hist += tl.histogram(key >> 8, 128, mask=j < N)
    tl.debug_barrier()  # the keys stored above are read back by other threads
    high, want = _kth_bin(hist, K, 128)
    hist = tl.zeros([256], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        j = start + offs
        key = tl.load(Keys + j, mask=j < N, other=0).to(tl.int32)
        hist += tl.histogram(key & 255, 256, mask=(j < N) & ((key >> 8) == high))
    low, want = _kth_bin(hist, want, 256)
    kth = (high << 8) | low
    # compaction in candidate order: keys above the K-th, then its first `want` ties
    taken = 0
    ties = 0
    for start in range(0, N, BLOCK):
        j = start + offs
        key = tl.load(Keys + j, mask=j < N, other=0).to(tl.int32)
        p = tl.load(Pos + j, mask=j < N, other=-1)
        tie = (key == kth) & (j < N)
        take = (key > kth) | (tie & (ties + tl.cumsum(tie.to(tl.int32), 0) <= want))
        take = take & (p >= 0)  # picked padding goes to the end instead
        at = taken + _count(take, BLOCK) - 1
        tl.store(Out + at, p, mask=take)
        taken += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(tie.to(tl.int32), 0)
    for start in range(taken, K, BLOCK):
        j = start + offs
        tl.store(Out + j, tl.full([BLOCK], PAD, tl.int32), mask=j < K)


def topk_select(f: torch.Tensor, positions: torch.Tensor, k: int, window: int = 0, total: torch.Tensor | None = None,
                block: int = BLOCK_N, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Triton version of :func:`topk_select_ref` (same arguments and result); ``block`` (candidates
    per loop step) and ``num_warps`` are the launch shape (``benchmarks/tune_selector.py``)."""
    s_rows, hkv, n = f.shape
    k = min(k, n)
    out = torch.empty(s_rows, hkv, k, dtype=torch.int32, device=f.device)
    if k == 0 or s_rows == 0:
        return out
    assert f.stride(-1) == 1 and positions.stride(-1) == 1 and f.dtype == torch.float32 and block >= 128
    pos = positions.expand(s_rows, -1, n)
    keys = torch.empty(s_rows * hkv, n, dtype=torch.int16, device=f.device)
    norm = total.float().contiguous() if total is not None else f
    _topk_select[(s_rows * hkv,)](
        f, norm, pos, keys, out, n, k, f.stride(0), f.stride(1),
        pos.stride(0), pos.stride(1) if pos.shape[1] > 1 else 0,
        H=hkv, WINDOW=window, NORM=total is not None, BLOCK=block, PAD=PAD_POSITION, num_warps=num_warps,
    )
    return out
