"""The Selector (scores, neighbour spread, top-k) and its logits kernel, against explicit-loop references."""

import math

import pytest
import torch

from sfi_sglang.kernels.candidate_logits import candidate_logits, candidate_logits_ref
from sfi_sglang.kernels.group_scores import group_scores, group_scores_ref, in_region
from sfi_sglang.kernels.topk_select import (PAD_POSITION, coarse, restrict, scaled, spread_to_neighbors,
                                            topk_positions, topk_select_ref)
from sfi_sglang.refresher import region_positions


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- topk_positions -----------------------------------------------------------------------


@pytest.mark.parametrize("hkv, n, k, lo", [(1, 10, 3, 0), (2, 37, 8, 4), (4, 5, 5, 100), (3, 6, 50, 7)])
def test_topk_positions_shape_and_order(hkv, n, k, lo):
    scores = torch.rand(hkv, n, generator=gen(n))
    out = topk_positions(scores, torch.arange(lo, lo + n), k)
    assert out.dtype == torch.int32
    assert out.shape == (hkv, min(k, n))
    for h in range(hkv):
        row = out[h].tolist()
        assert row == sorted(set(row))  # ascending, no duplicates
        assert all(lo <= p < lo + n for p in row)
        # exactly the k best scores at the Selector's precision, ties to the earlier position
        best = sorted(range(n), key=lambda i: (-float(coarse(scores)[h, i]), i))[: min(k, n)]
        assert row == sorted(i + lo for i in best)


def test_topk_positions_ties_go_to_earlier_positions():
    assert topk_positions(torch.zeros(2, 10), torch.arange(10), 3).tolist() == [[0, 1, 2]] * 2
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0], [3.0, 1.0, 1.0, 3.0, 1.0, 1.0]])
    assert topk_positions(s, torch.arange(6), 2).tolist() == [[1, 2], [0, 3]]
    assert topk_positions(s, torch.arange(6), 3).tolist() == [[1, 2, 3], [0, 1, 3]]


def test_topk_positions_padding_loses_and_sorts_last():
    """Padding (-1 score) loses to every real candidate; picked padding reads PAD_POSITION, last."""
    s = torch.tensor([[[0.0, 0.5, -1.0, 0.1, -1.0, -1.0]]])
    pos = torch.tensor([[[7, 9, -1, 30, -1, -1]]])
    assert topk_positions(s, pos, 5)[0, 0].tolist() == [7, 9, 30, PAD_POSITION, PAD_POSITION]


def test_topk_positions_per_head_candidates():
    s = torch.tensor([[[0.1, 0.9, 0.5], [0.8, 0.1, 0.7]]])
    pos = torch.tensor([[[3, 8, 20], [4, 5, 21]]])
    assert topk_positions(s, pos, 2)[0].tolist() == [[8, 20], [4, 21]]


# ---- group_scores -------------------------------------------------------------------------


def loop_group_mean(q, keys, scale):
    """Mean over a KV head's query group (all W rows, all G heads) of softmax(q.k * scale), float64."""
    w, hq, d = q.shape
    n, hkv, _ = keys.shape
    g = hq // hkv
    out = torch.zeros(hkv, n, dtype=torch.float64)
    for h in range(hkv):
        for r in range(w):
            for qh in range(h * g, (h + 1) * g):
                logits = [float(q[r, qh].double() @ keys[i, h].double()) * scale for i in range(n)]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                for i in range(n):
                    out[h, i] += e[i] / sum(e) / (w * g)
    return out


def scores_of(q, keys, scale, alpha, window=0):
    """Selector scores [Hkv, n] of one request whose candidates are ``keys [n, Hkv, D]``."""
    n, hkv, d = keys.shape
    req_to_token = torch.arange(n, dtype=torch.int32).view(1, n)
    lo, hi = torch.zeros(1, dtype=torch.int32), torch.full((1,), n, dtype=torch.int32)
    pos = region_positions(lo, hi, n)
    logits = candidate_logits_ref(q[None, None], [keys], req_to_token, lo, pos, scale)
    return aggregate(logits, pos, alpha, (lo, hi), window)[0]


def aggregate(logits, pos, alpha, region, window, contiguous=False):
    """The Selector's scores from logits: group_scores_ref, scaled by the totals, spread; -1 on padding."""
    f, total, _ = group_scores_ref(logits, pos, *region, alpha)
    f = scaled(f, total)
    if window:
        f = spread_to_neighbors(f, pos, window, contiguous)
    return f.masked_fill(pos < 0, -1.0)


@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("w", [1, 2])
def test_scores_alpha1_are_group_mean_softmax(ratio, w):
    hkv, d, n = 2, 8, 13
    q = torch.randn(w, hkv * ratio, d, generator=gen(ratio * 10 + w))
    keys = torch.randn(n, hkv, d, generator=gen(ratio * 10 + w + 1))
    scale = 1 / math.sqrt(d)
    f = scores_of(q, keys, scale, alpha=1.0)
    assert f.shape == (hkv, n)
    torch.testing.assert_close(f.double(), loop_group_mean(q, keys, scale), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(f.sum(-1), torch.ones(hkv), atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.2])
def test_scores_rows_sum_to_one(alpha):
    q = torch.randn(2, 8, 16, generator=gen(3))
    keys = torch.randn(40, 2, 16, generator=gen(4))
    f = scores_of(q, keys, 0.25, alpha=alpha)
    assert f.shape == (2, 40)
    assert (f >= 0).all()
    torch.testing.assert_close(f.sum(-1), torch.ones(2), atol=1e-5, rtol=0)


def test_batched_scores_equal_one_request_at_a_time():
    """Padding a shorter region to the batch width changes nothing inside it and masks the rest."""
    hkv, d, lens = 2, 8, [5, 17, 1, 9]
    pool = torch.randn(100, hkv, d, generator=gen(8))
    req_to_token = torch.randperm(100, generator=gen(9))[:80].view(4, 20).to(torch.int32)
    q = torch.randn(4, 2, hkv * 3, d, generator=gen(10))
    slots, lo = torch.tensor([2, 0, 3, 1]), torch.tensor([3, 0, 2, 4])
    hi = lo + torch.tensor(lens)
    pos = region_positions(lo, hi, max(lens))
    logits = candidate_logits_ref(q[None], [pool], req_to_token, slots, pos, 0.3)
    f = aggregate(logits, pos, 0.5, (lo, hi), 2)
    for i, n in enumerate(lens):
        keys = pool[req_to_token[slots[i], lo[i]:hi[i]].long()]
        torch.testing.assert_close(f[i, :, :n], scores_of(q[i], keys, 0.3, 0.5, 2))
        assert (f[i, :, n:] == -1).all()


@pytest.mark.parametrize("ratio, w, cap", [(1, 1, 0.0), (3, 2, 0.0), (4, 1, 3.0), (8, 2, 0.0)])
def test_triton_logits_match_reference(ratio, w, cap):
    """Two layers in one call (separate K pools, one query set each), as the Selector batches them."""
    hkv, d = 2, 16
    pool = [torch.randn(300, hkv, d, generator=gen(ratio + x)) for x in range(2)]
    req_to_token = torch.randperm(300, generator=gen(1))[:240].view(3, 80).to(torch.int32)
    q = torch.randn(2, 3, w, hkv * ratio, d, generator=gen(2))
    slots = torch.tensor([1, 2, 0])
    region = region_positions(torch.tensor([0, 4, 7]), torch.tensor([70, 5, 77]), 70)
    # per-head lists: a cached selection (ascending, padded) then new tokens, as selection reuse builds them
    per_head = torch.stack([torch.cat([torch.randperm(60, generator=gen(h))[:9].sort().values, torch.tensor([-1]),
                                       torch.arange(60, 75)]) for h in range(hkv)]).int()
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on CPU
    q, req_to_token, slots = (t.to(dev) for t in (q, req_to_token, slots))
    pool = [p.to(dev) for p in pool]
    tol = 1e-5 if dev == "cpu" else 5e-3  # GPU dots on fp32 use TF32
    for pos in (region.repeat(2, 1, 1).to(dev), per_head.expand(6, -1, -1).to(dev)):
        args = (q, pool, req_to_token, slots, pos, 0.2, cap)
        want, got = candidate_logits_ref(*args), candidate_logits(*args)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        assert (got[(pos < 0).unsqueeze(2).expand_as(got)] == float("-inf")).all()


def test_neighbor_window_keeps_spans():
    scores = torch.tensor([[0, 0, 0, 1.0, 0, 0, 0, 0.5, 0, 0]])
    pos = torch.arange(10)
    spread = spread_to_neighbors(scores, pos, 1)
    assert topk_positions(spread, pos, 1).tolist() == [[3]]  # the peak still ranks first
    assert topk_positions(spread, pos, 4).tolist() == [[2, 3, 4, 7]]  # then its neighbours
    plain = set(topk_positions(scores, pos, 4).tolist()[0])
    assert {3, 7} <= plain and not {2, 4} & plain  # without the window, neighbours lose to ties


def test_neighbor_window_follows_positions_not_list_order():
    """On a sparse candidate list, only candidates within +-window positions are neighbours."""
    scores = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    pos = torch.tensor([[10, 11, 40, 41]])
    spread = spread_to_neighbors(scores, pos, 2)
    torch.testing.assert_close(spread, torch.tensor([[0.5, 1.0, 0.0, 0.0]]))
    # on a contiguous region it is a sliding max
    s = torch.rand(3, 50, generator=gen(5))
    want = 0.5 * (s + torch.nn.functional.max_pool1d(s.unsqueeze(1), 5, 1, 2).squeeze(1))
    torch.testing.assert_close(spread_to_neighbors(s, torch.arange(50), 2), want)


@pytest.mark.parametrize("seed", range(3))
def test_whole_context_restricted_to_the_region_selects_as_the_region(seed):
    """A refresh after a slow step scores [0, n) (for coverage) and ranks only [lo, hi):
    the same selection as scoring [lo, hi) alone."""
    g = gen(seed)
    n = torch.tensor([40, 33, 57])
    lo, hi = torch.full((3,), 4), n - 16
    full = region_positions(torch.zeros(3, dtype=torch.long), n, 57)
    logits = torch.randn(3, 2, 4, 57, generator=g).masked_fill(full.unsqueeze(2) < 0, float("-inf"))
    f, total, _ = group_scores_ref(logits, full, lo, hi, 0.5)
    got = topk_select_ref(f, full, 7, 2, total, (lo, hi))  # ranks the region only
    assert torch.equal(got, topk_select_ref(f, restrict(full, lo, hi), 7, 2, total, (lo, hi)))
    region = region_positions(lo, hi, int((hi - lo).max()))
    cols = (region.clamp_min(0).long()).expand(3, 2, -1).unsqueeze(2).expand(-1, -1, 4, -1)
    logits = logits.gather(-1, cols).masked_fill(region.unsqueeze(2) < 0, float("-inf"))
    f, total, _ = group_scores_ref(logits, region, lo, hi, 0.5)
    want = topk_select_ref(f, region, 7, 2, total, (lo, hi))
    assert torch.equal(got, want)


@pytest.mark.parametrize("r, per_head, with_held, shift, token_major",
                         [(4, False, True, 0.0, False), (8, True, False, 0.0, True), (8, False, True, -120.0, False),
                          (1, False, True, 0.0, False), (3, True, True, 0.0, False), (4, False, True, 0.0, True)])
def test_triton_group_scores_match_reference(r, per_head, with_held, shift, token_major):
    """Regions inside and at the edges of the candidates, padding (holding NaN), per-head lists, lengths
    that are not multiples of the block, blocks with candidates but none in the region, ties (repeated
    logits), logits far below 0 (``shift``), with and without coverage; logits query-major (as
    ``candidate_logits`` writes them) or token-major (as the slow step keeps them, fp16)."""
    g, s_rows, hkv, n = gen(r), 3, 2, 300 + 37 * r
    lens = torch.tensor([n, n - 41, 5])
    pos = region_positions(torch.zeros(s_rows, dtype=torch.long), lens, n)
    if per_head:
        pos = pos.expand(s_rows, hkv, n).clone()
        pos[:, 1, 100:140] = -1
    lo, hi = torch.tensor([0, 4, 1]), torch.tensor([n, min(n - 60, 400), 5])
    logits = (3 * torch.randn(s_rows, hkv, r, n, generator=g)).round() + shift  # rounded: many ties
    logits = logits.masked_fill(pos.unsqueeze(2) < 0, float("nan"))  # padding: stale values, never read as scores
    if token_major:
        logits = logits.half().transpose(2, 3).contiguous().transpose(2, 3)
    held = torch.rand(s_rows, hkv, n, generator=g) < 0.3 if with_held else None
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on CPU
    to = lambda t: t.to(dev) if t is not None else None  # noqa: E731
    want_f, want_t, want_c = group_scores_ref(logits, pos, lo, hi, 0.5, held)
    got_f, got_t, got_c = group_scores(*map(to, (logits, pos, lo, hi)), 0.5, to(held))
    torch.testing.assert_close(got_f.cpu(), want_f, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got_t.cpu(), want_t, atol=1e-6, rtol=1e-4)
    assert (got_f.cpu()[~in_region(pos, lo, hi).expand_as(want_f)] == 0).all()
    if with_held:
        torch.testing.assert_close(got_c.cpu(), want_c, atol=1e-6, rtol=1e-4)
    else:
        assert got_c is None
