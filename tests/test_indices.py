"""Index lists (build_layout + layer_indices) and sparse_decode_ref, against plain-Python references."""

import math
import random

import pytest
import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.indices import build_layout, layer_indices
from sfi_sglang.kernels.sparse_decode import sparse_decode_ref
from sfi_sglang.memory import SelectionStore

CFG = SFIConfig(sinks=2, topk=5, recent=4, max_fast_steps=8, min_refresh_gap=2)
LAYERS, NUM_SLOTS, MAX_LEN = 3, 9, 40

# (req-pool slot, length when the selection was made, length now, slow)
REQUESTS = [
    (3, 30, 35, False),  # candidate region [2, 26) larger than topk
    (0, 9, 12, False),  # candidate region [2, 5): smaller than topk
    (7, 5, 5, False),  # shorter than sinks + recent: no candidates, first fast step
    (5, 1, 6, False),  # selection made with fewer tokens than sinks: lo = hi = 1
    (1, 6, 9, False),  # exactly sinks + recent at selection: empty region
    (2, 11, 11, False),  # region [2, 7) exactly topk, first fast step
    (8, 25, 20, True),  # slow rows ignore their (stale) state
    (6, 1, 3, True),
    (4, 1, 1, True),  # a one-token context
]


def make_state(requests=REQUESTS, hkv=2, seed=0):
    """Store with random selections, req_to_token holding a random permutation of KV slots."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    store = SelectionStore(CFG, LAYERS, NUM_SLOTS, hkv, "cpu")
    req_to_token = torch.randperm(NUM_SLOTS * MAX_LEN, generator=g).view(NUM_SLOTS, MAX_LEN).to(torch.int32)
    # stale garbage in every selection entry (valid positions, as a previous request would leave)
    store.pos.copy_(torch.randint(0, MAX_LEN, store.pos.shape, generator=g))
    slots = torch.tensor([r[0] for r in requests])
    sel_lens = torch.tensor([r[1] for r in requests])
    store.start(slots, sel_lens)
    lo, hi, count = store.bounds(sel_lens)
    for layer in range(LAYERS):
        for i, s in enumerate(slots.tolist()):
            for h in range(hkv):
                pos = sorted(rng.sample(range(int(lo[i]), int(hi[i])), int(count[i])))
                store.pos[layer, s, h, : len(pos)] = torch.tensor(pos, dtype=torch.int32)
    seq_lens = torch.tensor([r[2] for r in requests])
    slow = torch.tensor([r[3] for r in requests])
    return store, req_to_token, slots, seq_lens, slow


def expected_positions(store, slot, n, slow, layer, h):
    """Token positions one (row, KV head) attends to, in list order."""
    if slow:
        return list(range(n))
    hi, cnt = int(store.hi[slot]), int(store.count[slot])
    lo = min(CFG.sinks, hi)
    selected = [int(p) for p in store.pos[layer, slot, h, :cnt]]
    return list(range(lo)) + selected + list(range(hi, n))


def actual_lists(layout, store, req_to_token, layer):
    """Decode kv_indices into per-list (kv slot, head) pairs."""
    idx = layer_indices(layout, store, req_to_token, layer)
    assert idx.dtype == torch.int32 and layout.kv_indptr.dtype == torch.int32
    ptr = layout.kv_indptr.tolist()
    hkv = store.kv_heads
    return [[(int(x) // hkv, int(x) % hkv) for x in idx[a:b]] for a, b in zip(ptr[:-1], ptr[1:])]


@pytest.mark.parametrize("hkv", [1, 2, 3])
def test_index_lists_match_plain_python(hkv):
    store, req_to_token, slots, seq_lens, slow = make_state(hkv=hkv, seed=hkv)
    layout = build_layout(store, req_to_token, slots, seq_lens, slow)
    assert layout.kv_indptr.numel() == len(REQUESTS) * hkv + 1
    for layer in range(LAYERS):
        lists = actual_lists(layout, store, req_to_token, layer)
        for b, (slot, _, n, is_slow) in enumerate(REQUESTS):
            own = {int(x) for x in req_to_token[slot, :n]}
            for h in range(hkv):
                got = lists[b * hkv + h]
                pos = expected_positions(store, slot, n, is_slow, layer, h)
                assert got == [(int(req_to_token[slot, p]), h) for p in pos], (layer, b, h)
                assert all(kv in own for kv, _ in got)  # only this request's own tokens
                assert len(set(got)) == len(got)  # no duplicates
                assert int(layout.kept[b]) == len(got)


def test_selection_sizes_of_the_cases():
    """The cases above do cover what they claim (guards the test itself)."""
    store, *_ = make_state()
    want = {3: (26, 5), 0: (5, 3), 7: (2, 0), 5: (1, 0), 1: (2, 0), 2: (7, 5)}
    for slot, (hi, cnt) in want.items():
        assert (int(store.hi[slot]), int(store.count[slot])) == (hi, cnt)


def test_layers_differ_only_in_selected_entries():
    store, req_to_token, slots, seq_lens, slow = make_state(seed=5)
    layout = build_layout(store, req_to_token, slots, seq_lens, slow)
    a, b = (layer_indices(layout, store, req_to_token, layer) for layer in (0, 1))
    assert torch.equal(a[~layout.is_sel], b[~layout.is_sel])
    assert torch.equal(a[~layout.is_sel], layout.base[~layout.is_sel].to(torch.int32))


# ---- sparse_decode_ref --------------------------------------------------------------------


def make_pool(hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(NUM_SLOTS * MAX_LEN, hkv, d, generator=g)
    v = torch.randn(NUM_SLOTS * MAX_LEN, hkv, d + 3, generator=g)  # Dv != D on purpose
    return k, v


def attend(q, keys, values, scale):
    """softmax(q . k * scale) @ V for one query head, float64."""
    w = torch.softmax((keys.double() @ q.double()) * scale, dim=0)
    return w @ values.double()


def run_decode(store, req_to_token, slots, seq_lens, slow, k_pool, v_pool, q, scale, layer):
    layout = build_layout(store, req_to_token, slots, seq_lens, slow)
    idx = layer_indices(layout, store, req_to_token, layer)
    return sparse_decode_ref(
        q, k_pool.reshape(-1, k_pool.shape[-1]), v_pool.reshape(-1, v_pool.shape[-1]),
        layout.kv_indptr, idx, scale,
    )


@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_fast_step_equals_dense_attention_over_the_same_tokens(ratio):
    hkv, d, layer = 2, 16, 1
    store, req_to_token, slots, seq_lens, slow = make_state(hkv=hkv, seed=10 + ratio)
    k_pool, v_pool = make_pool(hkv, d, seed=ratio)
    q = torch.randn(len(REQUESTS), hkv * ratio, d, generator=torch.Generator().manual_seed(99))
    scale = 1 / math.sqrt(d)
    out = run_decode(store, req_to_token, slots, seq_lens, slow, k_pool, v_pool, q, scale, layer)
    assert out.shape == (len(REQUESTS), hkv * ratio, d + 3) and out.dtype == q.dtype
    for b, (slot, _, n, is_slow) in enumerate(REQUESTS):
        for qh in range(hkv * ratio):
            h = qh // ratio
            kv = req_to_token[slot, expected_positions(store, slot, n, is_slow, layer, h)].long()
            want = attend(q[b, qh], k_pool[kv, h], v_pool[kv, h], scale)
            torch.testing.assert_close(out[b, qh].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_full_lists_equal_plain_dense_attention(ratio):
    hkv, d = 2, 8
    store, req_to_token, slots, seq_lens, _ = make_state(hkv=hkv, seed=20 + ratio)
    # every row slow, plus the fast rows whose selection covers the whole candidate region
    covering = torch.tensor([int(store.count[s]) == int(store.hi[s]) - min(CFG.sinks, int(store.hi[s]))
                             for s in slots.tolist()])
    assert covering.any() and not covering.all()
    k_pool, v_pool = make_pool(hkv, d, seed=ratio + 7)
    q = torch.randn(len(REQUESTS), hkv * ratio, d, generator=torch.Generator().manual_seed(ratio))
    scale = 0.3
    for slow in (torch.ones(len(REQUESTS), dtype=torch.bool), ~covering):
        out = run_decode(store, req_to_token, slots, seq_lens, slow, k_pool, v_pool, q, scale, 0)
        for b, (slot, _, n, _) in enumerate(REQUESTS):
            kv = req_to_token[slot, :n].long()
            keys = k_pool[kv].repeat_interleave(ratio, dim=1).double()  # [n, Hq, D]
            vals = v_pool[kv].repeat_interleave(ratio, dim=1).double()
            p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), keys) * scale, dim=-1)
            want = torch.einsum("hn,nhd->hd", p, vals)
            torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)


def test_advance_moves_slow_rows_to_a_new_selection():
    store, _, slots, seq_lens, _ = make_state()
    slow = torch.tensor([i % 2 == 0 for i in range(len(slots))])
    before = {name: getattr(store, name)[slots].clone() for name in ("hi", "count", "steps")}
    store.advance(slots, seq_lens, slow)
    _, hi, count = store.bounds(seq_lens)
    for i in range(len(slots)):
        s = slots[i]
        if slow[i]:
            assert (store.hi[s], store.count[s], store.steps[s]) == (hi[i], count[i], 0)
        else:
            assert (store.hi[s], store.count[s]) == (before["hi"][i], before["count"][i])
            assert store.steps[s] == before["steps"][i] + 1
