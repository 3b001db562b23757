"""Index lists and the sparse decode reference, against independent plain-Python references."""

import random

import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.indices import build_layout, layer_indices
from sfi_sglang.memory import SelectionStore
from sfi_sglang.kernels.sparse_decode import sparse_decode_ref

CFG = SFIConfig(sinks=2, topk=5, recent=4, max_fast_steps=8, min_refresh_gap=2)


def make_state(seq_lens, slow, layers=2, hkv=2, seed=0):
    """A store with random selections made at shorter lengths, and a req_to_token of shuffled slots."""
    rng = random.Random(seed)
    slots = torch.arange(1, len(seq_lens) + 1)
    store = SelectionStore(CFG, layers, len(seq_lens) + 1, hkv, "cpu")
    max_len = max(seq_lens) + 1
    perm = torch.randperm(len(slots) * max_len, generator=torch.Generator().manual_seed(seed))
    req_to_token = torch.zeros(len(seq_lens) + 1, max_len, dtype=torch.int32)
    req_to_token[1:] = perm.view(len(slots), max_len).to(torch.int32)
    sel_lens = torch.tensor([max(1, n - rng.randrange(0, 6)) for n in seq_lens])
    store.start(slots, sel_lens)
    lo, hi, count = store.bounds(sel_lens)
    for layer in range(layers):
        for i, s in enumerate(slots.tolist()):
            for h in range(hkv):
                pos = sorted(rng.sample(range(int(lo[i]), int(hi[i])), int(count[i])))
                store.pos[layer, s, h, : len(pos)] = torch.tensor(pos, dtype=torch.int32)
    return store, req_to_token, slots, torch.tensor(seq_lens), torch.tensor(slow)


def expected_lists(store, req_to_token, slots, seq_lens, slow, layer):
    """Per (row, head): the KV slots a step must attend to, built with plain Python."""
    out = []
    for i, s in enumerate(slots.tolist()):
        n = int(seq_lens[i])
        hi, cnt = int(store.hi[s]), int(store.count[s])
        lo = min(CFG.sinks, hi)
        for h in range(store.kv_heads):
            if slow[i]:
                pos = list(range(n))
            else:
                pos = list(range(lo)) + store.pos[layer, s, h, :cnt].tolist() + list(range(hi, n))
            out.append([int(req_to_token[s, p]) for p in pos])
    return out


def test_layout_matches_reference():
    seq_lens = [3, 9, 17, 30, 40]  # shorter than sinks+recent, selection region < topk, and longer
    slow = [False, False, True, False, False]
    store, r2t, slots, n, slow_t = make_state(seq_lens, slow)
    layout = build_layout(store, r2t, slots, n, slow_t)
    indptr = layout.kv_indptr.tolist()
    for layer in range(2):
        idx = layer_indices(layout, store, r2t, layer)
        got = [idx[a:b].tolist() for a, b in zip(indptr, indptr[1:])]
        want = expected_lists(store, r2t, slots, n, slow, layer)
        for v, (g, w) in enumerate(zip(got, want)):
            assert [x // 2 for x in g] == w, (layer, v)
            assert all(x % 2 == v % 2 for x in g)  # each list reads its own KV head
            assert len(set(g)) == len(g)
            row_slots = set(r2t[slots[v // 2], : seq_lens[v // 2]].tolist())
            assert set(x // 2 for x in g) <= row_slots


def dense_attention(q, keys, values, scale):
    """float64 softmax(q k^T * scale) v for one query head over given keys/values."""
    w = torch.softmax((keys.double() @ q.double()) * scale, dim=0)
    return w @ values.double()


def test_sparse_decode_equals_attention_over_the_same_tokens():
    torch.manual_seed(0)
    for g in (1, 3, 4):
        hkv, d, slots_total = 2, 8, 64
        b = 3
        k_pool = torch.randn(slots_total, hkv, d)
        v_pool = torch.randn(slots_total, hkv, d)
        q = torch.randn(b, hkv * g, d)
        lists = [sorted(random.Random(v).sample(range(slots_total), 5 + 3 * v)) for v in range(b * hkv)]
        indptr = torch.tensor([0] + [len(x) for x in lists]).cumsum(0).to(torch.int32)
        indices = torch.tensor([s * hkv + v % hkv for v, x in enumerate(lists) for s in x], dtype=torch.int32)
        out = sparse_decode_ref(q, k_pool.view(-1, d), v_pool.view(-1, d), indptr, indices, 0.3)
        for row in range(b):
            for hq in range(hkv * g):
                h = hq // g
                toks = lists[row * hkv + h]
                want = dense_attention(q[row, hq], k_pool[toks, h], v_pool[toks, h], 0.3)
                torch.testing.assert_close(out[row, hq].double(), want, atol=1e-5, rtol=1e-5)


def test_full_lists_equal_dense_attention():
    """A slow row's lists (every token of the request) give plain dense GQA attention."""
    torch.manual_seed(1)
    hkv, g, d, n = 2, 4, 16, 33
    k = torch.randn(n, hkv, d)
    v = torch.randn(n, hkv, d)
    q = torch.randn(1, hkv * g, d)
    store, r2t, slots, seq_lens, slow = make_state([n], [True], hkv=hkv)
    layout = build_layout(store, r2t, slots, seq_lens, slow)
    pool_k = torch.zeros(int(r2t.max()) + 1, hkv, d)
    pool_v = torch.zeros_like(pool_k)
    pool_k[r2t[1, :n].long()] = k
    pool_v[r2t[1, :n].long()] = v
    idx = layer_indices(layout, store, r2t, 0)
    out = sparse_decode_ref(q, pool_k.view(-1, d), pool_v.view(-1, d), layout.kv_indptr, idx, d**-0.5)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.view(1, hkv * g, 1, d), k.permute(1, 0, 2).repeat_interleave(g, 0)[None],
        v.permute(1, 0, 2).repeat_interleave(g, 0)[None],
    ).view(1, hkv * g, d)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_advance_moves_slow_rows_to_new_selection():
    store, r2t, slots, n, slow = make_state([20, 30], [True, False])
    hi_before = store.hi.clone()
    steps_before = store.steps.clone()
    store.advance(slots, n, slow)
    assert store.hi[1] == 20 - CFG.recent and store.count[1] == CFG.topk and store.steps[1] == 0
    assert store.hi[2] == hi_before[2] and store.steps[2] == steps_before[2] + 1
