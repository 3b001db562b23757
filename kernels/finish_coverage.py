"""The end of a slow-step refresh in one launch: the measured coverage into the per-request state.

For each refreshed row ``i`` (req-pool slot ``slots[i]``) with per-layer coverage ``by_layer[i]``,
measured if it had a selection before its slow step (``prev_count[i] >= 0``) and, when given,
``keep[i]`` (a deferred refresh whose slot started another request since is not measured): the
request's summaries in the ``SelectionStore`` (``SelectionStore.add_coverage``), the server totals in
``SFIStats`` (``SFIStats.add_coverage``) and, with ``adaptive_refresh``, the row's boundary gap
(``sfi_sglang.coverage.next_gap``).

``finish_coverage_ref`` composes those torch functions (CPU runs and the test oracle);
``finish_coverage`` does the same in one Triton program instead of about 28 small kernels: at batch 1
a refresh is host-bound (``benchmarks/count_launches.py`` counts its launches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfi_sglang.coverage import next_gap
from sfi_sglang.memory import SelectionStore
from sfi_sglang.metrics import SFIStats


def finish_coverage_ref(store: SelectionStore, stats: SFIStats, slots: torch.Tensor, by_layer: torch.Tensor,
                        prev_count: torch.Tensor, keep: torch.Tensor | None = None) -> None:
    """``by_layer [S, layers]`` coverage of the rows in ``slots`` -> ``store`` and ``stats``."""
    measured = prev_count >= 0 if keep is None else (prev_count >= 0) & keep
    mean, worst = by_layer.mean(1), by_layer.min(1).values
    store.add_coverage(slots, mean, worst, measured, by_layer)
    stats.add_coverage(mean, worst, measured)
    if store.cfg.adaptive_refresh:
        store.gap[slots] = torch.where(measured, next_gap(store.gap[slots], mean, store.cfg), store.gap[slots])


@triton.jit
def _finish_coverage(Slots, ByLayer, PrevCnt, Keep, LayerCov, Coverage, CovStats, Gap, Totals, S, L,
                     KEEP: tl.constexpr, ADAPTIVE: tl.constexpr, TARGET: tl.constexpr, MIN_GAP: tl.constexpr,
                     MAX_FAST: tl.constexpr, BLOCK_L: tl.constexpr):
    layers = tl.arange(0, BLOCK_L)
    lmask = layers < L
    t_mean = tl.zeros([1], tl.float64)
    t_worst = tl.zeros([1], tl.float64)
    t_count = tl.zeros([1], tl.float64)
    for i in range(0, S):
        m = tl.load(PrevCnt + i) >= 0
        if KEEP:
            m = m & (tl.load(Keep + i) != 0)
        slot = tl.load(Slots + i).to(tl.int64)
        c = tl.load(ByLayer + i * L + layers, mask=lmask, other=0.0)
        mean = tl.sum(c, 0) / L
        worst = tl.min(tl.where(lmask, c, float("inf")), 0)
        row = LayerCov + slot * L + layers
        tl.store(row, tl.load(row, mask=lmask) + c, mask=lmask & m)
        tl.store(Coverage + slot, mean, mask=m)
        st = CovStats + slot * 3
        tl.store(st, tl.load(st) + mean, mask=m)
        tl.store(st + 1, tl.minimum(tl.load(st + 1), worst), mask=m)
        tl.store(st + 2, tl.load(st + 2) + 1.0, mask=m)
        if ADAPTIVE:
            gap = tl.load(Gap + slot)
            tl.store(Gap + slot, tl.where(mean >= TARGET, tl.minimum(2 * gap, MAX_FAST), MIN_GAP), mask=m)
        w = m.to(tl.float64)
        t_mean += mean.to(tl.float64) * w
        t_worst += worst.to(tl.float64) * w
        t_count += w
    one = tl.arange(0, 1)
    tl.store(Totals + one, tl.load(Totals + one) + t_mean)
    tl.store(Totals + 1 + one, tl.load(Totals + 1 + one) + t_worst)
    tl.store(Totals + 2 + one, tl.load(Totals + 2 + one) + t_count)


def finish_coverage(store: SelectionStore, stats: SFIStats, slots: torch.Tensor, by_layer: torch.Tensor,
                    prev_count: torch.Tensor, keep: torch.Tensor | None = None) -> None:
    """Triton version of :func:`finish_coverage_ref` (same arguments); one launch, no host sync."""
    s_rows, layers = by_layer.shape
    if s_rows == 0:
        return
    cfg = store.cfg
    assert by_layer.is_contiguous() and store.layer_cov.shape[1] == layers
    _finish_coverage[(1,)](
        slots, by_layer, prev_count, keep if keep is not None else prev_count, store.layer_cov, store.coverage,
        store.cov_stats, store.gap, stats.cov, s_rows, layers,
        KEEP=keep is not None, ADAPTIVE=cfg.adaptive_refresh, TARGET=cfg.coverage_target,
        MIN_GAP=cfg.min_refresh_gap, MAX_FAST=cfg.max_fast_steps, BLOCK_L=max(16, triton.next_power_of_2(layers)),
    )
