"""Per-step decode planning in one launch: slow/fast decision, counters, state advance.

For each batch row (req-pool slot ``s``): the policy of ``sfi_sglang.policy.slow_rows``
marks it slow, the counters of ``SFIStats.add_decode`` are accumulated, and the
selection state advances as in ``SelectionStore.advance``; rows past ``real``
(CUDA-graph padding) are marked slow and change nothing else. The slot of every row
is kept in ``prev_slots`` for the next step's Selector.

``plan_step_ref`` composes those torch functions (CPU runs and the test oracle);
``plan_step`` does the same in one Triton program instead of ~40 small kernels,
which matters because this runs before every graph replay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfi_sglang.memory import SelectionStore
from sfi_sglang.metrics import SFIStats
from sfi_sglang.policy import slow_rows


def plan_step_ref(store: SelectionStore, stats: SFIStats, is_boundary: torch.Tensor, input_ids: torch.Tensor,
                  slots: torch.Tensor, seq_lens: torch.Tensor, real: int, slow: torch.Tensor,
                  prev_slots: torch.Tensor) -> None:
    """Writes ``slow[:bs]`` and ``prev_slots[:real]``; updates ``store`` and ``stats``."""
    cfg = store.cfg
    s, n = slots[:real], seq_lens[:real]
    slow.fill_(True)
    slow[:real] = slow_rows(input_ids[:real], store.ready[s], store.steps[s], is_boundary, cfg)
    stats.add_decode(slow[:real], store.kept(s, n, slow[:real]), n)
    store.advance(s, n, slow[:real])
    prev_slots[:real] = s


@triton.jit
def _plan_step(InputIds, Slots, SeqLens, Ready, Steps, Hi, Cnt, IsBoundary, Slow, PrevSlots, Acc,
               bs, real, vocab,
               SINKS: tl.constexpr, RECENT: tl.constexpr, TOPK: tl.constexpr, MAX_FAST: tl.constexpr,
               MIN_GAP: tl.constexpr, BLOCK: tl.constexpr):
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
    boundary = (tl.load(IsBoundary + tok, mask=live, other=0) != 0) & (steps >= MIN_GAP)
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
    tl.store(PrevSlots + r, slot, mask=live)


def plan_step(store: SelectionStore, stats: SFIStats, is_boundary: torch.Tensor, input_ids: torch.Tensor,
              slots: torch.Tensor, seq_lens: torch.Tensor, real: int, slow: torch.Tensor,
              prev_slots: torch.Tensor) -> None:
    """Triton version of :func:`plan_step_ref` (same arguments); one launch, no host sync."""
    cfg, bs = store.cfg, slow.shape[0]
    _plan_step[(1,)](
        input_ids, slots, seq_lens, store.ready, store.steps, store.hi, store.count, is_boundary, slow,
        prev_slots, stats.acc, bs, real, is_boundary.numel(),
        SINKS=cfg.sinks, RECENT=cfg.recent, TOPK=cfg.topk, MAX_FAST=cfg.max_fast_steps,
        MIN_GAP=cfg.min_refresh_gap, BLOCK=max(16, triton.next_power_of_2(bs)),
    )
    stats.decode_steps += 1
