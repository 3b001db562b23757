"""The end of a slow-step refresh in one launch: the measured coverage into the per-request state.

For each refreshed row ``i`` (req-pool slot ``slots[i]``) with per-layer coverage ``by_layer[i]``,
measured if it had a selection before its slow step (``prev_count[i] >= 0``): the slot's last
coverage (``coverage``, the mean over layers), its per-layer sums (``layer_cov``) and its summary
(``cov_stats``: sum of the means, lowest worst-layer value, slow steps measured), and the server
totals (``totals``, float64: sum of the means, sum of the worst layers, rows measured).

``finish_coverage_ref`` is the torch reference (CPU runs and the test oracle); ``finish_coverage``
does the same in one Triton program instead of about 20 small kernels: at batch 1 a refresh is
bound by its launches (``benchmarks/count_launches.py`` counts them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def finish_coverage_ref(slots: torch.Tensor, by_layer: torch.Tensor, prev_count: torch.Tensor,
                        coverage: torch.Tensor, layer_cov: torch.Tensor, cov_stats: torch.Tensor,
                        totals: torch.Tensor) -> None:
    """``by_layer [S, layers]`` coverage of the rows in ``slots`` -> the slot state (``coverage [slots]``,
    ``layer_cov [slots, layers]``, ``cov_stats [slots, 3]``) and ``totals [3]``."""
    measured = prev_count >= 0
    m = measured.float()
    mean, worst = by_layer.mean(1), by_layer.min(1).values
    layer_cov[slots] += by_layer * m.unsqueeze(1)
    coverage[slots] = torch.where(measured, mean, coverage[slots])
    st = cov_stats[slots]
    cov_stats[slots] = torch.stack(
        [st[:, 0] + mean * m, torch.where(measured, torch.minimum(st[:, 1], worst), st[:, 1]), st[:, 2] + m], 1)
    md = m.double()
    totals += torch.stack([(mean.double() * md).sum(), (worst.double() * md).sum(), md.sum()])


@triton.jit
def _finish_coverage(Slots, ByLayer, PrevCnt, LayerCov, Coverage, CovStats, Totals, S, L, BLOCK_L: tl.constexpr):
    layers = tl.arange(0, BLOCK_L)
    lmask = layers < L
    t_mean = tl.zeros([1], tl.float64)
    t_worst = tl.zeros([1], tl.float64)
    t_count = tl.zeros([1], tl.float64)
    for i in range(0, S):
        m = tl.load(PrevCnt + i) >= 0
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
        w = m.to(tl.float64)
        t_mean += mean.to(tl.float64) * w
        t_worst += worst.to(tl.float64) * w
        t_count += w
    one = tl.arange(0, 1)
    tl.store(Totals + one, tl.load(Totals + one) + t_mean)
    tl.store(Totals + 1 + one, tl.load(Totals + 1 + one) + t_worst)
    tl.store(Totals + 2 + one, tl.load(Totals + 2 + one) + t_count)


def finish_coverage(slots: torch.Tensor, by_layer: torch.Tensor, prev_count: torch.Tensor,
                    coverage: torch.Tensor, layer_cov: torch.Tensor, cov_stats: torch.Tensor,
                    totals: torch.Tensor) -> None:
    """Triton version of :func:`finish_coverage_ref` (same arguments); one launch, no host sync."""
    s_rows, layers = by_layer.shape
    if s_rows == 0:
        return
    assert by_layer.is_contiguous() and layer_cov.shape[1] == layers
    _finish_coverage[(1,)](slots, by_layer, prev_count, layer_cov, coverage, cov_stats, totals, s_rows, layers,
                           BLOCK_L=max(16, triton.next_power_of_2(layers)))
