"""The ``sfi`` attention backend: dense prefill through a wrapped SGLang backend,
slow/fast decode through one kernel that derives every row's token lists on the device.

Decode step, metadata (outside the CUDA graph): first the
Selector rebuilds the selections of the rows that were slow in the previous
step, from the queries that step saved (the host learns which rows they were
from an asynchronous copy of the slow mask, made before the previous step's
forward: the host waits for it only if the GPU has not got that far); then the policy marks this step's
slow rows and the selection state advances. The refresh also measures how much of
each slow row's attention the previous selection held (``sfi_sglang.coverage``),
from the same logits. Decode step, per layer (inside the
graph): write this step's K/V and attend (slow rows: whole context; fast rows: sinks +
selected + live tail); the decode kernel also saves the query for the Selector. A slow
step's selection is used from the next step on, as in the reference; with
``refresh_lag`` L > 1 the Selector runs on a side stream instead, overlapping the
next L - 1 steps (the rows keep their previous selection meanwhile), and its
result takes over at step L: the main stream waits on an event, not the host.

Prefill (``forward_extend``): the wrapped backend does the work; each layer saves
the last prompt queries, and after the last layer the Selector builds the first
selection from them (all layers at once), so that decoding starts on fast steps.
Over a cached prefix that has a selection record (``sfi_sglang.radix``), only that
record and the tokens after it are scored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import accumulate
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sfi_sglang.config import SFIConfig, SFIConfigError
from sfi_sglang.coverage import kept_mask
from sfi_sglang.kernels.candidate_logits import candidate_logits, candidate_logits_ref
from sfi_sglang.kernels.finish_coverage import finish_coverage, finish_coverage_ref
from sfi_sglang.kernels.group_scores import group_scores, group_scores_ref
from sfi_sglang.kernels.held_mask import held_mask
from sfi_sglang.kernels.plan_step import plan_step, plan_step_ref
from sfi_sglang.kernels.sfi_decode import sfi_decode, sfi_decode_ref
from sfi_sglang.kernels.topk_select import topk_select
from sfi_sglang.memory import (DEFERRED_ROWS, SelectionStore, StepRows, saved_queries, selector_pass_bytes,
                               selector_unit_bytes, slow_logits, static_bytes)
from sfi_sglang.metrics import SFIStats
from sfi_sglang.model_check import AttentionShape, attention_shape
from sfi_sglang.policy import boundary_ids_from_tokenizer, boundary_table
from sfi_sglang.radix import SelectionRecord, SelectionReuse
from sfi_sglang.selector import aligned, region_positions, select

logger = logging.getLogger("sfi_sglang")


@dataclass
class _Refresh:
    """Requests whose selections are rebuilt from given query rows."""

    slots: torch.Tensor  # [S] req-pool slots (device)
    q_rows: torch.Tensor  # [S, W] rows of the query tensor that score the candidates (device)
    lo: torch.Tensor  # [S] candidate region start (device, int32)
    hi: torch.Tensor  # [S] candidate region end (device, int32)
    positions: Callable[[int], torch.Tensor]  # layer -> candidate positions [S, 1 or Hkv, N] (-1: padding)
    width: int  # N
    contiguous: bool  # candidates are consecutive positions, then padding
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # decode refresh: StepRows (hi, count) to measure
    from_record: bool = False  # prefill refresh that starts from cached selection records
    from_logits: bool = False  # row i's logits are row i of the kept slow-step logits (no keys read)


def _region_refresh(slots, q_rows, lo, hi, width: int) -> _Refresh:
    """Candidates: the whole region ``[lo, hi)``, the same for every layer and KV head."""
    width = aligned(width)
    pos = region_positions(lo, hi, width)
    return _Refresh(slots, q_rows, lo, hi, lambda _: pos, width, True)


def _slow_step_refresh(slots, q_rows, lo, hi, n, width: int, previous, from_logits: bool = False) -> _Refresh:
    """After a slow step: candidates are the whole context ``[0, n)``, so the same logits give
    the coverage of the previous selection (sinks and tail included); the Selector then
    ranks only ``[lo, hi)``. ``from_logits``: the logits the slow step kept, in row order."""
    width = aligned(width)
    pos = region_positions(torch.zeros_like(n), n, width)
    return _Refresh(slots, q_rows, lo, hi, lambda _: pos, width, True, previous, from_logits=from_logits)


def _reuse_refresh(slots, q_rows, lo, hi, records: list[SelectionRecord], to_device) -> _Refresh:
    """Candidates: each request's cached selection (per layer and KV head), then the tokens
    after it, ``[record.hi, hi)``: the cost depends on the new tokens, not on the cached prefix."""
    layers, heads = records[0].pos.shape[:2]
    kept = max(r.count for r in records)
    start = torch.tensor([r.hi for r in records], dtype=torch.int32)
    width = aligned(kept + int((hi - start).max())) - kept
    cand = torch.full((layers, len(records), heads, kept + width), -1, dtype=torch.int32, device=records[0].pos.device)
    for i, r in enumerate(records):
        cand[:, i, :, : r.count] = r.pos
    cand[..., kept:] = region_positions(to_device(start), to_device(hi), width)  # the same for every layer and head
    return _Refresh(slots, q_rows, to_device(lo), to_device(hi), cand.__getitem__, kept + width, False, from_record=True)


class _Coverage:
    """Coverage of a slow-step refresh's rows (req-pool ``slots``, their ``previous`` selection state),
    per layer (mean over KV heads; 1 until measured: a region kept whole held everything), device only;
    through the Triton kernels if ``kernels`` (the backend's ``on_cuda``), else their torch references."""

    def __init__(self, slots: torch.Tensor, previous: tuple[torch.Tensor, torch.Tensor], layers: int, kernels: bool):
        self.slots, self.previous, self.kernels = slots, previous, kernels
        self.by_layer = torch.ones(slots.shape[0], layers, dtype=torch.float32, device=slots.device)

    def held(self, part: slice, pos, prev_sel, g: int, sinks: int) -> torch.Tensor:
        """What the previous selections ``[g*S', Hkv, K]`` of ``g`` layers for the rows ``part`` held."""
        prev_hi, prev_cnt = (t[part].repeat(g) for t in self.previous)
        return (held_mask if self.kernels else kept_mask)(pos, sinks, prev_hi, prev_sel, prev_cnt)

    def add(self, part: slice, cov: torch.Tensor, layers: torch.Tensor) -> None:
        """Coverage ``[g*S', Hkv]`` of the ``g`` ``layers`` (index tensor) for the rows ``part``."""
        self.by_layer[part, layers] = cov.view(layers.numel(), -1, cov.shape[-1]).mean(2).T

    def finish(self, store: SelectionStore, stats: SFIStats, keep: torch.Tensor | None = None) -> None:
        """Per row: mean over layers (and the worst layer) -> the store, the counters and (adaptive)
        the gap. Rows that had no selection before their slow step, or are not in ``keep``, are not measured."""
        fn = finish_coverage if self.kernels else finish_coverage_ref
        fn(store, stats, self.slots, self.by_layer, self.previous[1], keep)


@dataclass
class _Deferred:
    """A refresh after a slow step running on the side stream (``refresh_lag`` > 1); it takes
    over at decode step ``due``. Its tensors were made on the main stream and live here until
    then, so the side stream never reads or writes memory the main stream has freed."""

    due: int
    refresh: _Refresh  # what the side stream reads: slots, candidate bounds and positions
    q: torch.Tensor  # [layers, S, Hq, D] the slow step's queries
    generation: torch.Tensor  # [S] the slots' store.generation when it started
    hi: torch.Tensor  # [S] the new selection state, as the slow step's plan set it
    count: torch.Tensor
    pos: torch.Tensor  # [layers, S, Hkv, topk] the new selections, written by the side stream
    cover: _Coverage
    done: torch.cuda.Event | None


class SFIBackend(AttentionBackend):
    def __init__(self, runner, dense: AttentionBackend, cfg: SFIConfig):
        super().__init__()
        self.shape: AttentionShape = attention_shape(runner)
        if cfg.dense_layers > self.shape.num_layers:
            raise SFIConfigError(f"SFI config field 'dense_layers' ({cfg.dense_layers}) exceeds the model's "
                                 f"{self.shape.num_layers} attention layers")
        self.cfg = cfg
        self.dense = dense
        self.device = torch.device(runner.device)
        self.token_to_kv_pool = runner.token_to_kv_pool
        self.req_to_token_pool = runner.req_to_token_pool
        self.req_to_token = runner.req_to_token_pool.req_to_token
        self.start_layer = getattr(self.token_to_kv_pool, "start_layer", 0) or 0
        rows = self.req_to_token.shape[0]
        self.store = SelectionStore(cfg, self.shape.num_layers, rows, self.shape.kv_heads, self.device)
        vocab = runner.model_config.vocab_size
        self.is_boundary = boundary_table(cfg, vocab, _derived_boundary_ids(runner, cfg), self.device)
        self.stats = SFIStats(self.device, export=bool(getattr(runner.server_args, "enable_metrics", False)))
        self.on_cuda = self.device.type == "cuda"
        self._alloc_rows(rows)
        self.slow_logits = slow_logits(cfg, self.shape, self.req_to_token.shape[1], self.device)
        self.pending: tuple[int, torch.Tensor] | None = None  # previous decode step: (rows, seq lens on host)
        self.extend_refresh: list[_Refresh] = []
        self.new_records: list[tuple[str, int, int, int]] = []  # this prefill's (rid, row, hi, count)
        self.extend_q_rows: torch.Tensor | None = None  # query rows of this prefill that score candidates
        self.extend_q: torch.Tensor | None = None  # [layers, rows, Hq, D]: those queries, saved per layer
        self.reuse = SelectionReuse(cfg.reuse_records) if cfg.reuse_records > 0 else None
        self.cov_host = torch.zeros_like(self.store.cov_stats, device="cpu", pin_memory=self.on_cuda)
        self.cov_copied = torch.cuda.Event() if self.on_cuda else None
        self.step = 0  # decode steps run (not counting graph capture)
        self.mixed_seen = False  # logged once: the first mixed prefill/decode batch
        self.deferred: list[_Deferred] = []
        self.side = torch.cuda.Stream(self.device) if self.on_cuda and cfg.refresh_lag > 1 else None
        logger.info(
            "SFI backend: dense=%s, %d layers, %d/%d q/kv heads, %d boundary ids, %d rows, GPU state %.1f MiB "
            "(selections, saved queries, kept slow-step logits, up to %d records and deferred refreshes, the "
            "Selector's temporaries; "
            "taken from the KV-cache budget), "
            "config %s",
            type(dense).__name__, self.shape.num_layers, self.shape.q_heads, self.shape.kv_heads,
            int(self.is_boundary.sum()), rows,
            static_bytes(cfg, self.shape, rows, self.q_hist.dtype, self.req_to_token.shape[1]) / 2**20,
            cfg.reuse_records, cfg.to_dict(),
        )
        if self.on_cuda:  # the CPU path runs torch references: nothing to compile
            self.warm_up_selector()

    def warm_up_selector(self) -> None:
        """Runs the Selector once per kind of call it serves -- a prefill's selection (``prefill_queries``
        > 0), a refresh after a slow step (from the keys, and from kept logits when on) -- on a dummy request in req-pool slot 0
        long enough to be scored, so that Triton compiles these kernels for this model's shapes now:
        otherwise the first long request's first slow step would wait for the compiles (about a second
        on an H200 with an empty Triton cache). A prefill resets slot 0 before any request uses it; no
        counter is touched. Selections from records (reuse) still compile at their first use."""
        cfg, sh = self.cfg, self.shape
        n = cfg.sinks + cfg.topk + cfg.recent + 1
        if n > self.req_to_token.shape[1] or not self.sparse_layers:
            return
        t0 = time.perf_counter()
        slot = torch.zeros(1, dtype=torch.int64, device=self.device)
        lo, hi, count = (self._to_device(t.int()) for t in self.store.bounds(torch.tensor([n])))
        dtype = self.token_to_kv_pool.get_key_buffer(self.start_layer).dtype
        q = torch.zeros(sh.num_layers, max(1, cfg.prefill_queries), sh.q_heads, sh.head_dim, dtype=dtype,
                        device=self.device)
        rows = torch.arange(q.shape[1], device=self.device).view(1, -1)
        if cfg.prefill_queries:  # otherwise prefills make no selection
            self._select(self.sparse_layers, q, _region_refresh(slot, rows, lo, hi, n))
        length = torch.full((1,), n, dtype=torch.int32, device=self.device)
        self.slow_logits[:, :1, :, :n].zero_()  # the kept-logits row the refresh below reads
        for from_logits in sorted({False, cfg.logit_rows > 0}):
            r = _slow_step_refresh(slot, rows[:, :1], lo, hi, length, n, (hi, count), from_logits)
            self._select(self.sparse_layers, q, r, _Coverage(slot, (hi, count), sh.num_layers, self.on_cuda))
        logger.info("SFI: Selector kernels ready (%.1f s)", time.perf_counter() - t0)

    @classmethod
    def selector_only(cls, cfg: SFIConfig, shape: AttentionShape, key_buffer: Callable[[int], torch.Tensor],
                      req_to_token: torch.Tensor, device: torch.device) -> "SFIBackend":
        """A backend holding only what the Selector (``_select``) needs, without a model runner:
        for benchmarks and tests of the refresh. ``key_buffer``: layer id -> that layer's K pool."""
        b = cls.__new__(cls)
        b.cfg, b.shape, b.device, b.on_cuda, b.start_layer = cfg, shape, device, device.type == "cuda", 0
        b.token_to_kv_pool = SimpleNamespace(get_key_buffer=key_buffer)
        b.req_to_token = req_to_token
        b.store = SelectionStore(cfg, shape.num_layers, req_to_token.shape[0], shape.kv_heads, device)
        b.slow_logits = slow_logits(cfg, shape, req_to_token.shape[1], device)
        b.stats = SFIStats(device)
        b.cov_host, b.cov_copied = torch.zeros_like(b.store.cov_stats, device="cpu"), None
        return b

    def _alloc_rows(self, rows: int) -> None:
        """Static per-batch-row buffers (their addresses are baked into captured graphs)."""
        dtype = self.token_to_kv_pool.get_key_buffer(self.start_layer).dtype
        self.q_hist = saved_queries(self.shape, rows, dtype, self.device)
        self.rows = StepRows.zeros(rows, self.device)
        self.all_slow = torch.ones(rows, dtype=torch.bool, device=self.device)  # rows of the dense layers
        self.slow_host = torch.zeros(rows, dtype=torch.bool, pin_memory=self.on_cuda)
        self.slow_ready = torch.cuda.Event() if self.on_cuda else None

    # ---- metadata ---------------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch) -> None:
        if forward_batch.forward_mode.is_decode():
            self.init_forward_metadata_out_graph(forward_batch)
            return
        self._refresh_previous_slow_rows()
        if forward_batch.forward_mode.is_mixed() and not self.mixed_seen:
            self.mixed_seen = True
            logger.info("SFI: a prefill chunk shares a batch with running decodes (--enable-mixed-chunk): "
                        "those attend densely in it and rebuild their selection, as at a prefill")
        self.dense.init_forward_metadata(forward_batch)
        self.extend_refresh = self._plan_extend(forward_batch) if forward_batch.forward_mode.is_extend() else []

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """Decode metadata; also run before every graph replay. Device work, and at most a wait for the
        previous step's slow-mask copy (:meth:`_refresh_previous_slow_rows`)."""
        if not in_capture:
            self._apply_deferred()
        self._refresh_previous_slow_rows()
        fb = forward_batch
        bs = fb.batch_size
        real = bs - (getattr(fb, "num_padding", 0) or 0)
        plan = plan_step if self.on_cuda else plan_step_ref
        plan(self.store, self.stats, self.is_boundary, fb.input_ids, fb.req_pool_indices, fb.seq_lens, real, bs,
             self.rows)
        if not in_capture and real > 0:
            self.slow_host[:real].copy_(self.rows.slow[:real], non_blocking=True)
            if self.slow_ready is not None:
                self.slow_ready.record()
            host_lens = fb.seq_lens_cpu[:real] if fb.seq_lens_cpu is not None else fb.seq_lens[:real].cpu()
            self.pending = (real, host_lens.clone())
        if not in_capture:
            self.step += 1
        if self.cfg.log_interval and self.stats.decode_steps % self.cfg.log_interval == 0:
            reuse = self.reuse
            self.stats.log(reuse.summary() if reuse else "", reuse.metrics() if reuse else None)

    def _refresh_previous_slow_rows(self) -> None:
        """Rebuild, for every layer, the selections of the previous decode step's slow rows
        (and measure the coverage of the selections they replace)."""
        if self.pending is None:
            return
        real, seq_lens = self.pending
        self.pending = None
        if self.slow_ready is not None:  # returns at once if done, as it nearly always is
            self.slow_ready.synchronize()  # recorded before the previous step's forward
        rows = self.slow_host[:real].nonzero().flatten()
        n = seq_lens[rows]
        lo, hi, _ = self.store.bounds(n)
        fits = hi - lo <= self.cfg.topk
        for scored, sub in (False, (hi > lo) & fits), (True, ~fits):
            if not sub.any():
                continue
            rows_d = self._to_device(rows[sub])
            slots, lo_d, hi_d = self.rows.slots[rows_d], self._to_device(lo[sub].int()), self._to_device(hi[sub].int())
            previous = (self.rows.hi[rows_d], self.rows.count[rows_d])
            if scored:
                self._refresh_scored(slots, rows_d, lo_d, hi_d, n[sub], previous)
            else:
                self._keep_whole_region(slots, lo_d, hi_d, int((hi - lo)[sub].max()), previous)
            self.stats.add_refreshes(len(rows_d))

    def _refresh_scored(self, slots, rows_d, lo, hi, n: torch.Tensor, previous) -> None:
        """Refresh the slow rows ``rows_d`` (in batch order) whose region exceeds ``topk``: the first
        ``logit_rows`` of them from the logits their slow step kept (the plan gave them rows 0, 1, ...
        in the same order), the others from the keys, in line or (``refresh_lag`` > 1) deferred."""
        keep = min(len(rows_d), self.cfg.logit_rows)
        for part, from_logits in (slice(0, keep), True), (slice(keep, len(rows_d)), False):
            if part.start == part.stop:
                continue
            r = _slow_step_refresh(slots[part], rows_d[part].unsqueeze(1), lo[part], hi[part],
                                   self._to_device(n[part].int()), int(n[part].max()),
                                   tuple(t[part] for t in previous), from_logits)
            pending = sum(d.refresh.slots.shape[0] for d in self.deferred)
            if self.cfg.refresh_lag > 1 and pending + len(r.slots) <= DEFERRED_ROWS:
                self._defer(r)
            else:
                self._refresh_now(r, self.q_hist)

    def _refresh_now(self, r: _Refresh, q: torch.Tensor) -> None:
        """The refresh ``r`` after a slow step, on this stream, for every layer (queries ``q``:
        ``[layers, rows, Hq, D]``): new selections, and the coverage of those they replace."""
        cover = _Coverage(r.slots, r.previous, self.shape.num_layers, self.on_cuda)
        with self.stats.refresh_selector.time(r.from_logits):
            self._select(self.sparse_layers, q, r, cover)
        self._finish_coverage(cover)

    def _defer(self, r: _Refresh) -> None:
        """Start the refresh ``r`` after a slow step on the side stream (on CPU: now), for
        :meth:`_apply_deferred` to put in place ``refresh_lag - 1`` steps later; until then the
        rows get their previous selection state back, so they keep decoding with it."""
        st, sh = self.store, self.shape
        slots = r.slots
        new_hi, new_count = st.hi[slots], st.count[slots]  # set by the slow step's plan
        st.hi[slots], st.count[slots] = r.previous
        q = self.q_hist[:, r.q_rows[:, 0]]  # the slow step's queries: the next steps overwrite q_hist
        r.q_rows = torch.arange(len(slots), device=self.device).unsqueeze(1)
        d = _Deferred(
            due=self.step + self.cfg.refresh_lag - 1, refresh=r, q=q, generation=st.generation[slots],
            hi=new_hi, count=new_count,
            pos=torch.zeros(sh.num_layers, len(slots), sh.kv_heads, self.cfg.topk, dtype=torch.int32,
                            device=self.device),
            cover=_Coverage(slots, r.previous, sh.num_layers, self.on_cuda), done=None,
        )
        if self.side is None:
            with self.stats.refresh_selector.time(False):
                self._select(self.sparse_layers, q, r, d.cover, d.pos)
        else:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side), self.stats.refresh_selector.time(False):  # timed on the side stream
                self._select(self.sparse_layers, q, r, d.cover, d.pos)
                d.done = torch.cuda.Event()
                d.done.record()
        self.deferred.append(d)

    def _apply_deferred(self) -> None:
        """Put in place the deferred refreshes due at this step (the main stream waits for each on
        the device), except for slots that started another request since (``store.generation``)."""
        due = [d for d in self.deferred if d.due <= self.step]
        if not due:
            return
        self.deferred = [d for d in self.deferred if d.due > self.step]
        st = self.store
        for d in due:
            if d.done is not None:
                torch.cuda.current_stream().wait_event(d.done)
            slots = d.refresh.slots
            same = st.generation[slots] == d.generation
            st.hi[slots] = torch.where(same, d.hi, st.hi[slots])
            st.count[slots] = torch.where(same, d.count, st.count[slots])
            st.pos[:, slots] = torch.where(same.view(1, -1, 1, 1), d.pos, st.pos[:, slots])
            self._finish_coverage(d.cover, keep=same)  # a new request's slot: not measured

    def _plan_extend(self, fb) -> list[_Refresh]:
        """Selections at the end of a prefill: from scratch, or from the record of a cached prefix."""
        slots, st, n_q = fb.req_pool_indices, self.store, self.cfg.prefill_queries
        self.new_records = []
        if n_q == 0:
            st.clear(slots)
            return []
        st.start(slots, fb.seq_lens)
        lo, hi, count = st.bounds(torch.as_tensor(fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.cpu()))
        lo, hi = lo.int(), hi.int()
        ext = list(fb.extend_seq_lens_cpu)
        # last `prefill_queries` prompt rows of each request (a shorter extend repeats its first row)
        q_rows = torch.tensor([[max(e - i, e - n) for i in range(n_q, 0, -1)] for e, n in zip(accumulate(ext), ext)])
        rows = (hi > lo).nonzero().flatten().tolist()
        whole = [i for i in rows if hi[i] - lo[i] <= self.cfg.topk]
        if whole:
            idx = torch.tensor(whole)
            self._keep_whole_region(slots[self._to_device(idx)], self._to_device(lo[idx]), self._to_device(hi[idx]),
                                    int((hi - lo)[idx].max()))
        rows = [i for i in rows if hi[i] - lo[i] > self.cfg.topk]  # scored by the Selector
        records = self._take_records(fb, rows, hi)
        self.stats.add_refreshes(len(rows) + len(whole))
        if self.reuse is not None and self.reuse.linked and fb.rids is not None:
            self.new_records = [(fb.rids[i], i, int(hi[i]), int(count[i])) for i in rows]
        if not rows:
            return []
        # Each layer saves these query rows; the Selector runs once, over all layers, after the last.
        sh = self.shape
        self.extend_q_rows = self._to_device(q_rows[rows].flatten())
        self.extend_q = torch.empty(sh.num_layers, len(rows) * n_q, sh.q_heads, sh.head_dim,
                                    dtype=self.q_hist.dtype, device=self.device)
        saved_at = {i: k * n_q + torch.arange(n_q) for k, i in enumerate(rows)}
        out = []
        for group in ([i for i in rows if i not in records], [i for i in rows if i in records]):
            if not group:
                continue
            idx = torch.tensor(group)
            args = (slots[self._to_device(idx)], self._to_device(torch.stack([saved_at[i] for i in group])),
                    lo[idx], hi[idx])
            if group[0] in records:
                out.append(_reuse_refresh(*args, [records[i] for i in group], self._to_device))
            else:
                out.append(_region_refresh(*args[:2], *map(self._to_device, args[2:]), int((hi - lo)[idx].max())))
        return out

    def _keep_whole_region(self, slots, lo, hi, width: int, previous=None) -> None:
        """Rows whose region ``[lo, hi)`` fits the budget select all of it, for every layer and KV head:
        what the Selector would return, without scoring. After a slow step (``previous``: the rows'
        selection state before it), the selection this replaces held every token as well (its region,
        shorter, fitted too), so the coverage is 1."""
        self.store.pos[:, slots, :, :width] = region_positions(lo, hi, width)
        if previous is not None:
            cover = _Coverage(slots, previous, self.shape.num_layers, self.on_cuda)
            self._finish_coverage(cover)

    def _take_records(self, fb, rows: list[int], hi: torch.Tensor) -> dict[int, SelectionRecord]:
        """Records offered by the radix cache to this prefill's requests, where they still apply
        (made for at most the cached prefix, as the radix cache guarantees when nothing changed)."""
        if self.reuse is None or fb.rids is None:
            return {}
        offered = [self.reuse.take(rid) for rid in fb.rids]
        prefix = fb.extend_prefix_lens_cpu
        out = {}
        for i in rows:
            if prefix[i] == 0:
                continue
            rec = offered[i]
            if rec is not None and rec.hi <= min(prefix[i], int(hi[i])):
                out[i] = rec
        self.reuse.hits += len(out)
        self.reuse.misses += sum(1 for i in rows if prefix[i] > 0) - len(out)
        self.stats.export(self.reuse.metrics())
        return out

    def _keep_records(self, fb) -> None:
        """After a prefill's last layer: copy each new selection out, for the radix cache."""
        picked = self.store.pos.index_select(1, fb.req_pool_indices)
        for rid, i, hi, count in self.new_records:
            self.reuse.made(rid, SelectionRecord(hi, count, picked[:, i, :, :count].clone()))
        self.new_records = []

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Small host tensor -> device without a stream sync (pinned, asynchronous copy)."""
        if not self.on_cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # ---- forward ----------------------------------------------------------------------------

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if self.extend_refresh:
            li = layer.layer_id - self.start_layer
            self.extend_q[li] = q.reshape(-1, self.shape.q_heads, self.shape.head_dim)[self.extend_q_rows]
            if li == self.shape.num_layers - 1:
                for r in self.extend_refresh:
                    with self.stats.prefill_selector.time(r.from_record):
                        self._select(self.sparse_layers, self.extend_q, r)
                if self.new_records:
                    self._keep_records(forward_batch)
                self.extend_refresh, self.extend_q = [], None
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale)
        sh, st = self.shape, self.store
        bs = forward_batch.batch_size
        li = layer.layer_id - self.start_layer
        q3 = q.reshape(bs, sh.q_heads, sh.head_dim)
        attend = sfi_decode if self.on_cuda else sfi_decode_ref
        slow = (self.rows.slow if li >= self.cfg.dense_layers else self.all_slow)[:bs]
        out = attend(
            q3, self.token_to_kv_pool.get_key_buffer(layer.layer_id), self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            self.req_to_token, forward_batch.req_pool_indices[:bs], forward_batch.seq_lens[:bs], slow,
            self.rows.hi[:bs], self.rows.count[:bs], st.pos[li], self.cfg.sinks, sh.sm_scale, sh.logit_cap,
            self.slow_logits[li] if self.cfg.logit_rows else None, self.rows.logit_row[:bs],
            q_out=self.q_hist[li],  # saved for the Selector (the refresh after a slow row)
        )
        return out.reshape(-1, sh.q_heads * sh.v_head_dim)

    @property
    def sparse_layers(self) -> range:
        """Layers that decode from a selection (after the ``dense_layers``): the ones the Selector serves."""
        return range(self.cfg.dense_layers, self.shape.num_layers)

    def _select(self, layers: Sequence[int], q: torch.Tensor, r: _Refresh,
                cover: _Coverage | None = None, out: torch.Tensor | None = None) -> None:
        """Selector: for each layer ``l``, queries ``q[l][r.q_rows]`` (``q``: ``[layers, rows, Hq, D]``)
        -> ``store.pos[l]`` of ``r.slots`` (or ``out[l]``, one row per slot, for a deferred refresh).

        Layers are batched (one pass of the score/top-k ops over many layers) within what a pass
        may allocate (``memory.selector_pass_bytes``), since a refresh after a slow step covers
        every layer at once.
        ``r.from_logits`` needs ``layers`` to be consecutive (the kept logits are sliced).
        A refresh after a slow step also measures, into ``cover``, the coverage of the
        selections it replaces.
        """
        unit = selector_unit_bytes(self.shape, r.width, r.q_rows.shape[1], r.from_logits)  # one (layer, request)
        budget = selector_pass_bytes(self.shape)
        rows = max(1, min(r.slots.shape[0], budget // unit))
        per = max(1, budget // (unit * rows))
        layers = list(layers)
        for a in range(0, r.slots.shape[0], rows):
            for b in range(0, len(layers), per):
                # one pass per call: its temporaries are freed before the next pass allocates
                self._select_pass(layers[b:b + per], q, r, slice(a, a + rows), cover, out)

    def _select_pass(self, group: list[int], q: torch.Tensor, r: _Refresh, part: slice,
                     cover: _Coverage | None, out: torch.Tensor | None) -> None:
        """One pass of :meth:`_select`: the layers ``group`` for the rows ``part`` of ``r``."""
        cfg, sh = self.cfg, self.shape
        slots, lo, hi, q_rows = r.slots[part], r.lo[part], r.hi[part], r.q_rows[part]
        g, n_s = len(group), len(slots)
        idx = self._to_device(torch.tensor(group)).view(-1, 1)
        pos = torch.cat([r.positions(l)[part] for l in group])
        if r.from_logits:  # the slow step's own logits: a view where it can be (all rows), no keys read
            logits = self.slow_logits[group[0]:group[-1] + 1, part, :, :r.width]
            logits, log_norm = logits.flatten(0, 1).transpose(2, 3), None  # [.., G, width], strided
        else:
            k_bufs = [self.token_to_kv_pool.get_key_buffer(l + self.start_layer) for l in group]
            logits_fn = candidate_logits if self.on_cuda else candidate_logits_ref
            logits, log_norm = logits_fn(q[idx.view(-1, 1, 1), q_rows.unsqueeze(0)], k_bufs,
                                         self.req_to_token, slots, pos, sh.sm_scale, sh.logit_cap,
                                         norms=cfg.prior_lambda_max > 0)
        lo_g, hi_g = lo.repeat(g), hi.repeat(g)
        held = None
        if cover is not None:
            held = cover.held(part, pos, self.store.pos[idx, slots.view(1, -1)].flatten(0, 1), g, cfg.sinks)
        f, total, cov = (group_scores if self.on_cuda else group_scores_ref)(logits, pos, lo_g, hi_g, cfg.alpha, held)
        del logits, held  # the largest temporaries: gone before the top-k allocates its own
        if cover is not None:
            cover.add(part, cov, idx.view(-1))
        sel = select(f, pos, cfg, (lo_g, hi_g), log_norm, r.contiguous, topk_select if self.on_cuda else None, total)
        sel = sel.view(g, n_s, sh.kv_heads, -1)
        if out is None:
            self.store.pos[idx, slots.view(1, -1), :, : sel.shape[-1]] = sel
        else:
            out[idx.view(-1), part.start:part.start + n_s, :, : sel.shape[-1]] = sel

    def _finish_coverage(self, cover: _Coverage, keep: torch.Tensor | None = None) -> None:
        """Coverage of a slow-step refresh (its rows in ``keep``) into the store and counters; the
        per-request summaries copied to the host (asynchronously) for the responses."""
        cover.finish(self.store, self.stats, keep)
        self.cov_host.copy_(self.store.cov_stats, non_blocking=True)
        if self.cov_copied is not None:
            self.cov_copied.record()

    def coverage_summary(self, slot: int) -> dict[str, float] | None:
        """Coverage of the request in req-pool ``slot`` over its measured slow steps (None: none yet):
        mean, worst layer and count. Reads the host copy made after the last refresh (waits only
        for that copy, not for later work)."""
        if self.cov_copied is not None:
            self.cov_copied.synchronize()
        total, worst, n = self.cov_host[slot].tolist()
        return {"mean": total / n, "worst_layer": worst, "slow_steps": int(n)} if n else None

    # ---- plumbing ---------------------------------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Decode needs no per-graph state beyond the per-row buffers, sized here if graphs run larger batches."""
        if max_bs > self.rows.slow.shape[0]:
            self._alloc_rows(max_bs)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def support_triton(self):
        return self.dense.support_triton()


def _derived_boundary_ids(runner, cfg: SFIConfig) -> list[int]:
    """Boundary ids from the model's tokenizer; empty (with a warning) if it cannot be loaded."""
    if not cfg.boundary or cfg.boundary_ids is not None:
        return []
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    sa = runner.server_args
    try:
        tok = get_tokenizer(
            sa.tokenizer_path or sa.model_path, tokenizer_mode=sa.tokenizer_mode,
            trust_remote_code=sa.trust_remote_code, tokenizer_revision=getattr(sa, "revision", None),
        )
        return boundary_ids_from_tokenizer(tok)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure means: no derived ids
        logger.warning("SFI: could not load the tokenizer (%s); slow steps follow max_fast_steps and "
                       "SFI_CONFIG boundary_ids only", e)
        return []


def create_sfi_backend(runner) -> SFIBackend:
    """Factory registered as attention backend ``sfi``."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    cfg = SFIConfig.from_env()
    dense_name = cfg.resolve_dense_backend(torch.device(runner.device).type)
    dense = ATTENTION_BACKENDS[dense_name](runner)
    return SFIBackend(runner, dense, cfg)
