"""The backend's Selector refresh (``SFIBackend._select``) does not depend on how it batches
requests and layers within its scratch budget."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sfi_sglang.selector as selector
from sfi_sglang.backend import SFIBackend, _slow_step_refresh
import sfi_sglang.memory as memory
from sfi_sglang.config import SFIConfig
from sfi_sglang.kernels.sfi_decode import sfi_decode_ref
from sfi_sglang.model_check import AttentionShape

LAYERS, HQ, HKV, D = 5, 4, 2, 16


def refresh(scratch: int, monkeypatch, align: int = selector.WIDTH_ALIGN,
            from_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Selections and coverage sums after a slow-step refresh of three requests of different lengths;
    ``from_logits``: scored from the logits their slow step kept instead of the keys."""
    monkeypatch.setattr(memory, "SELECTOR_SCRATCH", scratch)
    monkeypatch.setattr(selector, "WIDTH_ALIGN", align)
    g = torch.Generator().manual_seed(0)
    cfg = SFIConfig(topk=24, sinks=2, recent=8, slow_logit_rows=3 if from_logits else 0)
    lens = torch.tensor([90, 61, 40], dtype=torch.int32)
    req_to_token = torch.randperm(3 * 96, generator=g).int().view(3, 96)
    keys = [torch.randn(3 * 96, HKV, D, generator=g) for _ in range(LAYERS)]
    q = torch.randn(LAYERS, 3, HQ, D, generator=g)
    b = SFIBackend.selector_only(cfg, AttentionShape(LAYERS, HQ, HKV, D, D, D ** -0.5, 0.0), keys.__getitem__,
                                 req_to_token, torch.device("cpu"))
    slots = torch.arange(3)
    lo, hi, count = b.store.bounds(lens)
    b.store.pos.copy_(torch.randint(0, 90, b.store.pos.shape, generator=g).sort(-1).values)  # previous selection
    if from_logits:  # the slow step: every row dense, keeping its logits in rows 0-2
        for layer in range(LAYERS):
            sfi_decode_ref(q[layer], keys[layer], keys[layer], req_to_token, slots, lens, torch.ones(3, dtype=torch.bool),
                           b.store.hi[slots], b.store.count[slots], b.store.pos[layer], cfg.sinks, D ** -0.5, 0.0,
                           b.slow_logits[layer], torch.arange(3))
    r = _slow_step_refresh(slots, slots.view(-1, 1), lo.int(), hi.int(), lens, int(lens.max()),
                           (hi.int(), count.int()), from_logits)
    assert r.width % align == 0 and r.width >= int(lens.max())
    b._refresh_now(r, q)
    return b.store.pos.clone(), b.store.cov_stats.clone()


def test_batching_does_not_change_the_selection(monkeypatch):
    whole = refresh(2**30, monkeypatch)
    for scratch in (1, 4000):  # one request and one layer per pass; three requests and three layers per pass
        part = refresh(scratch, monkeypatch)
        assert torch.equal(part[0], whole[0])
        torch.testing.assert_close(part[1], whole[1])


def test_padded_candidates_do_not_change_the_selection(monkeypatch):
    exact = refresh(2**30, monkeypatch, align=1)  # width 90, the longest request
    for align in (16, 64):
        padded = refresh(2**30, monkeypatch, align=align)
        assert torch.equal(padded[0], exact[0])
        torch.testing.assert_close(padded[1], exact[1])


def test_kept_slow_step_logits_select_what_the_keys_select(monkeypatch):
    """Scoring from the slow step's kept logits (fp16) instead of re-reading the keys changes at
    most a few near-tied picks, and the coverage hardly at all."""
    keys = refresh(2**30, monkeypatch)
    for scratch in (2**30, 1500):  # all rows and layers at once (a view of the kept logits); a few per call
        kept = refresh(scratch, monkeypatch, from_logits=True)
        assert (kept[0] == keys[0]).float().mean() >= 0.98
        torch.testing.assert_close(kept[1], keys[1], atol=1e-3, rtol=1e-3)


def deferred_backend(lag: int):
    """A selector-only backend with two requests mid-decode (slots 0 and 1), each with a previous
    selection, just after a slow step whose plan set their new selection state."""
    from sfi_sglang.memory import StepRows

    g = torch.Generator().manual_seed(1)
    cfg = SFIConfig(topk=24, sinks=2, recent=8, refresh_lag=lag, min_refresh_gap=max(lag, 4))
    req_to_token = torch.randperm(2 * 96, generator=g).int().view(2, 96)
    keys = [torch.randn(2 * 96, HKV, D, generator=g) for _ in range(LAYERS)]
    b = SFIBackend.selector_only(cfg, AttentionShape(LAYERS, HQ, HKV, D, D, D ** -0.5, 0.0), keys.__getitem__,
                                 req_to_token, torch.device("cpu"))
    b.q_hist = torch.randn(LAYERS, 2, HQ, D, generator=g)
    b.step, b.deferred, b.side = 0, [], None
    b.rows = StepRows.zeros(2, "cpu")
    lens = torch.tensor([90, 70], dtype=torch.int32)
    b.store.pos.copy_(torch.randint(2, 40, b.store.pos.shape, generator=g).sort(-1).values)
    b.rows.slots[:] = torch.arange(2)
    b.rows.hi[:], b.rows.count[:] = torch.tensor([40, 40]), torch.tensor([24, 24])  # before the slow step
    lo, hi, count = b.store.bounds(lens)
    b.store.hi[:], b.store.count[:] = hi, count  # the slow step's plan
    slots = torch.arange(2)
    r = _slow_step_refresh(slots, slots.view(-1, 1), lo.int(), hi.int(), lens, int(lens.max()),
                           (b.rows.hi.clone(), b.rows.count.clone()))
    return b, r


def test_deferred_refresh_takes_over_after_the_lag():
    """refresh_lag 3: the rows keep their previous selection state for two steps, then get
    exactly what the refresh in line gives; a slot that started a new request meanwhile keeps its own."""
    now, r = deferred_backend(1)
    now._refresh_now(r, now.q_hist)
    b, r = deferred_backend(3)
    before = (b.store.pos.clone(), b.rows.hi.clone(), b.rows.count.clone())
    b._defer(r)
    for _ in range(2):  # steps 0 and 1: previous state
        b._apply_deferred()
        assert torch.equal(b.store.pos, before[0])
        assert torch.equal(b.store.hi, before[1]) and torch.equal(b.store.count, before[2])
        b.step += 1
    b.store.generation[1] += 1  # slot 1 started another request
    b._apply_deferred()  # step 2: the new selection of slot 0
    assert not b.deferred
    assert torch.equal(b.store.pos[:, 0], now.store.pos[:, 0]) and torch.equal(b.store.pos[:, 1], before[0][:, 1])
    assert b.store.hi[0] == now.store.hi[0] and b.store.count[0] == now.store.count[0]
    assert b.store.hi[1] == before[1][1] and b.store.count[1] == before[2][1]
    torch.testing.assert_close(b.store.cov_stats[0], now.store.cov_stats[0])
    assert b.store.cov_stats[1, 2] == 0  # not measured: another request's


def test_deferred_refreshes_are_reserved_up_front():
    """With refresh_lag > 1, the memory sfi takes from the KV-cache budget includes the selections
    that deferred refreshes may hold at once."""
    from sfi_sglang.memory import DEFERRED_ROWS, static_bytes

    shape = AttentionShape(LAYERS, HQ, HKV, D, D, D ** -0.5, 0.0)
    for rows in (3, 200):
        extra = static_bytes(SFIConfig(refresh_lag=8), shape, rows, torch.bfloat16, 1000) - static_bytes(
            SFIConfig(slow_logit_rows=0), shape, rows, torch.bfloat16, 1000)
        assert extra == min(rows, DEFERRED_ROWS) * LAYERS * HKV * SFIConfig().topk * 4


def test_kept_logits_are_reserved_up_front():
    """The kept slow-step logits (fp16, one row per kept slow row, 16-aligned context) are counted too."""
    from sfi_sglang.memory import static_bytes

    shape = AttentionShape(LAYERS, HQ, HKV, D, D, D ** -0.5, 0.0)
    extra = static_bytes(SFIConfig(slow_logit_rows=3), shape, 8, torch.bfloat16, 1000) - static_bytes(
        SFIConfig(slow_logit_rows=0), shape, 8, torch.bfloat16, 1000)
    assert extra == LAYERS * 3 * HQ * 1008 * 2


def decode_step_then_refresh(logit_rows: int, swap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of five requests, every one slow (max_fast_steps reached), through the plan and
    the decode kernel (torch references), then the refresh before the next step, as the backend runs
    them; ``swap``: two kept logit rows trade places before the refresh (a wrong row, on purpose)."""
    from sfi_sglang.kernels.plan_step import plan_step_ref
    from sfi_sglang.memory import StepRows

    g = torch.Generator().manual_seed(2)
    cfg = SFIConfig(topk=24, sinks=2, recent=8, max_fast_steps=4, min_refresh_gap=2, slow_logit_rows=logit_rows)
    req_to_token = torch.randperm(5 * 96, generator=g).int().view(5, 96)
    keys = [torch.randn(5 * 96, HKV, D, generator=g) for _ in range(LAYERS)]
    b = SFIBackend.selector_only(cfg, AttentionShape(LAYERS, HQ, HKV, D, D, D ** -0.5, 0.0), keys.__getitem__,
                                 req_to_token, torch.device("cpu"))
    b.q_hist = torch.randn(LAYERS, 5, HQ, D, generator=g)
    b.rows, b.slow_host, b.slow_ready = StepRows.zeros(5, "cpu"), torch.zeros(5, dtype=torch.bool), None
    b.step, b.deferred, b.side, b.pending = 0, [], None, None
    slots = torch.tensor([3, 0, 4, 1, 2])
    lens = torch.tensor([90, 30, 80, 70, 85], dtype=torch.int32)  # 30: its region fits topk, kept whole
    st = b.store
    st.ready[:], st.steps[:] = True, cfg.max_fast_steps
    st.hi[slots], st.count[slots] = (lens - 20).int(), 20
    st.pos.copy_(torch.randint(2, 10, st.pos.shape, generator=g).cumsum(-1).int())  # previous selections
    plan_step_ref(st, b.stats, torch.zeros(100, dtype=torch.bool), torch.zeros(5, dtype=torch.long), slots, lens,
                  5, 5, b.rows)
    assert b.rows.slow.all()
    for layer in range(LAYERS):
        sfi_decode_ref(b.q_hist[layer], keys[layer], keys[layer], req_to_token, slots, lens, b.rows.slow, b.rows.hi,
                       b.rows.count, st.pos[layer], cfg.sinks, D ** -0.5, 0.0, b.slow_logits[layer], b.rows.logit_row)
    if swap:
        b.slow_logits[:, [0, 1]] = b.slow_logits[:, [1, 0]]
    b.slow_host[:], b.pending = b.rows.slow, (5, lens.clone())
    b._refresh_previous_slow_rows()
    return st.pos[:, slots].clone(), st.cov_stats[slots].clone()


def test_refresh_after_a_decode_step_reads_each_rows_own_logits():
    """With fewer kept logit rows (2) than scored slow rows (4), the plan gives rows 0 and 2 of the
    batch the kept logits and the refresh reads them there (the others from the keys): selections and
    coverage match scoring every row from the keys; the same with logits for every row. A refresh
    that read another row's logits would not."""
    keys = decode_step_then_refresh(0)
    for logit_rows in (2, 8):
        kept = decode_step_then_refresh(logit_rows)
        assert (kept[0] == keys[0]).float().mean() >= 0.98
        torch.testing.assert_close(kept[1], keys[1], atol=1e-3, rtol=1e-3)
    wrong = decode_step_then_refresh(2, swap=True)
    assert (wrong[0][:, [0, 2]] == keys[0][:, [0, 2]]).float().mean() < 0.8


@pytest.mark.parametrize("kernels", [False, True])
def test_warm_up_runs_every_selector_call_and_counts_nothing(kernels, monkeypatch):
    """``warm_up_selector`` (run at startup on GPUs, so Triton compiles before serving) goes through the
    prefill selection and both refreshes after a slow step, on the torch references or (``kernels``) on
    the Triton kernels (interpreted here), and leaves the counters alone."""
    cfg = SFIConfig(topk=24, sinks=2, recent=8, slow_logit_rows=1)
    dev = torch.device("cuda" if kernels and torch.cuda.is_available() else "cpu")
    req_to_token = torch.zeros(2, 64, dtype=torch.int32, device=dev)
    keys = [torch.randn(8, HKV, D, device=dev) for _ in range(LAYERS)]
    b = SFIBackend.selector_only(cfg, AttentionShape(LAYERS, HQ, HKV, D, D, D ** -0.5, 0.0), keys.__getitem__,
                                 req_to_token, dev)
    calls = []
    select = b._select
    monkeypatch.setattr(b, "_select", lambda layers, q, r, cover=None: (calls.append((r.from_logits, cover is None)),
                                                                     select(layers, q, r, cover)))
    if kernels and dev.type == "cpu":  # the Triton kernels in the interpreter (conftest sets it on CPU)
        b.on_cuda = True
        b._to_device = lambda t: t
    b.warm_up_selector()
    assert calls == [(False, True), (False, False), (True, False)]  # prefill, refresh from keys, from logits
    assert not b.stats.acc.any() and not b.stats.cov.any()
    assert (b.store.pos[:, 0, :, :cfg.topk] < 64).all()  # slot 0 holds a selection of the dummy request


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated under this mode and still referenced (what a
    GPU's caching allocator would hold), counted on the CPU: views and in-place ops allocate nothing."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors referencing it]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if key not in self.live:
                if func.is_view or func._schema.name.endswith("_") or nbytes == 0:
                    continue  # storage made before this mode
                self.live[key] = [nbytes, 0]
                self.now += nbytes
                self.peak = max(self.peak, self.now)
            self.live[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


@pytest.mark.parametrize("from_logits", [False, True])
def test_selector_temporaries_stay_within_what_sfi_reserves(from_logits, monkeypatch):
    """A refresh of every layer, in several passes through the Triton kernels (interpreted here; as on a
    GPU), never holds more than ``memory.selector_peak_bytes`` and fills at least half of it: a pass's
    temporaries are freed before the next pass allocates, and a refresh from the slow step's kept
    logits (which allocates no logits) batches more layers per pass."""
    layers, hq, n = 6, 8, 1024
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(memory, "SELECTOR_SCRATCH", 2 * HKV * (hq // HKV) * n)  # from keys: 6 passes
    g = torch.Generator().manual_seed(0)
    cfg = SFIConfig(topk=64, sinks=2, recent=8, slow_logit_rows=2 if from_logits else 0)
    shape = AttentionShape(layers, hq, HKV, D, D, D ** -0.5, 0.0)
    lens = torch.tensor([n, n - 100], dtype=torch.int32)
    keys = [torch.randn(2 * n, HKV, D, generator=g, dtype=torch.float16).to(dev) for _ in range(layers)]
    b = SFIBackend.selector_only(cfg, shape, keys.__getitem__, torch.randperm(2 * n, generator=g).int().view(2, n).to(dev),
                                 dev)
    if dev.type == "cpu":  # the Triton kernels in the interpreter (conftest sets it on CPU)
        b.on_cuda, b._to_device = True, lambda t: t
    b.store.pos.copy_(torch.randint(0, n - 100, b.store.pos.shape, generator=g).sort(-1).values)
    b.slow_logits.copy_(torch.randn(b.slow_logits.shape, generator=g))
    slots, lens = torch.arange(2, device=dev), lens.to(dev)
    lo, hi, count = b.store.bounds(lens)
    r = _slow_step_refresh(slots, slots.view(-1, 1), lo.int(), hi.int(), lens, n, (hi.int(), count.int()), from_logits)
    passes = []
    select_pass = b._select_pass
    monkeypatch.setattr(b, "_select_pass", lambda group, *a: (passes.append(group), select_pass(group, *a)))
    q = torch.randn(layers, 2, hq, D, generator=g, dtype=torch.float16).to(dev)
    with LiveBytes() as live:
        b._refresh_now(r, q)
    assert passes == ([[0, 1], [2, 3], [4, 5]] if from_logits else [[x] for x in range(layers)])
    assert 0.5 < live.peak / memory.selector_peak_bytes(cfg, shape, n) <= 1
    assert live.now == 0


@pytest.mark.parametrize("kernels", [False, True])
def test_decode_saves_each_rows_query_for_the_selector(kernels):
    """``forward_decode`` leaves each batch row's query in ``q_hist[layer]`` (the decode kernel saves it:
    Triton, compiled on a GPU or interpreted on CPU, or the torch reference), where the refresh after a
    slow row reads it."""
    from types import SimpleNamespace

    dev = torch.device("cuda" if kernels and torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(3)
    req_to_token = torch.randperm(4 * 32, generator=g).int().view(4, 32).to(dev)
    keys = [torch.randn(4 * 32, HKV, D, generator=g).to(dev) for _ in range(LAYERS)]
    b = SFIBackend.selector_only(SFIConfig(topk=8, sinks=2, recent=4), AttentionShape(LAYERS, HQ, HKV, D, D, D ** -0.5, 0.0),
                                 keys.__getitem__, req_to_token, dev)
    b.token_to_kv_pool.get_value_buffer = keys.__getitem__
    b._alloc_rows(5)  # the per-row buffers, q_hist among them (zeros)
    b.on_cuda = kernels  # on CPU: the Triton kernel in the interpreter
    b.rows.slow[:] = True  # dense rows: no selection needed
    fb = SimpleNamespace(batch_size=3, req_pool_indices=torch.tensor([2, 0, 3], device=dev),
                         seq_lens=torch.tensor([30, 17, 25], dtype=torch.int32, device=dev))
    q = torch.randn(3, HQ * D, generator=g).to(dev)
    b.forward_decode(q, None, None, SimpleNamespace(layer_id=1), fb)
    assert torch.equal(b.q_hist[1, :3], q.view(3, HQ, D))
    assert not b.q_hist[1, 3:].any() and not b.q_hist[[0, 2, 3, 4]].any()
