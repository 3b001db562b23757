"""The Selector's runs (``Refresher``): batching within the scratch budget changes nothing, kept
slow-step logits select what the keys select, each row reads its own logits, the warm-up, the
temporaries' bound, and the decode kernel's query save."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sfi_sglang.memory as memory
from sfi_sglang.config import SFIConfig
from sfi_sglang.kernels import kernel_set
from sfi_sglang.kernels.plan_step import StepRows, plan_step_ref
from sfi_sglang.kernels.sfi_decode import sfi_decode_ref
from sfi_sglang.metrics import SFIStats
from sfi_sglang.model_check import AttentionShape
from sfi_sglang.refresher import Refresher, slow_step_refresh
from sfi_sglang.spans import Spans

LAYERS, HQ, HKV, D = 5, 4, 2, 16
SHAPE = AttentionShape(LAYERS, HQ, HKV, D, D, D ** -0.5, 0.0)


def refresher(cfg: SFIConfig, keys, req_to_token, dev=torch.device("cpu"), kernels: bool = False,
              shape: AttentionShape = SHAPE, rows: int = 1) -> Refresher:
    """A Refresher over the K pools ``keys`` (one per layer); ``kernels``: the Triton kernels (interpreted
    on CPU), else the torch references. With ``cfg.span_tokens``, about one token in three starts a run."""
    spans = None
    if cfg.span_tokens:
        spans = Spans(torch.tensor([True, False, False], device=dev), keys[0].shape[0], cfg.span_tokens)
        slots = torch.arange(keys[0].shape[0], device=dev)
        spans.write(torch.randint(0, 3, slots.shape, generator=torch.Generator().manual_seed(1)).to(dev), slots)
    return Refresher(cfg, shape, kernel_set(kernels), keys.__getitem__, req_to_token, dev, SFIStats(dev), rows=rows,
                     spans=spans)


def refresh(scratch: int, monkeypatch, align: int = memory.WIDTH_ALIGN, from_logits: bool = False,
            span_tokens: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Selections and coverage sums after a slow-step refresh of three requests of different lengths;
    ``from_logits``: scored from the logits their slow step kept instead of the keys."""
    monkeypatch.setattr(memory, "SELECTOR_SCRATCH", scratch)
    monkeypatch.setattr(memory, "WIDTH_ALIGN", align)
    g = torch.Generator().manual_seed(0)
    cfg = SFIConfig(topk=24, sinks=2, recent=8, slow_logit_rows=3 if from_logits else 0, span_tokens=span_tokens)
    lens = torch.tensor([90, 61, 40], dtype=torch.int32)
    req_to_token = torch.randperm(3 * 96, generator=g).int().view(3, 96)
    keys = [torch.randn(3 * 96, HKV, D, generator=g) for _ in range(LAYERS)]
    q = torch.randn(LAYERS, 3, HQ, D, generator=g)
    b = refresher(cfg, keys, req_to_token)
    slots = torch.arange(3)
    lo, hi, count = b.store.bounds(lens)
    b.store.pos.copy_(torch.randint(0, 90, b.store.pos.shape, generator=g).sort(-1).values)  # previous selection
    if from_logits:  # the slow step: every row dense, keeping its logits in rows 0-2
        for layer in range(LAYERS):
            sfi_decode_ref(q[layer], keys[layer], keys[layer], req_to_token, slots, lens, torch.ones(3, dtype=torch.bool),
                           b.store.hi[slots], b.store.count[slots], b.store.pos[layer], cfg.sinks, D ** -0.5, 0.0,
                           b.slow_logits[layer], torch.arange(3))
    r = slow_step_refresh(slots, slots.view(-1, 1), lo.int(), hi.int(), lens, int(lens.max()),
                          (hi.int(), count.int()), from_logits)
    assert r.width % align == 0 and r.width >= int(lens.max())
    b.refresh_now(r, q)
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
    keys = refresh(2**30, monkeypatch, span_tokens=0)  # whole runs would turn a near-tie into several picks
    for scratch in (2**30, 1500):  # all rows and layers at once (a view of the kept logits); a few per call
        kept = refresh(scratch, monkeypatch, from_logits=True, span_tokens=0)
        assert (kept[0] == keys[0]).float().mean() >= 0.98
        torch.testing.assert_close(kept[1], keys[1], atol=1e-3, rtol=1e-3)


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
    g = torch.Generator().manual_seed(2)
    cfg = SFIConfig(topk=24, sinks=2, recent=8, max_fast_steps=4, min_refresh_gap=2, slow_logit_rows=logit_rows)
    req_to_token = torch.randperm(5 * 96, generator=g).int().view(5, 96)
    keys = [torch.randn(5 * 96, HKV, D, generator=g) for _ in range(LAYERS)]
    b = refresher(cfg, keys, req_to_token, rows=5)
    b.q_hist.copy_(torch.randn(LAYERS, 5, HQ, D, generator=g))
    rows = StepRows.zeros(5, "cpu")
    slots = torch.tensor([3, 0, 4, 1, 2])
    lens = torch.tensor([90, 30, 80, 70, 85], dtype=torch.int32)  # 30: its region fits topk, kept whole
    st = b.store
    st.ready[:], st.steps[:] = True, cfg.max_fast_steps
    st.hi[slots], st.count[slots] = (lens - 20).int(), 20
    st.pos.copy_(torch.randint(2, 10, st.pos.shape, generator=g).cumsum(-1).int())  # previous selections
    plan_step_ref(torch.zeros(5, dtype=torch.long), slots, lens, 5, 5, torch.zeros(100, dtype=torch.uint8), st.ready,
                  st.steps, st.run, st.hi, st.count, rows, b.stats.acc, sinks=cfg.sinks, recent=cfg.recent, topk=cfg.topk,
                  max_fast=cfg.max_fast_steps, min_gap=cfg.min_refresh_gap, logit_rows=cfg.slow_logit_rows)
    assert rows.slow.all()
    for layer in range(LAYERS):
        sfi_decode_ref(b.q_hist[layer], keys[layer], keys[layer], req_to_token, slots, lens, rows.slow, rows.hi,
                       rows.count, st.pos[layer], cfg.sinks, D ** -0.5, 0.0, b.slow_logits[layer], rows.logit_row)
    if swap:
        b.slow_logits[:, [0, 1]] = b.slow_logits[:, [1, 0]]
    b.note_step(rows, 5, lens)
    b.refresh_slow_rows()
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
    """``warm_up`` (run at startup on GPUs, so Triton compiles before serving) goes through the
    prefill selection and both refreshes after a slow step, on the torch references or (``kernels``) on
    the Triton kernels (interpreted here), and leaves the counters alone."""
    cfg = SFIConfig(topk=24, sinks=2, recent=8, slow_logit_rows=1)
    dev = torch.device("cuda" if kernels and torch.cuda.is_available() else "cpu")
    req_to_token = torch.zeros(2, 64, dtype=torch.int32, device=dev)
    keys = [torch.randn(8, HKV, D, device=dev) for _ in range(LAYERS)]
    b = refresher(cfg, keys, req_to_token, dev, kernels)  # on CPU, kernels run in the interpreter (conftest)
    calls = []
    select = b.select
    monkeypatch.setattr(b, "select", lambda layers, q, r, cover=None: (calls.append((r.from_logits, cover is None)),
                                                                    select(layers, q, r, cover)))
    b.warm_up()
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
    cfg = SFIConfig(topk=64, sinks=2, recent=8, slow_logit_rows=2 if from_logits else 0, prefill_queries=2)
    shape = AttentionShape(layers, hq, HKV, D, D, D ** -0.5, 0.0)
    lens = torch.tensor([n, n - 100], dtype=torch.int32)
    keys = [torch.randn(2 * n, HKV, D, generator=g, dtype=torch.float16).to(dev) for _ in range(layers)]
    b = refresher(cfg, keys, torch.randperm(2 * n, generator=g).int().view(2, n).to(dev), dev, True, shape)
    b.store.pos.copy_(torch.randint(0, n - 100, b.store.pos.shape, generator=g).sort(-1).values)
    b.slow_logits.copy_(torch.randn(b.slow_logits.shape, generator=g))
    slots, lens = torch.arange(2, device=dev), lens.to(dev)
    lo, hi, count = b.store.bounds(lens)
    r = slow_step_refresh(slots, slots.view(-1, 1), lo.int(), hi.int(), lens, n, (hi.int(), count.int()), from_logits)
    passes = []
    select_pass = b._select_pass
    monkeypatch.setattr(b, "_select_pass", lambda group, *a: (passes.append(group), select_pass(group, *a)))
    q = torch.randn(layers, 2, hq, D, generator=g, dtype=torch.float16).to(dev)
    with LiveBytes() as live:
        b.refresh_now(r, q)
    assert passes == ([[0, 1], [2, 3], [4, 5]] if from_logits else [[x] for x in range(layers)])
    assert 0.5 < live.peak / memory.selector_peak_bytes(cfg, shape, n) <= 1
    assert live.now == 0


def bare_backend(kernels: bool, shape: AttentionShape = SHAPE):
    """An ``SFIBackend`` with the parts ``forward_decode`` reads, without a model runner, over random K/V
    pools (K and V the same tensors): the backend, its pools, the batch (3 rows) and the device."""
    from types import SimpleNamespace

    from sfi_sglang.backend import SFIBackend

    dev = torch.device("cuda" if kernels and torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(3)
    req_to_token = torch.randperm(4 * 32, generator=g).int().view(4, 32).to(dev)
    keys = [torch.randn(4 * 32, HKV, D, generator=g).to(dev) for _ in range(LAYERS)]
    b = SFIBackend.__new__(SFIBackend)
    b.cfg, b.shape, b.device, b.req_to_token = SFIConfig(topk=8, sinks=2, recent=4), shape, dev, req_to_token
    b.kernels = kernel_set(kernels)  # on CPU: the Triton kernel in the interpreter
    b.token_to_kv_pool = SimpleNamespace(get_key_buffer=keys.__getitem__, get_value_buffer=keys.__getitem__)
    b.refresher = refresher(b.cfg, keys, req_to_token, dev, shape=shape)
    b.store = b.refresher.store
    b._alloc_rows(5)  # the per-row buffers, q_hist among them (zeros)
    fb = SimpleNamespace(batch_size=3, req_pool_indices=torch.tensor([2, 0, 3], device=dev),
                         seq_lens=torch.tensor([30, 17, 5], dtype=torch.int32, device=dev))
    return b, keys, fb, dev


@pytest.mark.parametrize("kernels", [False, True])
def test_decode_saves_each_rows_query_for_the_selector(kernels):
    """``forward_decode`` leaves each batch row's query in ``q_hist[layer]`` (the decode kernel saves it:
    Triton, compiled on a GPU or interpreted on CPU, or the torch reference), where the refresh after a
    slow row reads it."""
    from types import SimpleNamespace

    b, _, fb, dev = bare_backend(kernels)
    b.rows.slow[:] = True  # dense rows: no selection needed
    q = torch.randn(3, HQ * D, generator=torch.Generator().manual_seed(4)).to(dev)
    b.forward_decode(q, None, None, SimpleNamespace(layer_id=1), fb)
    q_hist = b.refresher.q_hist
    assert torch.equal(q_hist[1, :3], q.view(3, HQ, D))
    assert not q_hist[1, 3:].any() and not q_hist[[0, 2, 3, 4]].any()


@pytest.mark.parametrize("kernels", [False, True])
def test_sliding_window_layer_attends_to_its_window(kernels):
    """In a hybrid (window layers 0 and 2 of 5, window 6: 7 tokens), a window layer's decode is dense
    attention over the row's last 7 tokens (all of them in a 5-token row), whatever the selection state;
    the Selector's layers are the others, in order, and no query is saved for a window layer."""
    from types import SimpleNamespace

    shape = AttentionShape(3, HQ, HKV, D, D, D ** -0.5, 0.0, layer_ids=(1, 3, 4), windows={0: 6, 2: 6})
    b, keys, fb, dev = bare_backend(kernels, shape)
    b.rows.count[:] = 3  # a fast row's selection state: not what a window layer reads
    b._plan_windows(fb.seq_lens, 3)
    q = torch.randn(3, HQ, D, generator=torch.Generator().manual_seed(4)).to(dev)
    out = b.forward_decode(q.view(3, -1), None, None, SimpleNamespace(layer_id=2), fb).view(3, HQ, D)
    for row, (slot, n) in enumerate(zip(fb.req_pool_indices.tolist(), fb.seq_lens.tolist())):
        kv = keys[2][b.req_to_token[slot, max(0, n - 7):n].long()].repeat_interleave(HQ // HKV, 1)  # [t, HQ, D]
        p = torch.einsum("hd,thd->ht", q[row], kv).mul(D ** -0.5).softmax(-1)
        tol = 5e-3 if dev.type == "cuda" else 1e-4  # the GPU's dots round through TF32
        torch.testing.assert_close(out[row], torch.einsum("ht,thd->hd", p, kv), atol=tol, rtol=tol)
    assert not b.refresher.q_hist.any()
    assert shape.sfi_layer == {1: 0, 3: 1, 4: 2}
