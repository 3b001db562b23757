"""The Selector's top-k (Triton; interpreted on CPU) against its torch reference."""

import pytest
import torch

from sfi_sglang.kernels.topk_select import BLOCK_N, PAD_POSITION, RANK_BITS, topk_select, topk_select_ref
from sfi_sglang.refresher import region_positions

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def tied_regions(n, k, window):
    """Three rows x 2 KV heads: regions of n, n // 3 and 1 candidates (padding after them), scores
    rounded to quarters (many ties), exact zeros outside."""
    g = torch.Generator().manual_seed(n + k + window)
    lo = torch.tensor([0, 4, 0])
    pos = region_positions(lo, lo + torch.tensor([n, max(1, n // 3), 1]), n)
    return ((4 * torch.rand(3, 2, n, generator=g)).floor() / 4).masked_fill(pos < 0, 0.0), pos


def check(f, pos, k, window=0, total=None, region=None, contiguous=True, **launch):
    want = topk_select_ref(f, pos, k, window, total, region, contiguous)
    dev = lambda t: t.to(DEV) if t is not None else None  # noqa: E731
    got = topk_select(f.to(DEV), pos.to(DEV), k, window, dev(total), region and tuple(map(dev, region)), contiguous,
                      **launch).cpu()
    assert torch.equal(got, want)
    return got


@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("n, k", [(BLOCK_N + 77, 300), (50, 7), (3 * BLOCK_N, BLOCK_N + 5), (9, 20)])
def test_contiguous_regions_with_ties(n, k, window):
    """Regions of different lengths (padding after them), lengths off the block size, k above some
    rows' candidate counts, many ties (rounded scores), exact zeros."""
    got = check(*tied_regions(n, k, window), k, window)
    assert got.shape == (3, 2, min(k, n))
    assert (got[2, :, 1:] == PAD_POSITION).all() and (got[2, :, 0] == 0).all()


@pytest.mark.parametrize("chunks", [1, 3, None])
@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("n, k", [(128 * 5 + 77, 300), (50, 7), (128 * 6, 128 + 5)])
def test_rows_split_over_chunks(n, k, window, chunks):
    """Blocks of 128 candidates, rows split over chunks (the last one short): ties across chunk
    boundaries, k above some rows' candidate counts, totals."""
    f, pos = tied_regions(n, k, window)
    total = f.sum(-1) + 0.5 if window else None
    got = check(f, pos, k, window, total, chunks=chunks, block=128)
    assert (got[2, :, 1:] == PAD_POSITION).all() and (got[2, :, 0] == 0).all()


@pytest.mark.parametrize("chunks, window", [(None, 0), (5, 0), (5, 2)])
def test_per_head_candidates_with_padding_inside(chunks, window):
    """A cached selection's positions, padding, then new tokens (the reuse refresh's layout),
    a different list per KV head, and distinct scores; the spread (``window``) takes only neighbours
    within +-window positions (selected positions are often further apart than that)."""
    g = torch.Generator().manual_seed(0)
    s_rows, hkv, kept, new = 2, 3, 600, 700
    pos = torch.full((s_rows, hkv, kept + new), -1, dtype=torch.int32)
    for i in range(s_rows):
        for h in range(hkv):
            count = kept - 100 * (i + h)
            pos[i, h, :count] = torch.randperm(5000, generator=g)[:count].sort().values.int()
    pos[..., kept:] = torch.arange(5000, 5000 + new, dtype=torch.int32)
    f = torch.rand(s_rows, hkv, kept + new, generator=g).masked_fill(pos < 0, 0.0)
    region = (torch.full((s_rows,), 3), torch.full((s_rows,), 5000 + new - 40))  # a few candidates outside
    got = check(f, pos, 512, window, region=region, contiguous=False, chunks=chunks, block=128)
    assert (got >= 0).all() and (got != PAD_POSITION).all()
    if window:  # positions picked by their neighbours in candidate order would differ
        assert not torch.equal(got, topk_select_ref(f, pos, 512, window, region=region, contiguous=True))


@pytest.mark.parametrize("window, chunks", [(0, None), (2, 3)])
def test_region_ranks_only_its_candidates(window, chunks):
    """Candidates over the whole context and a region per row (a refresh after a slow step): the
    same selection as candidates restricted to the region, though sinks and the tail score highest."""
    from sfi_sglang.kernels.topk_select import restrict

    g = torch.Generator().manual_seed(window)
    n = torch.tensor([700, 450, 300])
    lo, hi = torch.tensor([4, 4, 0]), n - torch.tensor([64, 100, 1])
    pos = region_positions(torch.zeros(3, dtype=torch.long), n, 700)
    f = ((4 * torch.rand(3, 2, 700, generator=g)).floor() / 4).masked_fill(pos < 0, 0.0)
    f[..., :4] = f[..., -120:] = 9.0  # outside the regions (and padding): must not be picked
    got = check(f, pos, 200, window, region=(lo, hi), chunks=chunks, block=128)
    assert torch.equal(got, topk_select_ref(f, restrict(pos, lo, hi), 200, window))
    assert ((got >= lo.view(-1, 1, 1)) & (got < hi.view(-1, 1, 1))).all()


def test_scores_equal_at_ranking_precision_tie():
    """Scores that differ only below ranking precision (``RANK_BITS``) tie, and the earlier candidate
    wins; one bit of that precision more decides."""
    f = torch.tensor([[[1.0, 1.0 + 2.0 ** -(RANK_BITS + 2), 0.5, 1.0 + 2.0 ** -(RANK_BITS - 1)]]])
    pos = torch.arange(4, dtype=torch.int32).view(1, 1, -1)
    assert check(f, pos, 1).tolist() == [[[3]]]
    assert check(f[..., :3], pos[..., :3], 1).tolist() == [[[0]]]


@pytest.mark.parametrize("window", [0, 2])
def test_normalisation_in_the_kernel_equals_scaling_first(window):
    """Unnormalised scores and their row totals (``group_scores``' output) rank as the scaled
    scores do: the kernel multiplies by the totals' reciprocals (rounded products, no fused
    multiply-add), as torch's separate ops do, before the neighbour spread."""
    g = torch.Generator().manual_seed(window)
    n = 2 * BLOCK_N + 300  # 4396: at this n and seed, scaling the scores changes their ranking
    pos = region_positions(torch.tensor([0, 4]), torch.tensor([n, n - 500]), n)
    f = torch.rand(2, 3, n, generator=g).pow(8).masked_fill(pos < 0, 0.0)  # skewed: many near-ties
    total = f.sum(-1) * (1 + torch.rand(2, 3, generator=g))
    got = check(f, pos, 700, window, total)
    # rounding to ranking precision depends on the scale, so where the scaling happens matters
    assert not torch.equal(got, topk_select_ref(f * 3.7, pos, 700, window))


@pytest.mark.parametrize("total", [None, 1024.0])
def test_low_digit_counted_by_histogram_atomics_or_not_at_all_in_one_row(total):
    """Pass 2 counts a chunk's keys in the k-th key's high bin with ``tl.histogram`` when many are
    there (chunk 0: all tie at the k-th score), by atomic adds when few (chunk 1: 8 of 128) and not at
    all when none (chunk 2); one row mixes the three and matches the reference, on raw scores and on
    scores scaled by a total (a power of two: the same octaves, the normalized keys' digits)."""
    g = torch.Generator().manual_seed(5)
    u = lambda a, b, m: a + (b - a) * torch.rand(m, generator=g)  # noqa: E731
    chunk1 = torch.cat([u(0.76, 0.99, 8), u(1e-4, 1e-2, 120)])[torch.randperm(128, generator=g)]
    f = torch.cat([torch.full((128,), 0.75), chunk1, u(4.0, 100.0, 128)]).view(1, 1, -1)
    got = check(f, torch.arange(384, dtype=torch.int32).view(1, 1, -1), 128 + 8 + 64,
                total=total and torch.full((1, 1), total), chunks=3, block=128)
    assert (got[0, 0, :64] == torch.arange(64)).all()  # the first 64 of the tied chunk


def test_all_equal_scores_take_the_first_k():
    pos = torch.arange(3000, dtype=torch.int32).view(1, 1, -1)
    got = check(torch.zeros(1, 4, 3000), pos, 2048, window=2)
    assert torch.equal(got[0, 0], torch.arange(2048, dtype=torch.int32))


@pytest.mark.parametrize("contiguous", [True, False])
def test_group_scores_then_topk_equal_the_reference(contiguous):
    """The Selector's path (group scores, then the top-k over the whole context ranking the region,
    scaled by the totals, with the neighbour spread) gives the reference's positions through the kernel,
    for consecutive candidates and for sparse ones (a record's positions)."""
    from sfi_sglang.kernels.group_scores import group_scores_ref

    g = torch.Generator().manual_seed(int(contiguous))
    n = torch.tensor([1500, 900])
    lo, hi = torch.tensor([4, 4]), n - 64
    pos = region_positions(torch.zeros(2, dtype=torch.long), n, 1500)  # the whole context: the region is ranked
    if not contiguous:
        pos = torch.where(torch.arange(1500) % 3 == 1, -1, pos)  # sparse candidates, still ascending
    logits = torch.randn(2, 2, 4, 1500, generator=g).masked_fill(pos.unsqueeze(2) < 0, float("-inf"))
    f, total, _ = group_scores_ref(logits, pos, lo, hi, 0.5)
    got = check(f, pos, 100, 2, total, (lo, hi), contiguous)
    assert ((got >= lo.view(-1, 1, 1)) & (got < hi.view(-1, 1, 1))).all()
