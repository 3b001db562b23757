"""Per-step decode planning in one launch: slow/fast decision, counters, state advance.

For each batch row ``r`` (req-pool slot ``s = slots[r]``, context length ``n``): the row is slow
when its slot has no selection yet, when ``max_fast`` fast steps ran since its last slow step,
when the token it feeds ends a sentence or a line and the last slow step is at least ``min_gap``
steps ago, or when the token it feeds holds a value character (a digit, or a symbol of paths and code
names) and no slow step fed the token before its run of text (:func:`slow_rows`; the token classes
come from ``token_class``). Then:

- the counters ``acc`` (int64: slow rows, fast rows, -, kept tokens, context tokens) grow;
- ``rows`` (:class:`StepRows`) get each row's slot and its selection state before the step
  (count -1: none), and the first ``logit_rows`` slow rows whose candidate region
  ``[min(n, sinks), n - recent)`` holds more than ``topk`` tokens get a row of kept logits;
- the slot state advances: a slow row starts a selection over its new region (``hi``, ``count``),
  a fast row counts a step, and ``run`` counts the fed tokens since their run began. Rows past
  ``real`` (CUDA-graph padding) are slow and change nothing else.

``plan_step_ref`` is the torch reference (CPU runs and the test oracle); ``plan_step`` does the same
in one Triton program instead of ~40 small kernels: it runs before every graph replay.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Bits of a token's class (``token_class[token_id]``, uint8)
BOUNDARY = 1  # its text ends a sentence or a line
RUN_START = 2  # it starts a run of text (its text, after another token's, begins with whitespace)
VALUE = 4  # its text holds a digit or a symbol of paths and code names (``sfi_sglang.policy.VALUE_SYMBOLS``)


class StepRows(NamedTuple):
    """Per-batch-row outputs of a decode step's plan (static buffers: captured graphs bake their
    addresses). ``hi`` / ``count``: the row's selection state before this step (count -1: it had
    none); ``logit_row``: where a slow row's attention logits are kept (-1: nowhere)."""

    slow: torch.Tensor  # bool [rows]
    slots: torch.Tensor  # int64 [rows]: req-pool slot of each row
    hi: torch.Tensor  # int32 [rows]
    count: torch.Tensor  # int32 [rows]
    logit_row: torch.Tensor  # int32 [rows]

    @classmethod
    def zeros(cls, rows: int, device: torch.device | str) -> "StepRows":
        z = lambda dtype: torch.zeros(rows, dtype=dtype, device=device)  # noqa: E731
        return cls(z(torch.bool), z(torch.int64), z(torch.int32), z(torch.int32), z(torch.int32) - 1)


def slow_rows(fed_tokens: torch.Tensor, ready: torch.Tensor, steps: torch.Tensor, run: torch.Tensor,
              token_class: torch.Tensor, max_fast: int, min_gap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row slow/fast decision (bool) and the fed token's place in its run (int32: 0 at a run's
    first token, else ``run + 1``). Slow: no selection yet (``~ready``), ``steps`` (fast steps since
    the last slow one) at ``max_fast``, a boundary token fed at least ``min_gap`` steps after it, or
    a value token fed when the last slow step fed a token before its run's first (``steps`` past its
    place in the run): a number, an id or a path being copied is read densely as it starts."""
    cls = token_class[fed_tokens.clamp(0, token_class.numel() - 1).long()].int()
    place = torch.where(cls & RUN_START != 0, 0, run + 1).int()
    boundary = (cls & BOUNDARY != 0) & (steps >= min_gap)
    value = (cls & VALUE != 0) & (steps > place)
    return ~ready | (steps >= max_fast) | boundary | value, place


def plan_step_ref(input_ids: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor, real: int, bs: int,
                  token_class: torch.Tensor, ready: torch.Tensor, steps: torch.Tensor, run: torch.Tensor,
                  hi: torch.Tensor, count: torch.Tensor, rows: StepRows, acc: torch.Tensor, *, sinks: int,
                  recent: int, topk: int, max_fast: int, min_gap: int, logit_rows: int) -> None:
    """Plans ``bs`` batch rows (the first ``real`` live): writes ``rows.slow[:bs]``, ``rows.logit_row[:bs]``
    and the other ``rows`` fields ``[:real]``; advances the slot state ``ready, steps, run, hi, count``
    (indexed by slot) and adds to ``acc``."""
    s, n = slots[:real], seq_lens[:real].long()
    was_ready, st, h, c = ready[s], steps[s], hi[s].long(), count[s].long()
    slow, place = slow_rows(input_ids[:real], was_ready, st, run[s], token_class, max_fast, min_gap)
    fast = ~slow
    kept = torch.where(slow, n, h.clamp(max=sinks) + c + n - h)
    acc[[0, 1, 3, 4]] += torch.stack([slow.sum(), fast.sum(), (kept * fast).sum(), (n * fast).sum()])
    rows.slow[:bs] = True
    rows.slow[:real] = slow
    rows.slots[:real] = s
    rows.hi[:real] = hi[s]
    rows.count[:real] = torch.where(was_ready, count[s], -1)
    lo_new = n.clamp(max=sinks)
    hi_new = torch.maximum(lo_new, n - recent)
    scored = slow & (hi_new - lo_new > topk)
    rank = scored.int().cumsum(0) - 1
    rows.logit_row[:bs] = -1
    rows.logit_row[:real] = torch.where(scored & (rank < logit_rows), rank, -1)
    hi[s] = torch.where(slow, hi_new, h).int()
    count[s] = torch.where(slow, (hi_new - lo_new).clamp(max=topk), c).int()
    steps[s] = torch.where(slow, torch.zeros_like(st), st + 1)
    run[s] = place
    ready[s] = True


@triton.jit
def _plan_step(InputIds, Slots, SeqLens, Ready, Steps, Run, Hi, Cnt, TokenClass, Slow, RowSlots, RowHi, RowCnt,
               RowLogit, Acc, bs, real, vocab,
               SINKS: tl.constexpr, RECENT: tl.constexpr, TOPK: tl.constexpr, MAX_FAST: tl.constexpr,
               MIN_GAP: tl.constexpr, LOGIT_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    live = r < real
    slot = tl.load(Slots + r, mask=live, other=0).to(tl.int64)
    n = tl.load(SeqLens + r, mask=live, other=1).to(tl.int32)
    tok = tl.load(InputIds + r, mask=live, other=0).to(tl.int64)
    tok = tl.minimum(tl.maximum(tok, 0), vocab - 1)
    not_ready = tl.load(Ready + slot, mask=live, other=0) == 0
    steps = tl.load(Steps + slot, mask=live, other=0)
    hi = tl.load(Hi + slot, mask=live, other=0)
    cnt = tl.load(Cnt + slot, mask=live, other=0)
    cls = tl.load(TokenClass + tok, mask=live, other=0).to(tl.int32)
    place = tl.where((cls & 2) != 0, 0, tl.load(Run + slot, mask=live, other=0) + 1)  # RUN_START
    boundary = ((cls & 1) != 0) & (steps >= MIN_GAP)  # BOUNDARY
    value = ((cls & 4) != 0) & (steps > place)  # VALUE
    slow = not_ready | (steps >= MAX_FAST) | boundary | value
    fast = live & (slow == 0)
    kept = tl.where(slow, n, tl.minimum(hi, SINKS) + cnt + n - hi)
    slow_i = (live & slow).to(tl.int64)
    fast_i = fast.to(tl.int64)
    tl.store(Acc + 0, tl.load(Acc + 0) + tl.sum(slow_i, 0))
    tl.store(Acc + 1, tl.load(Acc + 1) + tl.sum(fast_i, 0))
    tl.store(Acc + 3, tl.load(Acc + 3) + tl.sum(kept.to(tl.int64) * fast_i, 0))
    tl.store(Acc + 4, tl.load(Acc + 4) + tl.sum(n.to(tl.int64) * fast_i, 0))
    lo_new = tl.minimum(n, SINKS)
    hi_new = tl.maximum(lo_new, n - RECENT)
    tl.store(Hi + slot, tl.where(slow, hi_new, hi), mask=live)
    tl.store(Cnt + slot, tl.where(slow, tl.minimum(hi_new - lo_new, TOPK), cnt), mask=live)
    tl.store(Steps + slot, tl.where(slow, 0, steps + 1), mask=live)
    tl.store(Run + slot, place, mask=live)
    tl.store(Ready + slot, tl.full([BLOCK], 1, tl.int1), mask=live)
    tl.store(Slow + r, slow | (r >= real), mask=r < bs)
    tl.store(RowSlots + r, slot, mask=live)
    tl.store(RowHi + r, hi, mask=live)
    tl.store(RowCnt + r, tl.where(not_ready, -1, cnt), mask=live)
    scored = live & slow & (hi_new - lo_new > TOPK)
    rank = tl.cumsum(scored.to(tl.int32), 0) - 1
    tl.store(RowLogit + r, tl.where(scored & (rank < LOGIT_ROWS), rank, -1), mask=r < bs)


def plan_step(input_ids: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor, real: int, bs: int,
              token_class: torch.Tensor, ready: torch.Tensor, steps: torch.Tensor, run: torch.Tensor,
              hi: torch.Tensor, count: torch.Tensor, rows: StepRows, acc: torch.Tensor, *, sinks: int,
              recent: int, topk: int, max_fast: int, min_gap: int, logit_rows: int) -> None:
    """Triton version of :func:`plan_step_ref` (same arguments); one launch, no host sync."""
    _plan_step[(1,)](
        input_ids, slots, seq_lens, ready, steps, run, hi, count, token_class, rows.slow, rows.slots, rows.hi,
        rows.count, rows.logit_row, acc, bs, real, token_class.numel(),
        SINKS=sinks, RECENT=recent, TOPK=topk, MAX_FAST=max_fast, MIN_GAP=min_gap, LOGIT_ROWS=logit_rows,
        BLOCK=max(16, triton.next_power_of_2(bs)),
    )
