"""Selector top-k: each (row, KV head)'s k best-scored candidates, in three launches.

For row ``i``, KV head ``h``: scores ``f[i, h, :]`` (>= 0) of candidates at
``positions[i, 0 or h, :]`` (-1: padding; with ``region``, those outside row ``i``'s
``[lo, hi)`` are not ranked either: a refresh after a slow step scores the whole
context but ranks only the region), optionally
spread to neighbours first (``window``: each score averaged with the best
within +-window candidates, as ``spread_to_neighbors``
does; where candidates are not consecutive positions, ``contiguous=False``,
only those within +-window positions count: a selection reused from a cached
prefix and the tokens after it) -> the positions of the ``k`` best, ties to
the earlier candidate, in candidate order; picked padding reads
``PAD_POSITION`` at the end.

``total`` (optional, per row and head): the scores are ``f * (1 / total)``, scaled
here as they are read (one multiply, no per-candidate division), which saves
``group_scores`` a full pass over ``f``.

Radix select at the Selector's ranking precision (scores as order-preserving
keys of 7 + ``RANK_BITS`` bits: :func:`coarse`), each (row,
head) split over chunks of candidates, about ``PROGRAMS`` (row, chunk)
programs per call:

1. each chunk makes its keys (scaling and neighbour spread included) into an
   int16 scratch row and stores the histogram of their high digit (7 bits);
2. each chunk sums its row's high histograms, finds the k-th key's high bin,
   and stores the histogram of the low digit of its keys in that bin (by
   atomic adds when that bin holds few of them: ``_chunk_low``);
3. each chunk sums both, finds the k-th key, and compacts its winners in
   order at the offset the earlier chunks' histograms give (keys above the
   k-th, then the ties the earlier chunks take); the last chunk pads the end.

Rows split over chunks keep the GPU evenly busy whatever the row count (batch 1 x 36 layers
or 16 requests x 2 layers). Two 7-bit-ish digits, not four 4-bit ones: the passes over the keys
cost more than narrower histograms save.

Why not FlashInfer's ``top_k`` (0.6.15, a radix top-k for long rows): it gives ties
to the smaller index, as the Selector needs for deterministic selections, only on its
FilteredTopK path, which takes k <= 2048, and the default ``topk`` is 3072; it would
also need the keys (spread, scaled, coarse) written out before it, a pass that is most of
this kernel's pass 1. It is faster on long rows at k <= 2048 (benchmarks/RESULTS.md, "Kernels").

``topk_select_ref`` is the torch reference (the Selector's own ops).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


RANK_BITS = 7
"""Significant bits of a score the Selector ranks by (8 would be bfloat16's precision): 14-bit keys,
the fastest width of this kernel on an H200 (benchmarks/RESULTS.md, "Kernels")."""

PAD_POSITION = torch.iinfo(torch.int32).max  # where picked padding goes: last


def restrict(positions: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Candidates ``[S, 1 or Hkv, N]`` outside each row's ``[lo, hi)`` become padding (-1): a refresh
    that scored the whole context ranks only the region."""
    return positions.masked_fill((positions < lo.view(-1, 1, 1)) | (positions >= hi.view(-1, 1, 1)), -1)


def scaled(f: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Scores ``f [S, Hkv, N]`` times their rows' ``1 / total [S, Hkv]``: the reciprocal, then one product
    per score, as the kernel rounds them (a multiply per candidate instead of a division)."""
    return f * total.reciprocal().unsqueeze(-1)


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


def coarse(scores: torch.Tensor) -> torch.Tensor:
    """Float32 scores rounded toward zero to ``RANK_BITS`` significant bits, the precision ranked at:
    candidates within 2**-(RANK_BITS - 1) of each other (1.6% at 7 bits) may tie (and go to the earlier
    position), which changes nothing that matters here and lets the kernel find the k-th score with two
    radix passes over 8 + RANK_BITS - 1 bit keys instead of four."""
    return (scores.view(torch.int32) & -(1 << (24 - RANK_BITS))).view(torch.float32)


def topk_positions(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the top-k candidates of each row of ``scores [..., N]`` (float32; ranked at
    :func:`coarse` precision), ascending, int32 (``min(k, N)`` per row; picked padding reads
    ``PAD_POSITION`` and sorts last).

    Ties at the k-th score go to the earlier candidates, so results are deterministic; padding
    scores ``-1`` and loses to every real candidate. Only the k-th score is searched for
    (``torch.topk``), not a sort of all candidates: at 32K candidates it is the cheaper part.
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


BLOCK_N = 2048  # with 4 warps and PROGRAMS 2048: best or near it at the Selector's shapes (tune_selector.py)
NUM_WARPS = 4
PROGRAMS = 2048  # (row, chunk) programs a call aims for: many per SM on an H100/H200
# keys: a score's exponent and RANK_BITS - 1 stored mantissa bits, found in two digits
SHIFT = tl.constexpr(24 - RANK_BITS)
LOW_BITS = tl.constexpr((8 + RANK_BITS) // 2)
HIGH_BINS = tl.constexpr(1 << (7 + RANK_BITS - LOW_BITS.value))
LOW_BINS = tl.constexpr(1 << LOW_BITS.value)
# pass 2 counts by atomics unless more than 1/ATOMIC_SHARE of a chunk's keys share the k-th high bin
ATOMIC_SHARE = tl.constexpr(8)


def topk_select_ref(f: torch.Tensor, positions: torch.Tensor, k: int, window: int = 0,
                    total: torch.Tensor | None = None, region: tuple[torch.Tensor, torch.Tensor] | None = None,
                    contiguous: bool = True) -> torch.Tensor:
    """f ``[S, Hkv, N]``, positions ``[S, 1 or Hkv, N]`` ascending among valid ones -> ``[S, Hkv, min(k, N)]``.
    ``total [S, Hkv]``: scores are ``f * (1 / total)`` (the normalisation ``group_scores`` leaves to the top-k).
    ``region``: ``(lo, hi) [S]``, only candidates at positions in ``[lo, hi)`` are ranked. ``contiguous``:
    the candidates are consecutive positions (then padding), else the spread takes only neighbours within
    ``window`` positions (``spread_to_neighbors``)."""
    if region is not None:
        positions = restrict(positions, *region)
    if total is not None:
        f = scaled(f, total)
    if window > 0:
        f = spread_to_neighbors(f, positions, window, contiguous)
    return topk_positions(f.masked_fill(positions < 0, -1.0), positions, k)


@triton.jit
def _bounds(Lo, Hi, i, REGION: tl.constexpr):
    """Positions row ``i`` ranks: ``[lo, hi)`` (without a region: every position, padding excepted)."""
    lo = 0
    hi = 2147483647
    if REGION:
        lo = tl.load(Lo + i)
        hi = tl.load(Hi + i)
    return lo, hi


@triton.jit
def _ranked(p, lo, hi):
    """Positions ``p`` that are ranked (in ``[lo, hi)``), -1 for the others (padding included)."""
    return tl.where((p >= lo) & (p < hi), p, -1)


@triton.jit
def _neighbor(F, Pos, at, ok, p, lo, hi, WINDOW: tl.constexpr, NEAR: tl.constexpr):
    """Scores of the candidates ``at`` (-inf where not ``ok``; with ``NEAR``, also where their position, -1
    outside ``[lo, hi)`` as for ``p``, is more than ``WINDOW`` from ``p``)."""
    f = tl.load(F + at, mask=ok, other=float("-inf"))
    if NEAR:
        q = _ranked(tl.load(Pos + at, mask=ok, other=-1), lo, hi)
        f = tl.where(tl.abs(q - p) <= WINDOW, f, float("-inf"))
    return f


@triton.jit
def _keys(F, Pos, j, N, scale, lo, hi, WINDOW: tl.constexpr, NORM: tl.constexpr, NEAR: tl.constexpr):
    """Order-preserving keys of candidates ``j`` at ranking precision (0: padding, out of range or outside
    ``[lo, hi)``). ``NEAR``: candidates are not consecutive positions, so the spread checks positions."""
    inb = j < N
    p = _ranked(tl.load(Pos + j, mask=inb, other=-1), lo, hi)
    s = tl.load(F + j, mask=inb, other=0.0)
    if WINDOW > 0:
        m = s
        for d in tl.static_range(1, WINDOW + 1):
            m = tl.maximum(m, _neighbor(F, Pos, j - d, inb & (j >= d), p, lo, hi, WINDOW, NEAR))
            m = tl.maximum(m, _neighbor(F, Pos, j + d, (j + d) < N, p, lo, hi, WINDOW, NEAR))
        if NORM:  # rounding is monotone, so max-then-scale is scale-then-max
            s, m = s * scale, m * scale
        s = 0.5 * (s + m)
    elif NORM:
        s = s * scale
    # scores are >= 0, so their float bits order as ints; the top bits are the coarse score
    # (coarse); +1 puts every real candidate above padding; < HIGH_BINS * LOW_BINS
    return tl.where(p >= 0, (s.to(tl.int32, bitcast=True) >> SHIFT) + 1, 0)


@triton.jit
def _kth_bin(hist, want, BINS: tl.constexpr):
    """The bin holding the ``want``-th largest key of ``hist``, and how many to take from it."""
    bins = tl.arange(0, BINS)
    above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # keys in higher bins
    b = tl.max(tl.where((above < want) & (above + hist >= want), bins, -1), 0)
    return b, want - tl.sum(tl.where(bins == b, above, 0), 0)


@triton.jit
def _count(mask, BLOCK: tl.constexpr):
    """Inclusive running count of ``mask [BLOCK]``: scans of 128-long rows plus their offsets, faster
    than one scan of the whole block."""
    x = tl.reshape(mask.to(tl.int32), [BLOCK // 128, 128])
    rows = tl.sum(x, 1)
    return tl.reshape(tl.cumsum(x, 1) + (tl.cumsum(rows, 0) - rows)[:, None], [BLOCK])


@triton.jit
def _row_hist(Hist, ih, C, BINS: tl.constexpr):
    """The row's histogram: the sum of its ``C`` chunks' ``[BINS]`` histograms."""
    bins = tl.arange(0, BINS)
    hist = tl.zeros([BINS], dtype=tl.int32)
    for c in range(0, C):
        hist += tl.load(Hist + (ih * C + c) * BINS + bins)
    return hist


@triton.jit
def _chunk_high(F, Total, Pos, Lo, Hi, Keys, HistHi, HistLo, N, C, CHUNK, stride_fs, stride_fh, stride_ps, stride_ph,
                H: tl.constexpr, WINDOW: tl.constexpr, NORM: tl.constexpr, REGION: tl.constexpr, NEAR: tl.constexpr,
                BLOCK: tl.constexpr):
    """Pass 1 for chunk ``c`` of row ``ih``: its keys, and the histogram of their high digit."""
    ih = tl.program_id(0)
    c = tl.program_id(1)
    i = ih // H
    h = ih % H
    F += i * stride_fs + h * stride_fh
    Pos += i * stride_ps + h * stride_ph
    Keys += ih.to(tl.int64) * N
    scale = tl.math.div_rn(1.0, tl.load(Total + ih)) if NORM else 1.0  # as torch's reciprocal
    lo, hi = _bounds(Lo, Hi, i, REGION)
    offs = tl.arange(0, BLOCK)
    end = tl.minimum(c * CHUNK + CHUNK, N)
    hist = tl.zeros([HIGH_BINS], dtype=tl.int32)
    for start in range(c * CHUNK, end, BLOCK):
        j = start + offs
        key = _keys(F, Pos, j, N, scale, lo, hi, WINDOW, NORM, NEAR)
        tl.store(Keys + j, key.to(tl.int16), mask=j < end)
        hist += tl.histogram(key >> LOW_BITS, HIGH_BINS, mask=j < end)
    tl.store(HistHi + (ih * C + c) * HIGH_BINS + tl.arange(0, HIGH_BINS), hist)
    tl.store(HistLo + (ih * C + c) * LOW_BINS + tl.arange(0, LOW_BINS), tl.zeros([LOW_BINS], dtype=tl.int32))


@triton.jit
def _chunk_low(Keys, HistHi, HistLo, N, K, C, CHUNK, BLOCK: tl.constexpr):
    """Pass 2: the histogram of the low digit of the chunk's keys in the k-th key's high bin. Few of
    its keys there (spread scores): atomic adds into the chunk's own histogram (zeroed by pass 1; no
    other program writes it), none if it has none; many (ties): ``tl.histogram``, which costs the
    same for every key but does not serialize on one counter."""
    ih = tl.program_id(0)
    c = tl.program_id(1)
    Keys += ih.to(tl.int64) * N
    high, _ = _kth_bin(_row_hist(HistHi, ih, C, HIGH_BINS), K, HIGH_BINS)
    in_bin = tl.load(HistHi + (ih * C + c) * HIGH_BINS + high)
    offs = tl.arange(0, BLOCK)
    end = tl.minimum(c * CHUNK + CHUNK, N)
    counts = HistLo + (ih * C + c) * LOW_BINS
    if in_bin * ATOMIC_SHARE > end - c * CHUNK:
        hist = tl.zeros([LOW_BINS], dtype=tl.int32)
        for start in range(c * CHUNK, end, BLOCK):
            j = start + offs
            key = tl.load(Keys + j, mask=j < end, other=0).to(tl.int32)
            hist += tl.histogram(key & (LOW_BINS - 1), LOW_BINS, mask=(j < end) & ((key >> LOW_BITS) == high))
        tl.store(counts + tl.arange(0, LOW_BINS), hist)
    elif in_bin > 0:
        for start in range(c * CHUNK, end, BLOCK):
            j = start + offs
            key = tl.load(Keys + j, mask=j < end, other=0).to(tl.int32)
            tl.atomic_add(counts + (key & (LOW_BINS - 1)), 1, mask=(j < end) & ((key >> LOW_BITS) == high),
                          sem="relaxed")


@triton.jit
def _chunk_take(Keys, Pos, HistHi, HistLo, Out, N, K, C, CHUNK, stride_ps, stride_ph,
                H: tl.constexpr, BLOCK: tl.constexpr, PAD: tl.constexpr):
    """Pass 3: the chunk's winners, in candidate order, at the offset the earlier chunks leave."""
    ih = tl.program_id(0)
    c = tl.program_id(1)
    i = ih // H
    h = ih % H
    Pos += i * stride_ps + h * stride_ph
    Keys += ih.to(tl.int64) * N
    Out += ih.to(tl.int64) * K
    high, want = _kth_bin(_row_hist(HistHi, ih, C, HIGH_BINS), K, HIGH_BINS)
    low, want = _kth_bin(_row_hist(HistLo, ih, C, LOW_BINS), want, LOW_BINS)
    kth = (high << LOW_BITS) | low
    real = kth > 0  # key 0 is padding: ties at 0 are never taken (picked padding goes to the end)
    # what the chunks before this one take: keys above the k-th, then ties in candidate order
    bh, bl = tl.arange(0, HIGH_BINS), tl.arange(0, LOW_BINS)
    above = 0
    ties = 0
    for cc in range(0, c):
        hi_c = tl.load(HistHi + (ih * C + cc) * HIGH_BINS + bh)
        lo_c = tl.load(HistLo + (ih * C + cc) * LOW_BINS + bl)
        above += tl.sum(tl.where(bh > high, hi_c, 0), 0) + tl.sum(tl.where(bl > low, lo_c, 0), 0)
        ties += tl.sum(tl.where(bl == low, lo_c, 0), 0)
    taken = above + tl.where(real, tl.minimum(ties, want), 0)
    offs = tl.arange(0, BLOCK)
    end = tl.minimum(c * CHUNK + CHUNK, N)
    for start in range(c * CHUNK, end, BLOCK):
        j = start + offs
        key = tl.load(Keys + j, mask=j < end, other=0).to(tl.int32)
        p = tl.load(Pos + j, mask=j < end, other=-1)
        tie = (key == kth) & (j < end)
        take = (key > kth) | (tie & (ties + tl.cumsum(tie.to(tl.int32), 0) <= want))
        take = take & (p >= 0)
        at = taken + _count(take, BLOCK) - 1
        tl.store(Out + at, p, mask=take)
        taken += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(tie.to(tl.int32), 0)
    if c == C - 1:  # every chunk's winners are in: the row's end is padding
        for start in range(taken, K, BLOCK):
            j = start + offs
            tl.store(Out + j, tl.full([BLOCK], PAD, tl.int32), mask=j < K)


def topk_select(f: torch.Tensor, positions: torch.Tensor, k: int, window: int = 0, total: torch.Tensor | None = None,
                region: tuple[torch.Tensor, torch.Tensor] | None = None, contiguous: bool = True,
                chunks: int | None = None, block: int = BLOCK_N, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Triton version of :func:`topk_select_ref` (same arguments and result). ``chunks`` per row
    (default: about ``PROGRAMS`` programs in all, at least one block each), ``block`` (candidates
    per loop step) and ``num_warps`` are the launch shape (``benchmarks/tune_selector.py``)."""
    s_rows, hkv, n = f.shape
    k = min(k, n)
    out = torch.empty(s_rows, hkv, k, dtype=torch.int32, device=f.device)
    if k == 0 or s_rows == 0:
        return out
    assert f.stride(-1) == 1 and positions.stride(-1) == 1 and f.dtype == torch.float32 and block >= 128
    rows = s_rows * hkv
    blocks = triton.cdiv(n, block)
    chunks = max(1, min(blocks, chunks or triton.cdiv(PROGRAMS, rows)))
    chunk = triton.cdiv(blocks, chunks) * block
    chunks = triton.cdiv(n, chunk)
    pos = positions.expand(s_rows, -1, n)
    pos_strides = (pos.stride(0), pos.stride(1) if pos.shape[1] > 1 else 0)
    keys = torch.empty(rows, n, dtype=torch.int16, device=f.device)
    hist_hi = torch.empty(rows, chunks, HIGH_BINS.value, dtype=torch.int32, device=f.device)
    hist_lo = torch.empty(rows, chunks, LOW_BINS.value, dtype=torch.int32, device=f.device)
    norm = total.float().contiguous() if total is not None else f
    lo, hi = (t.to(torch.int32).contiguous() for t in region) if region is not None else (f, f)
    grid = (rows, chunks)
    _chunk_high[grid](f, norm, pos, lo, hi, keys, hist_hi, hist_lo, n, chunks, chunk, f.stride(0), f.stride(1),
                      *pos_strides, H=hkv, WINDOW=window, NORM=total is not None, REGION=region is not None,
                      NEAR=not contiguous, BLOCK=block, num_warps=num_warps,
                      enable_fp_fusion=False)  # products rounded before the sum, as torch's ops
    _chunk_low[grid](keys, hist_hi, hist_lo, n, k, chunks, chunk, BLOCK=block, num_warps=num_warps)
    _chunk_take[grid](keys, pos, hist_hi, hist_lo, out, n, k, chunks, chunk, *pos_strides,
                      H=hkv, BLOCK=block, PAD=PAD_POSITION, num_warps=num_warps)
    return out
