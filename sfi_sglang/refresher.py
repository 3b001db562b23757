"""The Selector's runs: each request's selection (what its fast steps attend to) rebuilt from attention.

Every run covers all sparse layers at once, batched within a memory budget
(``memory.selector_pass_bytes``). The kinds of run:

- **After a prefill**, from the last ``prefill_queries`` prompt queries (each layer saves them
  during the prefill) over the candidate region ``[sinks, n - recent)``; over a cached prefix
  with a selection record (``sfi_sglang.radix``), over that record's positions and the tokens
  after it only.
- **Before the decode step after a slow step**, from the queries the slow step saved, or from the
  logits its dense pass kept (``slow_logit_rows``), over the whole context: the same logits give
  the coverage of the selection replaced (how much of the slow step's attention it held).
  The host learns which rows were slow from an asynchronous copy of the slow mask made before
  that step's forward; it waits only if the GPU has not got that far.
- Rows whose region fits ``topk`` take it whole, without scoring.

The kernels (or their torch references on CPU) come in as a ``KernelSet``, chosen once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Sequence

import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.kernels import KernelSet
from sfi_sglang.kernels.plan_step import StepRows
from sfi_sglang.memory import (SelectionStore, aligned, saved_queries, selector_pass_bytes, selector_unit_bytes,
                               slow_logits)
from sfi_sglang.metrics import SFIStats
from sfi_sglang.model_check import AttentionShape
from sfi_sglang.radix import SelectionRecord, SelectionReuse
from sfi_sglang.spans import Spans

logger = logging.getLogger("sfi_sglang")


def region_positions(lo: torch.Tensor, hi: torch.Tensor, width: int) -> torch.Tensor:
    """Candidates ``[lo, hi)`` of each row, padded with -1 to ``width``: ``[S, 1, width]`` int32."""
    pos = lo.view(-1, 1).int() + torch.arange(width, device=lo.device, dtype=torch.int32)
    return pos.masked_fill(pos >= hi.view(-1, 1), -1).unsqueeze(1)


@dataclass
class Refresh:
    """Requests whose selections are rebuilt from given query rows."""

    slots: torch.Tensor  # [S] req-pool slots (device)
    q_rows: torch.Tensor  # [S, W] rows of the query tensor that score the candidates (device)
    lo: torch.Tensor  # [S] region the Selector ranks: start (device, int32)
    hi: torch.Tensor  # [S] end
    positions: Callable[[int], torch.Tensor]  # layer -> candidate positions [S, 1 or Hkv, N] (-1: padding)
    width: int  # N
    contiguous: bool  # candidates are consecutive positions, then padding
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # after a slow step: StepRows (hi, count) to measure
    from_record: bool = False  # prefill refresh that starts from cached selection records
    from_logits: bool = False  # row i's logits are row i of the kept slow-step logits (no keys read)


def region_refresh(slots, q_rows, lo, hi, width: int) -> Refresh:
    """Candidates: the whole region ``[lo, hi)``, the same for every layer and KV head."""
    width = aligned(width)
    pos = region_positions(lo, hi, width)
    return Refresh(slots, q_rows, lo, hi, lambda _: pos, width, True)


def slow_step_refresh(slots, q_rows, lo, hi, n, width: int, previous, from_logits: bool = False) -> Refresh:
    """After a slow step: candidates are the whole context ``[0, n)``, so the same logits give
    the coverage of the previous selection (sinks and tail included); the Selector then
    ranks only ``[lo, hi)``. ``from_logits``: the logits the slow step kept, in row order."""
    width = aligned(width)
    pos = region_positions(torch.zeros_like(n), n, width)
    return Refresh(slots, q_rows, lo, hi, lambda _: pos, width, True, previous, from_logits=from_logits)


def reuse_refresh(slots, q_rows, lo, hi, records: list[SelectionRecord], to_device) -> Refresh:
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
    return Refresh(slots, q_rows, to_device(lo), to_device(hi), cand.__getitem__, kept + width, False, from_record=True)


class Coverage:
    """Coverage of a slow-step refresh's rows (req-pool ``slots``, their ``previous`` selection state),
    per layer (mean over KV heads; 1 until measured: a region kept whole held everything)."""

    def __init__(self, slots: torch.Tensor, previous: tuple[torch.Tensor, torch.Tensor], layers: int):
        self.slots, self.previous = slots, previous
        self.by_layer = torch.ones(slots.shape[0], layers, dtype=torch.float32, device=slots.device)

    def add(self, part: slice, cov: torch.Tensor, layers: torch.Tensor) -> None:
        """Coverage ``[g*S', Hkv]`` of the ``g`` ``layers`` (index tensor) for the rows ``part``."""
        self.by_layer[part, layers] = cov.view(layers.numel(), -1, cov.shape[-1]).mean(2).T


class Refresher:
    """Runs the Selector into ``store`` and owns what it reads: the decode steps' saved queries
    (``q_hist``), the slow steps' kept logits (``slow_logits``), a prefill's saved queries, the
    host copies of the slow mask and of the coverage summaries.

    Layers are counted over the ones sfi makes sparse (``shape.layer_ids``, the model's full-attention
    layers); ``key_buffer``: model layer id -> that layer's K pool ``[tokens, Hkv, D]``; ``req_to_token``: sglang's
    req-pool rows; ``rows``: batch rows the decode buffers hold (grown by :meth:`alloc_rows`);
    ``spans``: where runs of text start (None: no span completion)."""

    def __init__(self, cfg: SFIConfig, shape: AttentionShape, kernels: KernelSet,
                 key_buffer: Callable[[int], torch.Tensor], req_to_token: torch.Tensor, device: torch.device,
                 stats: SFIStats, reuse: SelectionReuse | None = None, rows: int = 1, spans: Spans | None = None):
        self.cfg, self.shape, self.k, self.stats, self.reuse, self.spans = cfg, shape, kernels, stats, reuse, spans
        self.key_buffer, self.req_to_token, self.device = key_buffer, req_to_token, device
        self.on_cuda = device.type == "cuda"
        self.dtype = key_buffer(shape.layer_ids[0]).dtype
        self.store = SelectionStore(cfg, shape.num_layers, req_to_token.shape[0], shape.kv_heads, device)
        self.slow_logits = slow_logits(cfg, shape, req_to_token.shape[1], device)
        self.cov_host = torch.zeros_like(self.store.cov_stats, device="cpu", pin_memory=self.on_cuda)
        self.cov_copied = torch.cuda.Event() if self.on_cuda else None
        self.pending: tuple[int, torch.Tensor, StepRows] | None = None  # last decode step: rows, host lens, its plan
        self.prefill: list[Refresh] = []
        self.prefill_q_rows: torch.Tensor | None = None  # query rows of this prefill that score candidates
        self.prefill_q: torch.Tensor | None = None  # [layers, rows, Hq, D]: those queries, saved per layer
        self.new_records: list[tuple[str, int, int, int]] = []  # this prefill's (rid, row, hi, count)
        self.alloc_rows(rows)

    @property
    def sparse_layers(self) -> range:
        """Layers that decode from a selection (after the ``dense_layers``): the ones the Selector serves."""
        return range(self.cfg.dense_layers, self.shape.num_layers)

    def alloc_rows(self, rows: int) -> None:
        """Per-batch-row buffers (static: captured graphs bake the address of ``q_hist``)."""
        self.q_hist = saved_queries(self.shape, rows, self.dtype, self.device)
        self.slow_host = torch.zeros(rows, dtype=torch.bool, pin_memory=self.on_cuda)
        self.slow_ready = torch.cuda.Event() if self.on_cuda else None

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Small host tensor -> device without a stream sync (pinned, asynchronous copy)."""
        return t.pin_memory().to(self.device, non_blocking=True) if self.on_cuda else t

    # ---- decode ------------------------------------------------------------------------------

    def note_step(self, rows: StepRows, real: int, seq_lens: torch.Tensor) -> None:
        """A decode step was planned (``rows``, ``real`` live rows at host lengths ``seq_lens``):
        start copying its slow mask to the host, for the refresh before the next step."""
        self.slow_host[:real].copy_(rows.slow[:real], non_blocking=True)
        if self.slow_ready is not None:
            self.slow_ready.record()
        self.pending = (real, seq_lens.clone(), rows)

    def refresh_slow_rows(self) -> None:
        """Rebuild, for every layer, the selections of the previous decode step's slow rows
        (and measure the coverage of the selections they replace)."""
        if self.pending is None:
            return
        real, seq_lens, step = self.pending
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
            slots, lo_d, hi_d = step.slots[rows_d], self._to_device(lo[sub].int()), self._to_device(hi[sub].int())
            previous = (step.hi[rows_d], step.count[rows_d])
            if scored:
                self._refresh_scored(slots, rows_d, lo_d, hi_d, n[sub], previous)
            else:
                self._keep_whole_region(slots, lo_d, hi_d, int((hi - lo)[sub].max()), previous)
            self.stats.add_refreshes(len(rows_d))

    def _refresh_scored(self, slots, rows_d, lo, hi, n: torch.Tensor, previous) -> None:
        """Refresh the slow rows ``rows_d`` (in batch order) whose region exceeds ``topk``: the first
        ``slow_logit_rows`` of them from the logits their slow step kept (the plan gave them rows 0, 1, ...
        in the same order), the others from the keys."""
        keep = min(len(rows_d), self.cfg.slow_logit_rows)
        for part, from_logits in (slice(0, keep), True), (slice(keep, len(rows_d)), False):
            if part.start == part.stop:
                continue
            r = slow_step_refresh(slots[part], rows_d[part].unsqueeze(1), lo[part], hi[part],
                                  self._to_device(n[part].int()), int(n[part].max()),
                                  tuple(t[part] for t in previous), from_logits)
            self.refresh_now(r, self.q_hist)

    def refresh_now(self, r: Refresh, q: torch.Tensor) -> None:
        """The refresh ``r`` after a slow step, for every layer (queries ``q``: ``[layers, rows, Hq, D]``):
        new selections, and the coverage of those they replace."""
        cover = Coverage(r.slots, r.previous, self.shape.num_layers)
        with self.stats.refresh_selector.time(r.from_logits):
            self.select(self.sparse_layers, q, r, cover)
        self._finish_coverage(cover)

    def _keep_whole_region(self, slots, lo, hi, width: int, previous=None) -> None:
        """Rows whose region ``[lo, hi)`` fits the budget select all of it, for every layer and KV head:
        what the Selector would return, without scoring. After a slow step (``previous``: the rows'
        selection state before it), the selection this replaces held every token as well (its region,
        shorter, fitted too), so the coverage is 1."""
        self.store.pos[:, slots, :, :width] = region_positions(lo, hi, width)
        if previous is not None:
            self._finish_coverage(Coverage(slots, previous, self.shape.num_layers))

    def _finish_coverage(self, cover: Coverage) -> None:
        """Coverage of a slow-step refresh into the store and counters; the per-request summaries
        copied to the host (asynchronously) for the responses."""
        st = self.store
        self.k.finish_coverage(cover.slots, cover.by_layer, cover.previous[1], st.coverage, st.layer_cov,
                               st.cov_stats, self.stats.cov)
        self.cov_host.copy_(st.cov_stats, non_blocking=True)
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

    # ---- prefill -----------------------------------------------------------------------------

    def plan_prefill(self, fb) -> None:
        """Selections at the end of the prefill ``fb``: from scratch, or from the record of a cached prefix.
        Rows the Selector scores get their last prompt queries saved by :meth:`save_prefill_queries`."""
        slots, st, n_q = fb.req_pool_indices, self.store, self.cfg.prefill_queries
        self.new_records, self.prefill = [], []
        if n_q == 0:
            st.clear(slots)
            return
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
            return
        sh = self.shape
        self.prefill_q_rows = self._to_device(q_rows[rows].flatten())
        self.prefill_q = torch.empty(sh.num_layers, len(rows) * n_q, sh.q_heads, sh.head_dim, dtype=self.dtype,
                                     device=self.device)
        saved_at = {i: k * n_q + torch.arange(n_q) for k, i in enumerate(rows)}
        for group in ([i for i in rows if i not in records], [i for i in rows if i in records]):
            if not group:
                continue
            idx = torch.tensor(group)
            args = (slots[self._to_device(idx)], self._to_device(torch.stack([saved_at[i] for i in group])),
                    lo[idx], hi[idx])
            if group[0] in records:
                self.prefill.append(reuse_refresh(*args, [records[i] for i in group], self._to_device))
            else:
                self.prefill.append(region_refresh(*args[:2], *map(self._to_device, args[2:]),
                                                   int((hi - lo)[idx].max())))

    def save_prefill_queries(self, layer: int, q: torch.Tensor, fb) -> None:
        """Layer ``layer`` of the prefill ``fb`` ran with queries ``q``: keep the rows the Selector
        needs; after the last layer, run it (all layers at once) and keep the new records."""
        if not self.prefill:
            return
        self.prefill_q[layer] = q.reshape(-1, self.shape.q_heads, self.shape.head_dim)[self.prefill_q_rows]
        if layer < self.shape.num_layers - 1:
            return
        for r in self.prefill:
            with self.stats.prefill_selector.time(r.from_record):
                self.select(self.sparse_layers, self.prefill_q, r)
        if self.new_records:
            self._keep_records(fb)
        self.prefill, self.prefill_q = [], None

    def _take_records(self, fb, rows: list[int], hi: torch.Tensor) -> dict[int, SelectionRecord]:
        """Records offered by the radix cache to this prefill's new requests, where they still apply
        (made for at most the cached prefix, as the radix cache guarantees when nothing changed). A
        request's next prefill chunk is offered none: it scores its whole context."""
        if self.reuse is None or fb.rids is None:
            return {}
        offered, records = zip(*(self.reuse.take(rid) for rid in fb.rids))
        prefix = fb.extend_prefix_lens_cpu
        out = {}
        for i in rows:
            rec = records[i]
            if prefix[i] > 0 and rec is not None and rec.hi <= min(prefix[i], int(hi[i])):
                out[i] = rec
        self.reuse.hits += len(out)
        self.reuse.misses += sum(1 for i in rows if prefix[i] > 0 and offered[i]) - len(out)
        self.stats.export(self.reuse.metrics())
        return out

    def _keep_records(self, fb) -> None:
        """After a prefill's last layer: copy each new selection out, for the radix cache."""
        picked = self.store.pos.index_select(1, fb.req_pool_indices)
        for rid, i, hi, count in self.new_records:
            self.reuse.made(rid, SelectionRecord(hi, count, picked[:, i, :, :count].clone()))
        self.new_records = []

    # ---- the Selector ------------------------------------------------------------------------

    def select(self, layers: Sequence[int], q: torch.Tensor, r: Refresh, cover: Coverage | None = None) -> None:
        """Selector: for each layer ``l``, queries ``q[l][r.q_rows]`` (``q``: ``[layers, rows, Hq, D]``)
        -> ``store.pos[l]`` of ``r.slots``; after a slow step also the coverage, into ``cover``, of the
        selections it replaces.

        Layers are batched (one pass of the score/top-k ops over many layers) within what a pass
        may allocate (``memory.selector_pass_bytes``), since a refresh after a slow step covers
        every layer at once. ``r.from_logits`` needs ``layers`` to be consecutive (the kept logits
        are sliced)."""
        unit = selector_unit_bytes(self.shape, r.width, r.q_rows.shape[1], r.from_logits)  # one (layer, request)
        budget = selector_pass_bytes(self.shape)
        rows = max(1, min(r.slots.shape[0], budget // unit))
        per = max(1, budget // (unit * rows))
        layers = list(layers)
        for a in range(0, r.slots.shape[0], rows):
            for b in range(0, len(layers), per):
                # one pass per call: its temporaries are freed before the next pass allocates
                self._select_pass(layers[b:b + per], q, r, slice(a, a + rows), cover)

    def _select_pass(self, group: list[int], q: torch.Tensor, r: Refresh, part: slice, cover: Coverage | None) -> None:
        """One pass of :meth:`select`: the layers ``group`` for the rows ``part`` of ``r``."""
        cfg, sh, k = self.cfg, self.shape, self.k
        slots, lo, hi, q_rows = r.slots[part], r.lo[part], r.hi[part], r.q_rows[part]
        g, n_s = len(group), len(slots)
        idx = self._to_device(torch.tensor(group)).view(-1, 1)
        pos = torch.cat([r.positions(l)[part] for l in group])
        if r.from_logits:  # the slow step's own logits: a view (token-major, strided), no keys read
            logits = self.slow_logits[group[0]:group[-1] + 1, part, :, :r.width].flatten(0, 1).transpose(2, 3)
        else:
            k_bufs = [self.key_buffer(sh.layer_ids[l]) for l in group]
            logits = k.candidate_logits(q[idx.view(-1, 1, 1), q_rows.unsqueeze(0)], k_bufs, self.req_to_token, slots,
                                        pos, sh.sm_scale, sh.logit_cap)
        lo_g, hi_g = lo.repeat(g), hi.repeat(g)
        held = None
        if cover is not None:
            prev_hi, prev_cnt = (t[part].repeat(g) for t in cover.previous)
            prev_sel = self.store.pos[idx, slots.view(1, -1)].flatten(0, 1)
            held = k.held_mask(pos, cfg.sinks, prev_hi, prev_sel, prev_cnt)
        f, total, cov = k.group_scores(logits, pos, lo_g, hi_g, cfg.alpha, held)
        del logits, held  # the largest temporaries: gone before the top-k allocates its own
        if cover is not None:
            cover.add(part, cov, idx.view(-1))
        if self.spans is not None:  # a run scores as its best token: kept or dropped whole
            runs_at = r.positions(group[0])[part] if r.contiguous else pos.view(g, n_s, *pos.shape[1:])  # one for all
            f = self.spans.complete(f.view(g, n_s, *f.shape[1:]), runs_at, slots, self.req_to_token).flatten(0, 1)
        sel = k.topk_select(f, pos, cfg.topk, cfg.neighbor_window, total, (lo_g, hi_g), r.contiguous)
        self.store.pos[idx, slots.view(1, -1), :, : sel.shape[-1]] = sel.view(g, n_s, sh.kv_heads, -1)

    def warm_up(self) -> None:
        """Runs the Selector once per kind of call it serves -- a prefill's selection (``prefill_queries``
        > 0), a refresh after a slow step (from the keys, and from kept logits when on) -- on a dummy
        request in req-pool slot 0 long enough to be scored, so that Triton compiles these kernels for
        this model's shapes now: otherwise the first long request's first slow step would wait for the
        compiles (about a second with an empty Triton cache). A prefill resets slot 0 before any request
        uses it; no counter is touched. Selections from records (reuse) still compile at their first use."""
        cfg, sh = self.cfg, self.shape
        n = cfg.sinks + cfg.topk + cfg.recent + 1
        if n > self.req_to_token.shape[1] or not self.sparse_layers:
            return
        t0 = time.perf_counter()
        slot = torch.zeros(1, dtype=torch.int64, device=self.device)
        lo, hi, count = (self._to_device(t.int()) for t in self.store.bounds(torch.tensor([n])))
        q = torch.zeros(sh.num_layers, max(1, cfg.prefill_queries), sh.q_heads, sh.head_dim, dtype=self.dtype,
                        device=self.device)
        rows = torch.arange(q.shape[1], device=self.device).view(1, -1)
        if cfg.prefill_queries:  # otherwise prefills make no selection
            self.select(self.sparse_layers, q, region_refresh(slot, rows, lo, hi, n))
        length = torch.full((1,), n, dtype=torch.int32, device=self.device)
        self.slow_logits[:, :1, :, :n].zero_()  # the kept-logits row the refresh below reads
        for from_logits in sorted({False, cfg.slow_logit_rows > 0}):
            r = slow_step_refresh(slot, rows[:, :1], lo, hi, length, n, (hi, count), from_logits)
            self.select(self.sparse_layers, q, r, Coverage(slot, (hi, count), sh.num_layers))
        logger.info("SFI: Selector kernels ready (%.1f s)", time.perf_counter() - t0)
