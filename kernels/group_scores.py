"""Selector scores: each KV head's query-group attention over its candidates, and coverage.

For refresh row ``i``, KV head ``h`` and candidate ``j``, from the logits
``s[i, h, r, j]`` of the head's ``R`` queries (``candidate_logits``):

- ``f[i, h, j]``: the power mean (order ``alpha``) over ``r`` of each query's softmax
  restricted to the region ``[lo_i, hi_i)`` of positions (0 elsewhere), and its sum
  ``total[i, h]`` over the region: the Selector ranks ``f * (1 / total)`` (the top-k kernel
  scales as it reads, which saves a pass over ``f``);
- ``coverage[i, h]`` (when ``held`` is given): the softmax mass over all candidates
  that falls on held ones, averaged over the ``R`` queries (:func:`coverage`).

``group_scores_ref`` is the torch reference; ``group_scores`` does the same in two Triton
passes over the logits (per-block softmax statistics, then the scores) instead of a dozen
full-size torch passes (two softmaxes, masking, powers, means), with a small launch between
them that combines the blocks' statistics. It reads the logits through their strides: the
candidate logits are query-major, the slow step's kept ones token-major (a transposed view,
read one query row at a time: [candidates, queries] tiles would reduce through layout conversions).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl



class Scores(NamedTuple):
    """What the Selector ranks, ``f * (1 / total)``, and the coverage of the held candidates (or None)."""

    f: torch.Tensor  # [S, Hkv, N]
    total: torch.Tensor  # [S, Hkv]
    coverage: torch.Tensor | None  # [S, Hkv]


BLOCK_N = 512  # launch shape from benchmarks/tune_selector.py
NUM_WARPS = 4


def in_region(positions: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``positions [S, 1 or Hkv, N]`` (-1: padding) inside each row's ``[lo, hi)``."""
    return (positions >= lo.view(-1, 1, 1)) & (positions < hi.view(-1, 1, 1))


def coverage(logits: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """Logits ``[S, Hkv, R, N]`` over the whole context (-inf: padding), ``held [S, Hkv, N]``
    -> attention mass on held tokens per KV head ``[S, Hkv]``, averaged over the R queries."""
    p = logits.float().softmax(dim=-1)
    return (p * held.unsqueeze(2)).sum(-1).mean(-1)


def group_scores_ref(logits: torch.Tensor, positions: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     alpha: float, held: torch.Tensor | None = None) -> Scores:
    """Logits ``[S, Hkv, R, N]`` (fp32 or fp16; ignored at padding) of candidates at ``positions
    [S, 1 or Hkv, N]`` (-1: padding), region ``lo, hi [S]``, optional ``held [S, Hkv, N]`` ->
    ``f [S, Hkv, N]``, ``total [S, Hkv]`` and coverage ``[S, Hkv]`` (None without ``held``).
    Every row needs a candidate in its region."""
    logits = logits.float().masked_fill(positions.unsqueeze(2) < 0, float("-inf"))
    reg = logits.masked_fill(~in_region(positions, lo, hi).unsqueeze(2), float("-inf"))
    f = reg.softmax(dim=-1).pow(alpha).mean(dim=2).pow(1.0 / alpha)
    return Scores(f, f.sum(dim=-1), coverage(logits, held) if held is not None else None)


@triton.jit(do_not_specialize=["NB", "SHR"])  # one compiled kernel for every width and row count
def _block_stats(
    L, Pos, Lo, Hi, Part, N, NB, SHR,
    stride_ls, stride_lh, stride_lr, stride_ln, stride_ps, stride_ph,
    H: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per (row, head, query, block): max and sum of exp over valid candidates, then over the region
    (the same numbers, not computed twice, where every valid candidate of the block is in the region)."""
    ih = tl.program_id(0)
    blk = tl.program_id(1)
    i = ih // H
    h = ih % H
    j = blk * BLOCK + tl.arange(0, BLOCK)
    r = tl.arange(0, BLOCK_R)
    rmask = r < R
    p = tl.load(Pos + i * stride_ps + h * stride_ph + j, mask=j < N, other=-1)
    valid, reg = p >= 0, (p >= tl.load(Lo + i)) & (p < tl.load(Hi + i))
    # masked by bounds only, so the loads can vectorize; padding (its logits: any value) is masked below
    s = tl.load(L + i * stride_ls + h * stride_lh + r[:, None] * stride_lr + j[None, :] * stride_ln,
                mask=rmask[:, None] & (j < N)[None, :], other=float("-inf")).to(tl.float32)
    out = Part + (ih * R + r) * NB + blk
    m, total = _max_sum(tl.where(valid[None, :], s, float("-inf")))
    tl.store(out, m, mask=rmask)
    tl.store(out + SHR * NB, total, mask=rmask)
    if tl.sum((valid & ~reg).to(tl.int32), 0) != 0:  # else the block's candidates are all in the region
        m, total = _max_sum(tl.where(reg[None, :], s, float("-inf")))
    tl.store(out + 2 * SHR * NB, m, mask=rmask)
    tl.store(out + 3 * SHR * NB, total, mask=rmask)


@triton.jit
def _max_sum(x):
    """Row max of ``x`` and the row sum of exp(x - max)."""
    m = tl.max(x, 1)
    return m, tl.sum(tl.exp(x - tl.where(m == float("-inf"), 0.0, m)[:, None]), 1)


@triton.jit(do_not_specialize=["NB", "SHR"])
def _lse(Part, Lse, NB, SHR, BLOCK: tl.constexpr):
    """Log-sum-exp of one (row, head, query) over all candidates (programs ``[0, SHR)``) or over the
    region (``[SHR, 2 SHR)``) from the blocks' statistics: one launch instead of ten torch ops."""
    row = tl.program_id(0)
    kind = row // SHR
    M = Part + (2 * kind * SHR + row % SHR) * NB
    offs = tl.arange(0, BLOCK)
    top = float("-inf")
    for start in range(0, NB, BLOCK):
        b = start + offs
        top = tl.maximum(top, tl.max(tl.load(M + b, mask=b < NB, other=float("-inf")), 0))
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = 0.0
    for start in range(0, NB, BLOCK):
        b = start + offs
        m = tl.load(M + b, mask=b < NB, other=float("-inf"))
        sums = tl.load(M + SHR * NB + b, mask=b < NB, other=0.0)  # block sums of exp(x - block max)
        total += tl.sum(sums * tl.exp(m - shift), 0)  # past NB: 0 x exp(-inf)
    tl.store(Lse + row, top + tl.log(total))


@triton.jit(do_not_specialize=["NB", "SHR"])
def _scores(
    L, Pos, Lo, Hi, Lse, Held, F, Part, alpha, N, NB, SHR,
    stride_ls, stride_lh, stride_lr, stride_ln, stride_ps, stride_ph,
    H: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, HELD: tl.constexpr,
):
    """Per (row, head, block): unnormalised power-mean scores, and partial sums of them and of the held mass.
    One query row at a time (1-D loads, sums in registers): a [queries, candidates] tile reduced over
    its query axis can place the queries in different warps, and each reduction then goes through
    shared memory."""
    ih = tl.program_id(0)
    blk = tl.program_id(1)
    i = ih // H
    h = ih % H
    j = blk * BLOCK + tl.arange(0, BLOCK)
    inb = j < N
    p = tl.load(Pos + i * stride_ps + h * stride_ph + j, mask=inb, other=-1)
    valid, reg = p >= 0, (p >= tl.load(Lo + i)) & (p < tl.load(Hi + i))
    row = L + i * stride_ls + h * stride_lh + j * stride_ln
    power = tl.zeros([BLOCK], dtype=tl.float32)
    mass = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(R):
        s = tl.load(row + r * stride_lr, mask=inb, other=float("-inf")).to(tl.float32)  # padding: any value
        power += tl.where(reg, tl.exp(alpha * (s - tl.load(Lse + SHR + ih * R + r))), 0.0)
        if HELD:
            mass += tl.where(valid, tl.exp(s - tl.load(Lse + ih * R + r)), 0.0)
    mean = power / R
    f = tl.where(mean > 0, tl.exp(tl.log(mean) / alpha), 0.0)
    tl.store(F + ih * N + j, f, mask=inb)
    tl.store(Part + ih * NB + blk, tl.sum(f, 0))
    if HELD:
        held = tl.load(Held + ih * N + j, mask=inb, other=0) != 0
        tl.store(Part + (SHR // R + ih) * NB + blk, tl.sum(tl.where(held, mass, 0.0), 0) / R)


def group_scores(logits: torch.Tensor, positions: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 alpha: float, held: torch.Tensor | None = None,
                 block: int = BLOCK_N, num_warps: int = NUM_WARPS) -> Scores:
    """Triton version of :func:`group_scores_ref` (same arguments and results); ``block``
    (candidates per program) and ``num_warps`` are the launch shape (``benchmarks/tune_selector.py``)."""
    s_rows, hkv, r, n = logits.shape
    assert positions.stride(-1) == 1
    nb = triton.cdiv(n, block)
    shr = s_rows * hkv * r
    lo, hi = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    pos = positions.expand(s_rows, -1, n)
    strides = (logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3), pos.stride(0),
               pos.stride(1) if pos.shape[1] > 1 else 0)
    meta = dict(H=hkv, R=r, BLOCK_R=triton.next_power_of_2(r), BLOCK=block, num_warps=num_warps)
    grid = (s_rows * hkv, nb)
    part = torch.empty(4, shr, nb, dtype=torch.float32, device=logits.device)
    _block_stats[grid](logits, pos, lo, hi, part, n, nb, shr, *strides, **meta)
    lse = torch.empty(2 * shr, dtype=torch.float32, device=logits.device)  # all, then region
    _lse[(2 * shr,)](part, lse, nb, shr, BLOCK=256, num_warps=1)
    f = torch.empty(s_rows, hkv, n, dtype=torch.float32, device=logits.device)
    sums = torch.empty(1 + (held is not None), s_rows * hkv, nb, dtype=torch.float32, device=logits.device)
    held_arg = held.contiguous().view(torch.int8) if held is not None else f
    _scores[grid](logits, pos, lo, hi, lse, held_arg, f, sums, alpha, n, nb, shr, *strides,
                  H=hkv, R=r, BLOCK=block, HELD=held is not None, num_warps=num_warps)
    sums = sums.sum(-1).view(-1, s_rows, hkv)  # the score totals (and the held mass): one launch
    return Scores(f, sums[0], sums[1] if held is not None else None)
