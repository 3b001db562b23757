"""Kernel micro-benchmark on one GPU: SFI's kernels vs FlashInfer dense decode, one Qwen3-4B layer.

    python benchmarks/bench_kernels.py [--contexts 8192,16384,32768,131072] [--batches 1,8,16,32]
        [--kept 256,512,1024,2048,4096] [--iters 20] [--out PATH] [--quick]

32 query / 8 KV heads, head_dim 128, bf16, one layer's KV pool (page size 1, each request's tokens
contiguous). Each kernel runs ``--iters`` times in one CUDA graph; the time is per call, best of a
few replays (a kernel that fails to capture is timed eagerly and marked "graph": false). Kernels:
- ``dense_decode``: FlashInfer's BatchDecodeWithPagedKVCacheWrapper as sglang runs it in graphs
  (fa2, tensor cores for GQA 4, fixed buffers, planned once outside the graph);
- ``sfi_dense_decode``: ``sfi_decode`` with every row slow (our kernel's dense path; compiled, as
  the sparse rows, with the kept-logits store where the default config keeps logits);
  ``sfi_dense_decode_logits``: the same, every row also keeping its logits (fp16) for the Selector;
- ``sparse_decode``: ``sfi_decode`` with every row fast, ``kept`` tokens per KV head: 4 sinks,
  ``kept - 4 - tail`` selected positions (random, sorted, unique per slot and head, in ``[4, hi)``)
  and the live tail ``[hi, n)`` of ``TAIL`` = 512 tokens (64 for ``kept <= 256``: 188 selected);
- ``flashinfer_sparse_decode``: FlashInfer's decode over the same per-(request, KV head) token lists
  (the pool viewed as one KV head per row, lists planned outside the graph); ``sparse_decode`` rows get
  ``vs_flashinfer_sparse``, FlashInfer's time over ours (the kernel-level half of the choice that
  ``sfi_decode``'s docstring explains);
- ``selector``: one layer's refresh after a decode slow step, every row refreshed from one query
  row, by the backend itself (``Refresher.refresh_now``: candidate_logits over the whole
  context -> group_scores and the coverage of the previous selection -> the Selector over the
  region -> the position buffer), eager as the backend runs it (host time included; it decides
  on the host how to batch, so it is not graph-captured); ``--profile`` prints its kernels by
  CUDA time (and adds their summed kernel time to the rows, ``kernel_us``, and to the slow-step
  rows below, with ``vs_dense_kernels``: eager wall times of host-bound calls vary between runs);
- ``selector_plus_dense``: selector + dense_decode; ``vs_dense`` is its ratio to dense alone;
- ``refresh_all_layers``: the same over ``--layers`` layers sharing this layer's K: its batching
  of layers and rows within the Selector's scratch budget included, so batch 1 is measured as it
  runs; ``slow_step_all_layers`` adds ``--layers`` dense decodes (``vs_dense``: over those alone);
- ``selector_from_logits`` / ``refresh_all_layers_from_logits``: the same refreshes from the
  logits the slow step kept (no keys read); ``fused_selector_plus_dense`` /
  ``fused_slow_step_all_layers`` add ``sfi_dense_decode_logits`` (``vs_dense``: over FlashInfer's
  dense decodes): the slow step that reads K once, against the one that reads it twice;
- ``index_builder``: SFI builds no index lists (``sfi_decode`` derives them on the device), so this
  times the per-step planning launch ``plan_step`` instead (per batch; no context).
``bytes_moved``: K+V bytes of the attended tokens (selector: K only); ``hbm_frac``: that rate over
the device copy bandwidth (read + write) measured in the same run; ``speedup_vs_dense``: FlashInfer's
time at the same (batch, context) over the row's; ``peak_frac`` (Selector rows): the GPU memory a call
allocates at its peak over what sfi reserves for the Selector's temporaries (``selector_peak_bytes``).
``TRITON_INTERPRET=1 ... --quick --device cpu`` is a CPU smoke run: each kernel once, eagerly, in fp16 (the interpreter's bf16 dot is wrong), no times.
Results go to ``--out`` (default: a new file in the temporary folder; the path is printed).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from bench_decode import copy_bandwidth  # noqa: E402
from out_path import default_out  # noqa: E402
from sfi_sglang.config import SFIConfig  # noqa: E402
from sfi_sglang.kernels import kernel_set  # noqa: E402
from sfi_sglang.kernels.plan_step import StepRows, plan_step  # noqa: E402
from sfi_sglang.kernels.sfi_decode import sfi_decode  # noqa: E402
from sfi_sglang.memory import SelectionStore, selector_peak_bytes  # noqa: E402
from sfi_sglang.metrics import SFIStats  # noqa: E402
from sfi_sglang.model_check import AttentionShape  # noqa: E402
from sfi_sglang.refresher import Refresher, slow_step_refresh  # noqa: E402

HQ, HKV, D, VOCAB = 32, 8, 128, 151936
SCALE = D ** -0.5
CFG = SFIConfig()
TAIL = 512  # sparse_decode's live tail (kept > 256), fixed so rows stay comparable across defaults
REPLAYS = 5
Fn = Callable[[], object]


@dataclass
class Case:
    """One layer's decode inputs: ``bs`` requests of ``ctx`` tokens, request ``b`` in slot ``b``."""

    bs: int
    ctx: int
    q: torch.Tensor  # [bs, HQ, D]
    k: torch.Tensor  # [bs * ctx, HKV, D]
    v: torch.Tensor
    req_to_token: torch.Tensor  # [bs, ctx] int32
    slots: torch.Tensor  # [bs] int64
    seq_lens: torch.Tensor  # [bs] int32

    @classmethod
    def make(cls, bs: int, ctx: int, dev: torch.device, dtype: torch.dtype) -> "Case":
        rand = lambda *shape: torch.randn(*shape, dtype=dtype, device=dev)  # noqa: E731
        return cls(bs, ctx, rand(bs, HQ, D), rand(bs * ctx, HKV, D), rand(bs * ctx, HKV, D),
                   torch.arange(bs * ctx, dtype=torch.int32, device=dev).view(bs, ctx),
                   torch.arange(bs, device=dev), torch.full((bs,), ctx, dtype=torch.int32, device=dev))


def kv_bytes(bs: int, tokens: int, tensors: int = 2) -> int:
    return bs * tokens * HKV * D * 2 * tensors


def timed(fn: Fn, iters: int, cuda: bool, graph: bool = True) -> tuple[float | None, bool]:
    """Per-call microseconds of ``fn`` (best replay of a graph of ``iters`` calls, or of ``iters``
    eager calls without ``graph``) and whether it ran in a graph; without CUDA one eager call and
    no time."""
    fn()  # compile, JIT, allocator warm-up
    if not cuda:
        return None, False
    if not graph:
        return _best_of(lambda: [fn() for _ in range(iters)], iters), False
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        run, graphed = graph.replay, True
    except RuntimeError as e:
        print(f"  capture failed ({str(e).splitlines()[0]}); timing eagerly")
        run, graphed = (lambda: [fn() for _ in range(iters)]), False
    run()
    return _best_of(run, iters), graphed


def _best_of(run: Fn, iters: int) -> float:
    """Microseconds per call of ``run`` (``iters`` calls), best of ``REPLAYS``."""
    best = math.inf
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return 1e3 * best / iters


@functools.cache
def flashinfer(cuda: bool):
    """The flashinfer module, or None (said once) without CUDA or if it cannot be imported."""
    try:
        if not cuda:
            raise ImportError("no CUDA device")
        import flashinfer as fi
    except ImportError as e:
        print(f"flashinfer: {e}; no dense_decode rows")
        return None
    return fi


def planned_decode(fi, c: Case, lists: int, kept: int, indices: torch.Tensor, qo_heads: int, kv_heads: int):
    """FlashInfer's decode wrapper set up like sglang's CUDA-graph decode wrappers (512 MiB workspace as
    sglang uses for Qwen3, fixed buffers, tensor cores, fa2), planned once for ``lists`` token lists
    of ``kept`` pages (page size 1) each."""
    dev = c.q.device
    indptr = torch.arange(lists + 1, dtype=torch.int32, device=dev) * kept
    last = torch.ones(lists, dtype=torch.int32, device=dev)
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(512 * 2**20, dtype=torch.uint8, device=dev), "NHD", use_cuda_graph=True,
        use_tensor_cores=True, paged_kv_indptr_buffer=torch.empty_like(indptr),
        paged_kv_indices_buffer=torch.empty_like(indices), paged_kv_last_page_len_buffer=torch.empty_like(last),
        backend="fa2")
    wrapper.plan(indptr, indices, last, qo_heads, kv_heads, D, 1, q_data_type=c.q.dtype, kv_data_type=c.k.dtype,
                 sm_scale=SCALE)
    return wrapper


def flashinfer_dense(c: Case) -> Fn | None:
    """FlashInfer decode over whole contexts (``planned_decode``)."""
    fi = flashinfer(c.q.is_cuda)
    if fi is None:
        return None
    wrapper = planned_decode(fi, c, c.bs, c.ctx, c.req_to_token.flatten(), HQ, HKV)
    cache = (c.k.view(-1, 1, HKV, D), c.v.view(-1, 1, HKV, D))
    return lambda: wrapper.run(c.q, cache)


def flashinfer_sparse(c: Case, store: SelectionStore) -> Fn | None:
    """FlashInfer decode over the tokens ``sfi_decode``'s fast rows attend (sinks + selected + tail, per
    request and KV head, as ``select_random`` set them): the pool viewed as one KV head per row
    (``[tokens * HKV, 1, 1, D]``, token ``t`` of head ``h`` at ``t * HKV + h``) and each (request, KV
    head) as one request with its query group, the index lists planned once outside the graph."""
    fi = flashinfer(c.q.is_cuda)
    if fi is None:
        return None
    dev, g = c.q.device, HQ // HKV
    hi, cnt = int(store.hi[0]), int(store.count[0])  # select_random: the same for every row
    lo = min(CFG.sinks, hi)
    span = lambda a, b: torch.arange(a, b, device=dev).expand(c.bs, HKV, b - a)  # noqa: E731
    pos = torch.cat([span(0, lo), store.pos[0, :c.bs, :, :cnt].long(), span(hi, c.ctx)], -1)
    tok = c.req_to_token.long().gather(1, pos.flatten(1)).view(pos.shape)
    indices = (tok * HKV + torch.arange(HKV, device=dev).view(1, HKV, 1)).flatten().int()
    wrapper = planned_decode(fi, c, c.bs * HKV, pos.shape[-1], indices, g, 1)
    q, cache = c.q.view(c.bs * HKV, g, D), (c.k.view(-1, 1, 1, D), c.v.view(-1, 1, 1, D))
    return lambda: wrapper.run(q, cache).view(c.bs, HQ, D)


def sfi(c: Case, store: SelectionStore, slow: bool, logits: torch.Tensor | None = None, keep: bool = True) -> Fn:
    """``sfi_decode`` with every row slow or fast; ``logits`` ``[bs, HKV, >= ctx, HQ // HKV]``: slow rows keep theirs
    there (``keep``; else the kernel the backend runs, with no row kept)."""
    flags = torch.full((c.bs,), slow, dtype=torch.bool, device=c.q.device)
    rows = torch.arange(c.bs, dtype=torch.int32, device=c.q.device) if keep else torch.full(
        (c.bs,), -1, dtype=torch.int32, device=c.q.device)
    return lambda: sfi_decode(c.q, c.k, c.v, c.req_to_token, c.slots, c.seq_lens, flags, store.hi, store.count,
                              store.pos[0], CFG.sinks, SCALE, 0.0, logits, rows)


def select_random(store: SelectionStore, c: Case, kept: int) -> bool:
    """Fast-row state attending ``kept`` tokens per KV head; False if the context is too short."""
    tail = 64 if kept <= 256 else TAIL
    cnt, hi = kept - CFG.sinks - tail, c.ctx - tail
    if cnt < 0 or cnt > hi - CFG.sinks:
        return False
    store.hi.fill_(hi)
    store.count.fill_(cnt)
    ranks = torch.rand(c.bs, HKV, hi - CFG.sinks, device=c.q.device)
    store.pos[0, :, :, :cnt] = ranks.topk(cnt, dim=-1).indices.sort(dim=-1).values.int() + CFG.sinks
    return True


def load_file(name: str, path: str):
    """The module in ``path`` (e.g. a previous version of a kernel, for a same-run A/B), registered
    as ``name`` (dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def decode_case(bs: int, ctx: int, kept: int | None, dev: torch.device) -> tuple[Case, SelectionStore, torch.Tensor]:
    """One layer's decode inputs with every row fast (``kept`` tokens per KV head) or, for ``kept``
    None, slow (dense); and the rows' slow flags."""
    c = Case.make(bs, ctx, dev, torch.bfloat16)
    store = SelectionStore(SFIConfig(topk=4096), 1, bs, HKV, dev)
    if kept is not None:
        select_random(store, c, kept)
    return c, store, torch.full((bs,), kept is None, dtype=torch.bool, device=dev)


def selector_backend(c: Case, layers: int, from_logits: bool) -> Refresher:
    """The backend's Selector runs (its ``Refresher``, Triton kernels) over ``layers`` layers that all read
    this case's K buffer, keeping every row's slow-step logits if ``from_logits``."""
    return Refresher(replace(CFG, slow_logit_rows=c.bs if from_logits else 0),
                     AttentionShape(layers, HQ, HKV, D, D, SCALE, 0.0), kernel_set(True), lambda _: c.k,
                     c.req_to_token, c.q.device, SFIStats(c.q.device), rows=c.bs)


def refresh(c: Case, layers: int, from_logits: bool = False) -> Fn:
    """The backend's own refresh after a slow step of every row (``Refresher.refresh_now``:
    logits over the whole context, coverage of the previous selection, the Selector over the
    region, eager), over ``layers`` layers that all read this case's K buffer; ``from_logits``:
    from the logits the slow step kept (this layer's, in every layer's rows) instead of the keys."""
    b = selector_backend(c, layers, from_logits)
    if from_logits:
        sfi(c, b.store, slow=True, logits=b.slow_logits[0])()
        b.slow_logits.copy_(b.slow_logits[:1].expand_as(b.slow_logits))
    lo, hi, count = b.store.bounds(c.seq_lens)
    r = slow_step_refresh(c.slots, c.slots.view(-1, 1), lo.int(), hi.int(), c.seq_lens, c.ctx,
                          (hi.int(), count.int()), from_logits)
    return lambda: b.refresh_now(r, c.q.expand(layers, -1, -1, -1))


def temporaries(fn: Fn) -> int:
    """Peak bytes ``fn`` allocates on the GPU above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def profile(fn: Fn, label: str, top: int = 12) -> float:
    """CUDA time per kernel of one call of ``fn`` (after a warm-up call), largest first, and the
    call's wall time against its summed kernel time (what is left is launch and host time); returns
    that kernel time (us): unlike an eager call's wall time, it does not vary with the host."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu = sum(e.device_time_total for e in events) / 1e3
    print(f"\nprofile: {label}: wall {wall * 1e3:.2f} ms, kernels {gpu:.2f} ms, "
          f"{sum(e.count for e in events)} launches")
    print(events.table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))
    return gpu * 1e3


def planner(bs: int, dev: torch.device) -> Fn:
    """plan_step over ``bs`` requests holding selections (rows turn slow as their steps add up)."""
    store, stats = SelectionStore(CFG, 1, bs, HKV, dev), SFIStats(dev)
    store.ready.fill_(True)
    token_class = ((torch.rand(VOCAB, device=dev) < 0.05) | (torch.rand(VOCAB, device=dev) < 0.6) * 2).to(torch.uint8)
    ids, slots = torch.randint(0, VOCAB, (bs,), device=dev), torch.arange(bs, device=dev)
    seq_lens = torch.full((bs,), 32768, dtype=torch.int32, device=dev)
    rows = StepRows.zeros(bs, dev)
    return lambda: plan_step(ids, slots, seq_lens, bs, bs, token_class, store.ready, store.steps, store.run,
                             store.hi, store.count, rows, stats.acc, sinks=CFG.sinks, recent=CFG.recent, topk=CFG.topk,
                             max_fast=CFG.max_fast_steps, min_gap=CFG.min_refresh_gap, logit_rows=CFG.slow_logit_rows)


def sweep(args: argparse.Namespace, dev: torch.device, dtype: torch.dtype) -> list[dict]:
    rows: list[dict] = []

    def add(kernel: str, bs: int, ctx: int | None, kept: int | None, fn: Fn, nbytes: int | None,
            graph: bool = True, peak: bool = False) -> None:
        t, graphed = timed(fn, args.iters, dev.type == "cuda", graph)
        rows.append({"kernel": kernel, "batch": bs, "context": ctx, "kept_tokens": kept, "time_us": t,
                     "bytes_moved": nbytes, "graph": graphed})
        if peak and dev.type == "cuda":  # the Selector's temporaries against what sfi reserves for them
            rows[-1]["peak_frac"] = temporaries(fn) / selector_peak_bytes(CFG, AttentionShape(1, HQ, HKV, D, D, SCALE, 0.0), ctx)
        print(f"{kernel:>16} bs {bs:>3} ctx {ctx or '-':>6} kept {kept or '-':>6}: "
              + (f"{t:9.1f} us" if t is not None else "ran"))

    for ctx in args.contexts:
        for bs in args.batches:
            # pool + Selector scratch (logits, softmax, sort) + kept logits of every layer
            need = kv_bytes(bs, ctx) + bs * ctx * 1024 + (args.layers or 1) * bs * ctx * HQ * 2
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                if need > 0.6 * torch.cuda.mem_get_info()[0]:
                    print(f"skip batch {bs} context {ctx}: needs {need / 2**30:.1f} GiB, over 60% of free memory")
                    continue
            c = Case.make(bs, ctx, dev, dtype)
            store = SelectionStore(SFIConfig(topk=max(args.kept + [CFG.topk])), 1, bs, HKV, dev)
            dense = flashinfer_dense(c)
            if dense is not None:
                ref = dense()  # both dense paths must agree (catches a wrong FlashInfer setup)
                err = (ref - sfi(c, store, slow=True)()).abs().max().item()
                print(f"dense_decode vs sfi_dense_decode: max abs difference {err:.2g} "
                      f"(largest output {ref.abs().max().item():.2g})")
                add("dense_decode", bs, ctx, ctx, dense, kv_bytes(bs, ctx))
            # what the backend passes when it keeps slow rows' logits (slow_logit_rows > 0): no row kept here
            unkept = torch.empty(bs, HKV, 16, HQ // HKV, dtype=torch.float16, device=dev) if CFG.logit_rows else None
            add("sfi_dense_decode", bs, ctx, ctx, sfi(c, store, slow=True, logits=unkept, keep=False), kv_bytes(bs, ctx))
            kept = torch.empty(bs, HKV, ctx, HQ // HKV, dtype=torch.float16, device=dev)
            add("sfi_dense_decode_logits", bs, ctx, ctx, sfi(c, store, slow=True, logits=kept),
                kv_bytes(bs, ctx) + kept.nbytes)
            del kept
            for kept in args.kept:
                if select_random(store, c, kept):
                    ours = sfi(c, store, slow=False, logits=unkept)
                    add("sparse_decode", bs, ctx, kept, ours, kv_bytes(bs, kept))
                    theirs = flashinfer_sparse(c, store)
                    if theirs is not None:  # the same lists through FlashInfer: same output, which is faster
                        err = (theirs() - ours()).abs().max().item()
                        print(f"flashinfer_sparse_decode vs sparse_decode: max abs difference {err:.2g}")
                        add("flashinfer_sparse_decode", bs, ctx, kept, theirs, kv_bytes(bs, kept))
                else:
                    print(f"skip sparse_decode kept {kept}: context {ctx} too short")
            for suffix, from_logits, per_layer in ("", False, kv_bytes(bs, ctx, tensors=1)), (
                    "_from_logits", True, bs * HQ * ctx * 2):
                run = refresh(c, 1, from_logits)
                add("selector" + suffix, bs, ctx, CFG.topk, run, per_layer, graph=False, peak=True)
                if args.profile and dev.type == "cuda":
                    rows[-1]["kernel_us"] = profile(run, f"selector{suffix} batch {bs} context {ctx}")
                if args.layers:
                    run = refresh(c, args.layers, from_logits)
                    add("refresh_all_layers" + suffix, bs, ctx, CFG.topk, run, args.layers * per_layer, graph=False,
                        peak=True)
                    if args.profile and dev.type == "cuda":
                        rows[-1]["kernel_us"] = profile(run, f"refresh_all_layers{suffix} batch {bs} context {ctx}",
                                                        top=20)
                    del run
            del c, store, dense
    for bs in args.batches:
        add("index_builder", bs, None, None, planner(bs, dev), None)
    return rows


def finish(rows: list[dict], gpu: str, bw: float | None, layers: int) -> list[dict]:
    """Adds the slow-step rows (refresh + that many dense decodes), HBM fractions and speedups."""
    by = lambda kernel: {(r["batch"], r["context"]): r for r in rows if r["kernel"] == kernel and r["time_us"]}  # noqa: E731
    dense = by("dense_decode")
    pairs = (("selector", "selector_plus_dense", 1, "dense_decode"),
             ("refresh_all_layers", "slow_step_all_layers", layers, "dense_decode"),
             ("selector_from_logits", "fused_selector_plus_dense", 1, "sfi_dense_decode_logits"),
             ("refresh_all_layers_from_logits", "fused_slow_step_all_layers", layers, "sfi_dense_decode_logits"))
    for name, plus, n, attend in pairs:
        attends = by(attend)
        for r in [r for r in rows if r["kernel"] == name and r["time_us"]]:
            a, d = attends.get((r["batch"], r["context"])), dense.get((r["batch"], r["context"]))
            if a and d:
                t = r["time_us"] + n * a["time_us"]
                rows.append({**r, "kernel": plus, "time_us": t, "graph": r["graph"] and a["graph"], "layers": n,
                             "bytes_moved": r["bytes_moved"] + n * a["bytes_moved"],
                             "vs_dense": t / (n * d["time_us"])})
                if "kernel_us" in r:  # the same with the Selector's kernel time instead of its eager wall time
                    k = r["kernel_us"] + n * a["time_us"]
                    rows[-1].update(kernel_us=k, vs_dense_kernels=k / (n * d["time_us"]))
    theirs = {(r["batch"], r["context"], r["kept_tokens"]): r["time_us"] for r in rows
              if r["kernel"] == "flashinfer_sparse_decode" and r["time_us"]}
    for r in rows:
        if r["kernel"] == "sparse_decode" and r["time_us"] and (r["batch"], r["context"], r["kept_tokens"]) in theirs:
            r["vs_flashinfer_sparse"] = theirs[r["batch"], r["context"], r["kept_tokens"]] / r["time_us"]
    for r in rows:
        t, d = r["time_us"], dense.get((r["batch"], r["context"]))
        r.update(gpu=gpu, hbm_frac=r["bytes_moved"] / (t * 1e-6) / bw if t and bw and r["bytes_moved"] else None,
                 speedup_vs_dense=d["time_us"] / t if t and d else None)
    return rows


def report(rows: list[dict]) -> None:
    """Table of all rows, then the issue's targets as PASS / MISS lines (worst row of each)."""
    cell = lambda x, f, w: (format(x, f) if x is not None else "-").rjust(w)  # noqa: E731
    print(f"\n{'kernel':>30} {'batch':>5} {'ctx':>6} {'kept':>6} {'us':>9} {'GB/s':>7} {'hbm':>5} {'speedup':>7}")
    for r in rows:
        gbs = r["bytes_moved"] / r["time_us"] / 1e3 if r["time_us"] and r["bytes_moved"] else None
        print(f"{r['kernel']:>30} {r['batch']:>5} {cell(r['context'], 'd', 6)} {cell(r['kept_tokens'], 'd', 6)} "
              f"{cell(r['time_us'], '.1f', 9)} {cell(gbs, '.0f', 7)} {cell(r['hbm_frac'], '.2f', 5)} "
              f"{cell(r['speedup_vs_dense'], '.2f', 7)}")
    pick = lambda kernel, cond: [r for r in rows if r["kernel"] == kernel and cond(r)]  # noqa: E731
    targets = [
        ("sparse_decode >= 80% of copy BW at batch >= 8, kept >= 2048", "hbm_frac", min, lambda x: x >= 0.8,
         pick("sparse_decode", lambda r: r["batch"] >= 8 and r["kept_tokens"] >= 2048)),
        ("sparse_decode >= 10x dense at 16K, batch 16, kept 256", "speedup_vs_dense", min, lambda x: x >= 10,
         pick("sparse_decode", lambda r: (r["batch"], r["context"], r["kept_tokens"]) == (16, 16384, 256))),
        ("sparse_decode at least as fast as FlashInfer over the same lists", "vs_flashinfer_sparse", min,
         lambda x: x >= 1, pick("sparse_decode", lambda r: "vs_flashinfer_sparse" in r)),
        ("selector + dense <= 1.3x dense", "vs_dense", max, lambda x: x <= 1.3, pick("selector_plus_dense", bool)),
        ("all layers: refresh + dense <= 1.3x dense", "vs_dense", max, lambda x: x <= 1.3,
         pick("slow_step_all_layers", bool)),
        ("all layers, K read once: refresh from logits + sfi dense <= 1.3x dense", "vs_dense", max,
         lambda x: x <= 1.3, pick("fused_slow_step_all_layers", bool)),
        ("the same by the refresh's kernel time (--profile): refresh + dense", "vs_dense_kernels", max,
         lambda x: x <= 1.3, pick("slow_step_all_layers", bool)),
        ("the same by the refresh's kernel time (--profile): from logits + sfi dense", "vs_dense_kernels", max,
         lambda x: x <= 1.3, pick("fused_slow_step_all_layers", bool)),
        ("Selector temporaries <= what sfi reserves for them (memory.selector_peak_bytes)", "peak_frac", max,
         lambda x: x <= 1, [r for r in rows if "peak_frac" in r]),
        ("index_builder (plan_step) <= 10 us at batch 32", "time_us", max, lambda x: x <= 10,
         pick("index_builder", lambda r: r["batch"] == 32)),
    ]
    print()
    for name, key, worst_of, ok, found in targets:
        found = [r for r in found if r.get(key) is not None]
        if not found:
            print(f" n/a {name}: not measured")
            continue
        w = worst_of(found, key=lambda r: r[key])
        print(f"{'PASS' if ok(w[key]) else 'MISS'} {name}: worst {w[key]:.3g} "
              f"(batch {w['batch']}, context {w['context']}, kept {w['kept_tokens']})")


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,16384,32768,131072", type=ints)
    ap.add_argument("--batches", default="1,8,16,32", type=ints)
    ap.add_argument("--kept", default="256,512,1024,2048,4096", type=ints)
    ap.add_argument("--iters", default=20, type=int, help="kernel calls per CUDA graph")
    ap.add_argument("--quick", action="store_true", help="one tiny shape: context 1024, batch 2, kept 256,512")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--profile", action="store_true", help="also print the kernels of selector and refresh_all_layers by CUDA time")
    ap.add_argument("--layers", default=36, type=int, help="layers of the refresh_all_layers row (0: none)")
    ap.add_argument("--out", default=None, help="result JSON (default: a new file in the temporary folder, printed)")
    args = ap.parse_args()
    if args.out is None:
        args.out = default_out("kernels")
    print("results go to", args.out, flush=True)
    if args.quick:
        args.contexts, args.batches, args.kept = [1024], [2], [256, 512]
    dev = torch.device(args.device)
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--device cpu runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    torch.manual_seed(0)
    cuda = dev.type == "cuda"
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    bw = copy_bandwidth() if cuda else None
    print(f"{gpu}: copy bandwidth " + (f"{bw / 1e12:.2f} TB/s" if bw else "not measured (CPU smoke run)"))

    rows = finish(sweep(args, dev, torch.bfloat16 if cuda else torch.float16), gpu, bw, args.layers)
    report(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": gpu, "date": datetime.date.today().isoformat(), "copy_bw_gbs": bw / 1e9 if bw else None,
                   "rows": rows}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
