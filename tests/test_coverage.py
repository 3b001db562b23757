"""Coverage of a previous selection, and the adaptive gap, against explicit loops."""

import pytest
import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.coverage import coverage, kept_mask, next_gap
from sfi_sglang.selector import region_positions


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
def test_kept_mask_and_coverage_match_loops(seed):
    sinks = 2
    pos, prev_hi, prev_sel, prev_cnt, logits, n = case(seed)
    held = kept_mask(pos, sinks, prev_hi, prev_sel, prev_cnt)
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
def test_triton_held_mask_matches_kept_mask(seed):
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
    assert torch.equal(held_mask(*args).cpu(), kept_mask(*args).cpu())


def test_everything_held_is_full_coverage_and_nothing_is_zero():
    pos, prev_hi, prev_sel, prev_cnt, logits, n = case(7)
    everything = kept_mask(pos, 0, torch.zeros_like(prev_hi), prev_sel, prev_cnt)
    assert torch.allclose(coverage(logits, everything), torch.ones(3, 2))
    nothing = kept_mask(pos, 0, n, prev_sel, torch.zeros_like(prev_cnt))
    assert coverage(logits, nothing).abs().max() == 0


def test_adaptive_gap_doubles_on_high_coverage_and_resets_on_low():
    cfg = SFIConfig(min_refresh_gap=8, max_fast_steps=40, coverage_target=0.9)
    gap = torch.tensor([8, 16, 32, 40, 32], dtype=torch.int32)
    cov = torch.tensor([0.95, 0.9, 0.99, 0.99, 0.5])
    assert next_gap(gap, cov, cfg).tolist() == [16, 32, 40, 40, 8]


@pytest.mark.parametrize("adaptive, with_keep", [(False, False), (True, True), (True, False)])
def test_triton_finish_coverage_matches_reference(adaptive, with_keep):
    """The one-launch end of a refresh (interpreted on CPU) against its torch composition: rows not
    measured (no selection before, or not kept) leave their slot's state and the totals alone."""
    from sfi_sglang.kernels.finish_coverage import finish_coverage, finish_coverage_ref
    from sfi_sglang.memory import SelectionStore
    from sfi_sglang.metrics import SFIStats

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SFIConfig(adaptive_refresh=adaptive, min_refresh_gap=4, max_fast_steps=20, coverage_target=0.9)
    g = torch.Generator().manual_seed(int(adaptive) * 2 + int(with_keep))
    slots_total, layers, s = 10, 5, 6
    slots = torch.randperm(slots_total, generator=g)[:s]
    by_layer = 0.8 + 0.2 * torch.rand(s, layers, generator=g)
    prev_count = torch.tensor([3, -1, 0, 7, 2, 5], dtype=torch.int32)
    keep = torch.tensor([True, True, False, True, True, False]) if with_keep else None
    outs = []
    for fn in (finish_coverage_ref, finish_coverage):
        store, stats = SelectionStore(cfg, layers, slots_total, 2, dev), SFIStats(dev)
        store.gap.copy_(torch.randint(4, 20, (slots_total,), generator=torch.Generator().manual_seed(1)))
        store.cov_stats[:, 1] = 1.0
        for _ in range(2):  # twice: sums and minima build on the state
            fn(store, stats, slots.to(dev), by_layer.to(dev), prev_count.to(dev), keep.to(dev) if with_keep else None)
        outs.append([t.cpu() for t in (store.layer_cov, store.coverage, store.cov_stats, store.gap, stats.cov)])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    measured = (prev_count >= 0) & (keep if with_keep else True)
    assert outs[0][4][2] == 2 * measured.sum()
    assert (outs[0][2][slots[~measured], 2] == 0).all()
