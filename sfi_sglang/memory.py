"""Per-request selection state in static GPU buffers, indexed by sglang's req-pool slot.

sglang gives every running request a row of ``req_to_token`` (its req-pool slot);
SFI keeps its state in the same rows, so nothing is allocated per request and a
finished or aborted request leaves nothing behind: the next request that gets the
slot resets it at its prefill.

Per slot: ``hi`` is where the live tail starts (every token from ``hi`` on is
attended to by fast steps), ``count`` how many positions of ``[min(sinks, hi), hi)``
are selected (the same for every layer and KV head), ``steps`` the decode steps since
the last slow step, ``ready`` whether a selection exists, ``coverage`` the last measured
coverage (-1: none yet; the share of a slow step's attention the previous memory held),
``cov_stats`` the request's coverage so far (sum of the per-step means, lowest
worst-layer value, slow steps measured), ``layer_cov`` its per-layer sums over those steps.
``pos[layer, slot, head]`` holds the selected positions (ascending; entries past ``count``
are unused).
"""

from __future__ import annotations

import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.kernels.plan_step import StepRows
from sfi_sglang.model_check import AttentionShape


# Elements of the Selector's fp32 candidate logits per pass ([layers x rows, Hkv, queries, candidates]) of a
# refresh from the keys; with what each candidate needs besides (CANDIDATE_BYTES), this sets the bytes a pass
# may allocate (selector_pass_bytes), within which the backend batches rows and layers (one row of one layer
# may exceed it).
SELECTOR_SCRATCH = 64 * 2**20

# Bytes the Selector allocates per candidate and KV head besides the logits: a score, a top-k key (and
# under 1 byte of its chunks' histograms), a held flag and positions, the run scores and run ids of
# span completion (sfi_sglang.spans), rounded up.
CANDIDATE_BYTES = 16

# Candidate lists are padded to a multiple of this: the Selector's Triton kernels then always see
# 16-divisible widths and strides, so one compiled specialization serves every context length
# (instead of a second one, compiled mid-serving, for the other lengths) and rows stay aligned.
WIDTH_ALIGN = 16


def aligned(width: int) -> int:
    """``width`` rounded up to a multiple of ``WIDTH_ALIGN``."""
    return -(-width // WIDTH_ALIGN) * WIDTH_ALIGN


class SelectionStore:
    def __init__(self, cfg: SFIConfig, num_layers: int, num_slots: int, kv_heads: int, device: torch.device | str):
        self.cfg = cfg
        self.kv_heads = kv_heads
        self.pos = torch.zeros(num_layers, num_slots, kv_heads, cfg.topk, dtype=torch.int32, device=device)
        self.hi = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.count = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.steps = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.run = torch.zeros(num_slots, dtype=torch.int32, device=device)  # fed tokens since their run began
        self.ready = torch.zeros(num_slots, dtype=torch.bool, device=device)
        self.coverage = torch.full((num_slots,), -1.0, dtype=torch.float32, device=device)
        self.cov_stats = torch.zeros(num_slots, 3, dtype=torch.float32, device=device)
        self.layer_cov = torch.zeros(num_slots, num_layers, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.pos, self.hi, self.count, self.steps, self.run, self.ready, self.coverage,
                             self.cov_stats, self.layer_cov))

    def bounds(self, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidate region ``[lo, hi)`` and selected count for a selection made at these lengths."""
        lo = seq_lens.clamp(max=self.cfg.sinks)
        hi = torch.maximum(lo, seq_lens - self.cfg.recent)
        return lo, hi, (hi - lo).clamp(max=self.cfg.topk)

    def start(self, slots: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mark new selections for ``slots`` at these lengths (positions are written per layer);
        returns their candidate regions ``(lo, hi)``."""
        lo, hi, count = self.bounds(seq_lens)
        self.hi[slots] = hi.to(torch.int32)
        self.count[slots] = count.to(torch.int32)
        self.ready[slots] = True
        self._reset(slots)
        return lo, hi

    def clear(self, slots: torch.Tensor) -> None:
        self.ready[slots] = False
        self._reset(slots)

    def _reset(self, slots: torch.Tensor) -> None:
        """A new request in these slots: no steps, no coverage yet."""
        self.steps[slots] = 0
        self.run[slots] = 0
        self.coverage[slots] = -1.0
        self.cov_stats[slots] = torch.tensor([0.0, 1.0, 0.0], device=self.cov_stats.device)
        self.layer_cov[slots] = 0.0


def slow_logits(cfg: SFIConfig, shape: AttentionShape, context: int, device: torch.device | str) -> torch.Tensor:
    """Attention logits of up to ``cfg.slow_logit_rows`` slow rows of a decode step over their whole
    context ``[layers, rows, Hkv, width, G]`` (fp16; token-major, the layout the decode kernel
    stores cheaply), written by the decode kernel and read by the refresh after the step instead of
    the keys."""
    rows = cfg.slow_logit_rows
    return torch.empty(shape.num_layers, rows, shape.kv_heads, aligned(context) if rows else 0,
                       shape.q_heads // shape.kv_heads, dtype=torch.float16, device=device)


def saved_queries(shape: AttentionShape, rows: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Per layer and batch row, the decode step's queries ``[layers, rows, Hq, D]``: a slow row's
    refresh scores candidates with them at the next step."""
    return torch.zeros(shape.num_layers, rows, shape.q_heads, shape.head_dim, dtype=dtype, device=device)


def selector_pass_bytes(shape: AttentionShape) -> int:
    """What one pass of the Selector may allocate: ``SELECTOR_SCRATCH`` fp32 logits of a refresh from the
    keys (one query row: the most candidates per logit) and their candidates' other temporaries."""
    return 4 * SELECTOR_SCRATCH + CANDIDATE_BYTES * (SELECTOR_SCRATCH // (shape.q_heads // shape.kv_heads))


def selector_unit_bytes(shape: AttentionShape, width: int, query_rows: int, from_logits: bool = False) -> int:
    """What the Selector allocates for one (layer, request) over ``width`` candidates scored with
    ``query_rows`` query rows: fp32 logits per query head (none when it reads the slow step's kept
    logits) and ``CANDIDATE_BYTES`` per candidate and KV head."""
    logits = 0 if from_logits else 4 * query_rows * (shape.q_heads // shape.kv_heads)
    return shape.kv_heads * max(width, 1) * (logits + CANDIDATE_BYTES)


def selector_peak_bytes(cfg: SFIConfig, shape: AttentionShape, context: int) -> int:
    """A bound on the Selector's temporaries (the caching allocator's, not a static buffer): a pass's
    (:func:`selector_pass_bytes`), or, if larger, one request's and layer's at ``prefill_queries`` query
    rows over ``context`` tokens (a pass holds at least that)."""
    return max(selector_pass_bytes(shape), selector_unit_bytes(shape, aligned(context), max(1, cfg.prefill_queries)))


def static_bytes(cfg: SFIConfig, shape: AttentionShape, rows: int, act_dtype: torch.dtype, context: int) -> int:
    """GPU bytes the sfi backend holds for ``rows`` req-pool rows of up to ``context`` tokens
    (selection state, saved slow-step queries, kept slow-step logits, step buffers) plus the most
    its selection records may hold and the Selector's temporaries may take:
    what sfi takes out of sglang's KV-cache budget. Sized from the same buffers, built on the meta device."""
    store = SelectionStore(cfg, shape.num_layers, rows, shape.kv_heads, "meta")
    step = StepRows.zeros(rows, "meta")
    held = cfg.reuse_records * store.pos[:, 0].nbytes
    return (store.nbytes + saved_queries(shape, rows, act_dtype, "meta").nbytes
            + slow_logits(cfg, shape, context, "meta").nbytes + sum(t.nbytes for t in step) + held
            + selector_peak_bytes(cfg, shape, context))
