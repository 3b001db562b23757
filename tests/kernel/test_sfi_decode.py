"""SFI decode attention (torch reference and Triton kernel) against plain-Python references."""

import math
import random

import pytest
import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.kernels import sfi_decode as sfi_decode_mod
from sfi_sglang.kernels.sfi_decode import sfi_decode_ref, token_positions
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


def pool(hkv, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(NUM_SLOTS * MAX_LEN, hkv, d, generator=g).to(dtype)
    v = torch.randn(NUM_SLOTS * MAX_LEN, hkv, d + 3, generator=g).to(dtype)  # Dv != D on purpose
    return k, v


def attend(q, keys, values, scale):
    """softmax(q . k * scale) @ V for one query head, float64."""
    w = torch.softmax((keys.double() @ q.double()) * scale, dim=0)
    return w @ values.double()


def decode(fn, store, req_to_token, slots, seq_lens, slow, k, v, q, scale, layer, cap=0.0, logits=None,
           logit_row=None, q_out=None):
    return fn(q, k, v, req_to_token, slots, seq_lens, slow, store.hi[slots], store.count[slots], store.pos[layer],
              CFG.sinks, scale, cap, logits, logit_row, q_out=q_out)


@pytest.mark.parametrize("hkv", [1, 2, 3])
def test_token_lists_are_the_requests_own_tokens_without_duplicates(hkv):
    store, req_to_token, slots, seq_lens, slow = make_state(hkv=hkv, seed=hkv)
    hi, cnt, n = store.hi[slots].long(), store.count[slots].long(), seq_lens.long()
    kept = torch.where(slow, n, hi.clamp(max=CFG.sinks) + cnt + n - hi)  # what the step plan counts
    for layer in range(LAYERS):
        for b, (slot, _, n, is_slow) in enumerate(REQUESTS):
            for h in range(hkv):
                got = token_positions(is_slow, n, int(store.hi[slot]), int(store.count[slot]), CFG.sinks,
                                      store.pos[layer, slot, h]).tolist()
                assert got == expected_positions(store, slot, n, is_slow, layer, h)
                assert len(set(got)) == len(got) and all(0 <= p < n for p in got)
                assert int(kept[b]) == len(got)


def test_selection_sizes_of_the_cases():
    """The cases above do cover what they claim (guards the test itself)."""
    store, *_ = make_state()
    want = {3: (26, 5), 0: (5, 3), 7: (2, 0), 5: (1, 0), 1: (2, 0), 2: (7, 5)}
    for slot, (hi, cnt) in want.items():
        assert (int(store.hi[slot]), int(store.count[slot])) == (hi, cnt)


@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_fast_step_equals_dense_attention_over_the_same_tokens(ratio):
    hkv, d, layer = 2, 16, 1
    store, req_to_token, slots, seq_lens, slow = make_state(hkv=hkv, seed=10 + ratio)
    k, v = pool(hkv, d, seed=ratio)
    q = torch.randn(len(REQUESTS), hkv * ratio, d, generator=torch.Generator().manual_seed(99))
    scale = 1 / math.sqrt(d)
    out = decode(sfi_decode_ref, store, req_to_token, slots, seq_lens, slow, k, v, q, scale, layer)
    assert out.shape == (len(REQUESTS), hkv * ratio, d + 3) and out.dtype == q.dtype
    for b, (slot, _, n, is_slow) in enumerate(REQUESTS):
        for qh in range(hkv * ratio):
            h = qh // ratio
            kv = req_to_token[slot, expected_positions(store, slot, n, is_slow, layer, h)].long()
            torch.testing.assert_close(out[b, qh].double(), attend(q[b, qh], k[kv, h], v[kv, h], scale),
                                       atol=1e-5, rtol=1e-5)


def test_slow_rows_and_covering_selections_equal_plain_dense_attention():
    hkv, d, ratio = 2, 8, 3
    store, req_to_token, slots, seq_lens, _ = make_state(hkv=hkv, seed=23)
    # fast rows whose selection covers the whole candidate region attend to everything too
    covering = torch.tensor([int(store.count[s]) == int(store.hi[s]) - min(CFG.sinks, int(store.hi[s]))
                             for s in slots.tolist()])
    assert covering.any() and not covering.all()
    k, v = pool(hkv, d, seed=7)
    q = torch.randn(len(REQUESTS), hkv * ratio, d, generator=torch.Generator().manual_seed(ratio))
    for slow in (torch.ones(len(REQUESTS), dtype=torch.bool), ~covering):
        out = decode(sfi_decode_ref, store, req_to_token, slots, seq_lens, slow, k, v, q, 0.3, 0)
        for b, (slot, _, n, _) in enumerate(REQUESTS):
            kv = req_to_token[slot, :n].long()
            keys = k[kv].repeat_interleave(ratio, dim=1).double()  # [n, Hq, D]
            vals = v[kv].repeat_interleave(ratio, dim=1).double()
            p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), keys) * 0.3, dim=-1)
            torch.testing.assert_close(out[b].double(), torch.einsum("hn,nhd->hd", p, vals), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hkv, ratio, block, min_chunk, slow_chunk, cap, dtype", [
    (2, 1, 64, 512, 0, 0.0, torch.float32),
    (2, 3, 16, 4, 0, 0.0, torch.float32),  # many splits per list, lengths not multiples of the block
    (2, 3, 16, 4, 48, 0.0, torch.float32),  # slow rows split coarser than fast rows
    (1, 4, 32, 16, 0, 5.0, torch.float32),  # logit soft cap
    (1, 8, 16, 8, 0, 0.0, torch.float16),
])
def test_triton_kernel_matches_reference(hkv, ratio, block, min_chunk, slow_chunk, cap, dtype, monkeypatch):
    launch = sfi_decode_mod.Launch(block=block, min_chunk=min_chunk, min_chunk_slow=slow_chunk)
    monkeypatch.setattr(sfi_decode_mod, "launch_for", lambda *_: launch)
    store, req_to_token, slots, seq_lens, slow = make_state(hkv=hkv, seed=30 + ratio)
    k, v = pool(hkv, 16, seed=ratio, dtype=dtype)
    q = torch.randn(len(REQUESTS), hkv * ratio, 16, generator=torch.Generator().manual_seed(5)).to(dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on CPU
    for name in ("hi", "count", "pos"):
        setattr(store, name, getattr(store, name).to(dev))
    # kept logits: slow rows 6 and 8 get rows 1 and 0, slow row 7 none; fast row 0's row 2 is ignored
    logit_row = torch.tensor([2, -1, -1, -1, -1, -1, 1, -1, 0], dtype=torch.int32)
    req_to_token, slots, seq_lens, slow, k, v, q, logit_row = (
        t.to(dev) for t in (req_to_token, slots, seq_lens, slow, k, v, q, logit_row))
    for layer in (0, 2):
        kept = [torch.full((3, hkv, MAX_LEN, ratio), 7.0, dtype=torch.float16, device=dev) for _ in range(2)]
        saved = torch.full((len(REQUESTS) + 2, *q.shape[1:]), 7.0, device=dev)  # more rows than the batch; fp32
        want = decode(sfi_decode_ref, store, req_to_token, slots, seq_lens, slow, k, v, q, 0.25, layer, cap,
                      kept[0], logit_row)
        got = decode(sfi_decode_mod.sfi_decode, store, req_to_token, slots, seq_lens, slow, k, v, q, 0.25, layer, cap,
                     kept[1], logit_row, q_out=saved)
        assert torch.equal(saved[:len(REQUESTS)], q.float()) and (saved[len(REQUESTS):] == 7.0).all()  # saved
        tol = 1e-5 if dtype == torch.float32 and dev == "cpu" else 5e-3  # GPU dots on fp32 use TF32
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(kept[1].float(), kept[0].float(), atol=1e-2, rtol=1e-2)
        assert (kept[0][2] == 7.0).all()  # a fast row writes nothing
        for row, b in ((0, 8), (1, 6)):  # the slow rows' logits over their whole context, then untouched
            slot, n = int(slots[b]), int(seq_lens[b])
            keys = k[req_to_token[slot, :n].long()].repeat_interleave(ratio, dim=1).float()  # [n, Hq, D]
            x = torch.einsum("hd,nhd->hn", q[b].float(), keys) * 0.25
            x = cap * torch.tanh(x / cap) if cap else x
            x = x.view(hkv, ratio, n).transpose(1, 2)  # token-major: [Hkv, n, G]
            torch.testing.assert_close(kept[0][row, :, :n].float(), x, atol=1e-2, rtol=1e-2)
            assert (kept[0][row, :, n:] == 7.0).all()


def test_plan_moves_slow_rows_to_a_new_selection():
    from sfi_sglang.kernels.plan_step import StepRows, plan_step_ref

    store, _, slots, seq_lens, _ = make_state()
    slow = torch.tensor([i % 2 == 0 for i in range(len(slots))])
    store.ready[slots] = True
    store.steps[slots] = torch.where(slow, CFG.max_fast_steps, 1).int()  # even rows reach the fast-step limit
    before = {name: getattr(store, name)[slots].clone() for name in ("hi", "count", "steps")}
    rows = StepRows.zeros(len(slots), "cpu")
    plan_step_ref(torch.zeros(len(slots), dtype=torch.long), slots, seq_lens, len(slots), len(slots),
                  torch.zeros(4, dtype=torch.uint8), store.ready, store.steps, store.run, store.hi, store.count, rows,
                  torch.zeros(5, dtype=torch.int64), sinks=CFG.sinks, recent=CFG.recent, topk=CFG.topk,
                  max_fast=CFG.max_fast_steps, min_gap=CFG.min_refresh_gap, logit_rows=0)
    assert torch.equal(rows.slow, slow)
    _, hi, count = store.bounds(seq_lens)
    for i in range(len(slots)):
        s = slots[i]
        if slow[i]:
            assert (store.hi[s], store.count[s], store.steps[s]) == (hi[i], count[i], 0)
        else:
            assert (store.hi[s], store.count[s]) == (before["hi"][i], before["count"][i])
            assert store.steps[s] == before["steps"][i] + 1


@pytest.mark.parametrize("seed", range(3))
def test_fuzz_decode_steps_stay_inside_each_request(seed):
    """Random budgets, lengths and boundary tokens through several decode steps of the step planner
    and the decode kernel (Triton, compiled on a GPU or interpreted on CPU, against the torch
    references), with a Selector stand-in picking random region positions for slow rows: every
    token list stays inside its request (no index outside [0, n), no duplicates)."""
    from sfi_sglang.kernels.plan_step import StepRows, plan_step, plan_step_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = SFIConfig(sinks=rng.randint(0, 4), topk=rng.randint(1, 12), recent=rng.randint(1, 8),
                    max_fast_steps=rng.randint(1, 6), min_refresh_gap=1)
    hkv, ratio, d, slots_n, max_len, vocab = rng.randint(1, 3), rng.choice([1, 3, 4]), 16, 8, 64, 50
    bs = rng.randint(1, slots_n)
    slots = torch.tensor(rng.sample(range(slots_n), bs))
    seq_lens = torch.tensor([rng.randint(1, max_len - 12) for _ in range(bs)], dtype=torch.int32)
    token_class = torch.randint(0, 8, (vocab,), generator=g, dtype=torch.uint8)  # boundary, run start, value
    req_to_token = torch.randperm(slots_n * max_len, generator=g).view(slots_n, max_len).to(torch.int32)
    k, v = torch.randn(2, slots_n * max_len, hkv, d, generator=g)
    stale = torch.randint(0, max_len, (1, slots_n, hkv, cfg.topk), generator=g, dtype=torch.int32)
    states = {}
    for name, where in (("ref", "cpu"), ("triton", dev)):
        store = SelectionStore(cfg, 1, slots_n, hkv, where)
        store.pos.copy_(stale)
        states[name] = (store, torch.zeros(5, dtype=torch.int64, device=where), StepRows.zeros(bs, where))
    to = lambda *ts: [t.to(dev) for t in ts]  # noqa: E731
    tol = 1e-5 if dev == "cpu" else 5e-3  # GPU dots on fp32 use TF32
    for step in range(8):
        ids = torch.randint(0, vocab, (bs,), generator=g)
        limits = dict(sinks=cfg.sinks, recent=cfg.recent, topk=cfg.topk, max_fast=cfg.max_fast_steps,
                      min_gap=cfg.min_refresh_gap, logit_rows=0)
        for fn, (st, acc, rows), args in ((plan_step_ref, states["ref"], (ids, slots, seq_lens, token_class)),
                                          (plan_step, states["triton"], to(ids, slots, seq_lens, token_class))):
            fn(*args[:3], bs, bs, args[3], st.ready, st.steps, st.run, st.hi, st.count, rows, acc, **limits)
        (store, _, rows), (store_t, _, rows_t) = states["ref"], states["triton"]
        for a, b in ((rows.slow, rows_t.slow), (store.hi, store_t.hi), (store.count, store_t.count),
                     (store.run, store_t.run), (store.steps, store_t.steps)):
            assert torch.equal(a, b.cpu())
        # the Selector's stand-in: new positions for slow rows (sorted, unique, in the region)
        for b in rows.slow.nonzero().flatten().tolist():
            s, n = int(slots[b]), int(seq_lens[b])
            lo, hi, cnt = min(cfg.sinks, n), int(store.hi[s]), int(store.count[s])
            for h in range(hkv):
                picked = torch.tensor(sorted(rng.sample(range(lo, hi), cnt)), dtype=torch.int32)
                store.pos[0, s, h, :cnt] = picked
                store_t.pos[0, s, h, :cnt] = picked.to(dev)
        slow = rows.slow.clone()
        for b in range(bs):
            s, n = int(slots[b]), int(seq_lens[b])
            for h in range(hkv):
                got = token_positions(bool(slow[b]), n, int(store.hi[s]), int(store.count[s]), cfg.sinks,
                                      store.pos[0, s, h]).tolist()
                assert len(set(got)) == len(got) and all(0 <= p < n for p in got), (step, b, h, got)
        q = torch.randn(bs, hkv * ratio, d, generator=g)
        # the decode reads the plan's per-row state (the backend passes rows.hi / rows.count): for
        # fast rows it is the store's, which only slow rows' plan changes
        fast = (~slow).nonzero().flatten()
        assert torch.equal(rows.hi[fast], store.hi[slots[fast]])
        assert torch.equal(rows.count[fast], store.count[slots[fast]])
        want = sfi_decode_ref(q, k, v, req_to_token, slots, seq_lens, slow, rows.hi, rows.count, store.pos[0],
                              cfg.sinks, 0.25)
        got = sfi_decode_mod.sfi_decode(*to(q, k, v, req_to_token, slots, seq_lens, slow), rows_t.hi, rows_t.count,
                                        store_t.pos[0], cfg.sinks, 0.25)
        torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol)
        seq_lens = seq_lens + 1  # the next step's token
