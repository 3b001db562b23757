"""Per-step decode planning in one launch: slow/fast decision, counters, state advance.

For each batch row (req-pool slot ``s``): the policy of ``sfi_sglang.policy.slow_rows``
marks it slow, the counters of ``SFIStats.add_decode`` are accumulated, and the
selection state advances as in ``SelectionStore.advance``; rows past ``real``
(CUDA-graph padding) are marked slow and change nothing else. Each row's slot and
its selection state before the step go to ``StepRows`` for the next step's refresh, and
the first ``cfg.logit_rows`` slow rows that the Selector will score (their region holds
more than ``topk`` tokens) get a row of the kept logits (``sfi_sglang.memory.slow_logits``).

``plan_step_ref`` composes those torch functions (CPU runs and the test oracle);
``plan_step`` does the same in one Triton program instead of ~40 small kernels,
which matters because this runs before every graph replay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfi_sglang.memory import SelectionStore, StepRows
from sfi_sglang.metrics import SFIStats
from sfi_sglang.policy import slow_rows


def plan_step_ref(store: SelectionStore, stats: SFIStats, is_boundary: torch.Tensor, input_ids: torch.Tensor,
                  slots: torch.Tensor, seq_lens: torch.Tensor, real: int, bs: int, rows: StepRows) -> None:
    """Writes ``rows.slow[:bs]`` and the other ``rows`` fields ``[:real]``; updates ``store`` and ``stats``."""
    cfg = store.cfg
    s, n = slots[:real], seq_lens[:real]
    rows.slow[:bs] = True
    slow = rows.slow[:real]
    slow[:] = slow_rows(input_ids[:real], store.ready[s], store.steps[s], is_boundary, store.gap[s], cfg)
    stats.add_decode(slow, store.kept(s, n, slow), n)
    rows.slots[:real] = s
    rows.hi[:real] = store.hi[s]
    rows.count[:real] = torch.where(store.ready[s], store.count[s], -1)
    lo, hi, _ = store.bounds(n)
    scored = slow & (hi - lo > cfg.topk)
    rank = scored.int().cumsum(0).int() - 1
    rows.logit_row[:bs] = -1
    rows.logit_row[:real] = torch.where(scored & (rank < cfg.logit_rows), rank, -1)
    store.advance(s, n, slow)


@triton.jit
def _plan_step(InputIds, Slots, SeqLens, Ready, Steps, Hi, Cnt, Gap, IsBoundary, Slow, RowSlots, RowHi, RowCnt,
               RowLogit, Acc, bs, real, vocab,
               SINKS: tl.constexpr, RECENT: tl.constexpr, TOPK: tl.constexpr, MAX_FAST: tl.constexpr,
               LOGIT_ROWS: tl.constexpr, BLOCK: tl.constexpr):
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
    gap = tl.load(Gap + slot, mask=live, other=0)
    boundary = (tl.load(IsBoundary + tok, mask=live, other=0) != 0) & (steps >= gap)
    slow = not_ready | (steps >= MAX_FAST) | boundary
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
    tl.store(Ready + slot, tl.full([BLOCK], 1, tl.int1), mask=live)
    tl.store(Slow + r, slow | (r >= real), mask=r < bs)
    tl.store(RowSlots + r, slot, mask=live)
    tl.store(RowHi + r, hi, mask=live)
    tl.store(RowCnt + r, tl.where(not_ready, -1, cnt), mask=live)
    scored = live & slow & (hi_new - lo_new > TOPK)
    rank = tl.cumsum(scored.to(tl.int32), 0) - 1
    tl.store(RowLogit + r, tl.where(scored & (rank < LOGIT_ROWS), rank, -1), mask=r < bs)


def plan_step(store: SelectionStore, stats: SFIStats, is_boundary: torch.Tensor, input_ids: torch.Tensor,
              slots: torch.Tensor, seq_lens: torch.Tensor, real: int, bs: int, rows: StepRows) -> None:
    """Triton version of :func:`plan_step_ref` (same arguments); one launch, no host sync."""
    cfg = store.cfg
    _plan_step[(1,)](
        input_ids, slots, seq_lens, store.ready, store.steps, store.hi, store.count, store.gap, is_boundary,
        rows.slow, rows.slots, rows.hi, rows.count, rows.logit_row, stats.acc, bs, real, is_boundary.numel(),
        SINKS=cfg.sinks, RECENT=cfg.recent, TOPK=cfg.topk, MAX_FAST=cfg.max_fast_steps, LOGIT_ROWS=cfg.logit_rows,
        BLOCK=max(16, triton.next_power_of_2(bs)),
    )
    stats.decode_steps += 1
