"""Coverage of a previous selection against explicit loops, and its end-of-refresh kernel."""

import pytest
import torch

from sfi_sglang.kernels.group_scores import coverage
from sfi_sglang.kernels.held_mask import held_mask_ref
from sfi_sglang.refresher import region_positions


def case(seed: int, s: int = 3, hkv: int = 2, r: int = 4, k: int = 6):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(12, 30, (s,), generator=g)
    width = int(n.max())
    pos = region_positions(torch.zeros(s, dtype=torch.long), n, width)
    prev_hi = torch.stack([torch.randint(0, int(x) + 1, (1,), generator=g)[0] for x in n])
    prev_cnt = torch.randint(-1, k + 1, (s,), generator=g)
    prev_sel = torch.randint(0, 40, (s, hkv, k), generator=g).int()  # entries past the count are garbage
    logits = torch.randn(s, hkv, r, width, generator=g).masked_fill(pos.unsqueeze(2) < 0, float("-inf"))
    return pos, prev_hi, prev_sel, prev_cnt, logits, n


@pytest.mark.parametrize("seed", range(4))
def test_held_mask_ref_and_coverage_match_loops(seed):
    sinks = 2
    pos, prev_hi, prev_sel, prev_cnt, logits, n = case(seed)
    held = held_mask_ref(pos, sinks, prev_hi, prev_sel, prev_cnt)
    cov = coverage(logits, held)
    s, hkv, r, width = logits.shape
    for i in range(s):
        for h in range(hkv):
            chosen = set(prev_sel[i, h, : max(int(prev_cnt[i]), 0)].tolist())
            want = [j < n[i] and (j < sinks or j >= prev_hi[i] or j in chosen) for j in range(width)]
            assert held[i, h].tolist() == want
            p = logits[i, h].double().softmax(-1)
            mass = sum(p[:, j] for j in range(width) if want[j]).mean()
            assert abs(float(cov[i, h]) - float(mass)) < 1e-5


@pytest.mark.parametrize("seed", range(4))
def test_triton_held_mask_matches_held_mask_ref(seed):
    """The kernels (interpreted on CPU) against the torch reference: ascending selections (as the
    Selector writes them) and shuffled ones, counts -1..k, selected positions past a row's end,
    padding, lengths off the block size."""
    from sfi_sglang.kernels.held_mask import BLOCK_N, held_mask

    g = torch.Generator().manual_seed(seed)
    s, hkv, k = 3, 2, 37
    n = torch.randint(10, BLOCK_N + 200, (s,), generator=g)
    pos = region_positions(torch.zeros(s, dtype=torch.long), n, int(n.max()))
    prev_hi = torch.stack([torch.randint(0, int(x) + 1, (1,), generator=g)[0] for x in n])
    prev_cnt = torch.tensor([-1, 0, k])[torch.randperm(3, generator=g)] if seed == 0 else \
        torch.randint(-1, k + 1, (s,), generator=g)
    prev_sel = torch.stack([torch.stack([torch.randperm(int(n.max()) + 50, generator=g)[:k].sort().values
                                         for _ in range(hkv)]) for _ in range(s)]).int()
    if seed % 2:
        prev_sel = prev_sel[..., torch.randperm(k, generator=g)].contiguous()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = (pos.to(dev), 3, prev_hi.to(dev), prev_sel.to(dev), prev_cnt.to(dev))
    assert torch.equal(held_mask(*args).cpu(), held_mask_ref(*args).cpu())


def test_everything_held_is_full_coverage_and_nothing_is_zero():
    pos, prev_hi, prev_sel, prev_cnt, logits, n = case(7)
    everything = held_mask_ref(pos, 0, torch.zeros_like(prev_hi), prev_sel, prev_cnt)
    assert torch.allclose(coverage(logits, everything), torch.ones(3, 2))
    nothing = held_mask_ref(pos, 0, n, prev_sel, torch.zeros_like(prev_cnt))
    assert coverage(logits, nothing).abs().max() == 0


def test_triton_finish_coverage_matches_reference():
    """The one-launch end of a refresh (interpreted on CPU) against its torch composition: rows not
    measured (no selection before the slow step) leave their slot's state and the totals alone."""
    from sfi_sglang.kernels.finish_coverage import finish_coverage, finish_coverage_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    slots_total, layers, s = 10, 5, 6
    slots = torch.randperm(slots_total, generator=g)[:s]
    by_layer = 0.8 + 0.2 * torch.rand(s, layers, generator=g)
    prev_count = torch.tensor([3, -1, 0, 7, -1, 5], dtype=torch.int32)
    outs = []
    for fn in (finish_coverage_ref, finish_coverage):
        coverage_ = torch.full((slots_total,), -1.0, device=dev)
        layer_cov = torch.zeros(slots_total, layers, device=dev)
        cov_stats = torch.zeros(slots_total, 3, device=dev)
        cov_stats[:, 1] = 1.0
        totals = torch.zeros(3, dtype=torch.float64, device=dev)
        for _ in range(2):  # twice: sums and minima build on the state
            fn(slots.to(dev), by_layer.to(dev), prev_count.to(dev), coverage_, layer_cov, cov_stats, totals)
        outs.append([t.cpu() for t in (layer_cov, coverage_, cov_stats, totals)])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    measured = prev_count >= 0
    assert outs[0][3][2] == 2 * measured.sum()
    assert (outs[0][2][slots[~measured], 2] == 0).all() and (outs[0][1][slots[~measured]] == -1).all()
    torch.testing.assert_close(outs[0][2][slots[measured], 0], 2 * by_layer[measured].mean(1))
    torch.testing.assert_close(outs[0][2][slots[measured], 1], by_layer[measured].min(1).values)
