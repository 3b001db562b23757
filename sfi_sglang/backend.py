"""The ``sfi`` attention backend: SGLang's adapter for Slow-Fast Inference.

Prefill and extend run on a wrapped dense SGLang backend; each layer also saves the last prompt
queries, from which the Selector builds the first selection after the last layer
(``sfi_sglang.refresher``), so decoding starts on fast steps.

Decode, outside the CUDA graph (``init_forward_metadata_out_graph``, before every replay): the
Selector rebuilds the selections of the previous step's slow rows, the fed tokens' run starts are
recorded (``sfi_sglang.spans``), then one launch plans this step (which rows are slow, the
counters, the selection state: ``kernels.plan_step``). Inside
the graph, per layer: write this step's K/V and attend with ``kernels.sfi_decode`` (slow rows:
the whole context; fast rows: sinks + selected + live tail), which also saves the queries and
(for up to ``slow_logit_rows`` slow rows) the logits the Selector reads at the next step.
Sliding-window layers of hybrid models (Gemma 3) decode in the same kernel, every row attending to
its window and nothing else; the Selector and its state serve only the full-attention layers.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sfi_sglang.config import SFIConfig, SFIConfigError
from sfi_sglang.kernels import kernel_set
from sfi_sglang.kernels.plan_step import BOUNDARY, RUN_START, StepRows
from sfi_sglang.memory import static_bytes
from sfi_sglang.metrics import SFIStats
from sfi_sglang.model_check import AttentionShape, attention_shape
from sfi_sglang.policy import token_classes, token_texts
from sfi_sglang.radix import SelectionReuse
from sfi_sglang.refresher import Refresher
from sfi_sglang.spans import Spans

logger = logging.getLogger("sfi_sglang")


class SFIBackend(AttentionBackend):
    """``runner``: sglang's model runner; ``dense``: the backend prefill/extend runs on."""

    def __init__(self, runner, dense: AttentionBackend, cfg: SFIConfig):
        super().__init__()
        self.shape: AttentionShape = attention_shape(runner)
        if cfg.dense_layers > self.shape.num_layers:
            raise SFIConfigError(f"SFI config field 'dense_layers' ({cfg.dense_layers}) exceeds the model's "
                                 f"{self.shape.num_layers} full-attention layers")
        self.cfg, self.dense = cfg, dense
        self.device = torch.device(runner.device)
        self.kernels = kernel_set(triton=self.device.type == "cuda")
        self.token_to_kv_pool = runner.token_to_kv_pool
        self.req_to_token = runner.req_to_token_pool.req_to_token
        rows = self.req_to_token.shape[0]
        tok = _tokenizer(runner)
        self.token_class = token_classes(cfg, runner.model_config.vocab_size, token_texts(tok) if tok else None,
                                         self.device)
        self.spans = None
        if cfg.span_tokens and tok is not None:
            self.spans = Spans(self.token_class & RUN_START != 0,
                               self.token_to_kv_pool.get_key_buffer(self.shape.layer_ids[0]).shape[0], cfg.span_tokens)
        self.stats = SFIStats(self.device, export=bool(getattr(runner.server_args, "enable_metrics", False)))
        self.reuse = SelectionReuse(cfg.reuse_records) if cfg.reuse_records > 0 else None
        self.refresher = Refresher(cfg, self.shape, self.kernels, self.token_to_kv_pool.get_key_buffer,
                                   self.req_to_token, self.device, self.stats, self.reuse, rows, self.spans)
        self.store = self.refresher.store
        self._alloc_rows(rows)
        self.mixed_seen = False  # logged once: the first mixed prefill/decode batch
        logger.info(
            "SFI backend: dense=%s, %d sparse layers%s, %d/%d q/kv heads, %d boundary ids, %d rows, GPU state "
            "%.1f MiB (selections, saved queries, kept slow-step logits, up to %d records, the Selector's "
            "temporaries; taken from the KV-cache budget), config %s",
            type(dense).__name__, self.shape.num_layers,
            f" (+{len(self.shape.windows)} sliding-window layers, dense over their window)" if self.shape.windows else "",
            self.shape.q_heads, self.shape.kv_heads,
            int((self.token_class & BOUNDARY != 0).sum()), rows,
            static_bytes(cfg, self.shape, rows, self.refresher.dtype, self.req_to_token.shape[1]) / 2**20,
            cfg.reuse_records, cfg.to_dict(),
        )
        if self.device.type == "cuda":  # the CPU path runs torch references: nothing to compile
            self.refresher.warm_up()

    def _alloc_rows(self, rows: int) -> None:
        """Static per-batch-row buffers (their addresses are baked into captured graphs)."""
        self.rows = StepRows.zeros(rows, self.device)
        self.all_slow = torch.ones(rows, dtype=torch.bool, device=self.device)  # rows of the dense layers
        # sliding-window layers: every row "fast" over no selection, its tail the window: [hi, n)
        self.no_rows = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self.no_count = torch.zeros(rows, dtype=torch.int32, device=self.device)
        self.window_hi = {w: torch.zeros(rows, dtype=torch.int32, device=self.device)
                          for w in set(self.shape.windows.values())}
        self.refresher.alloc_rows(rows)

    # ---- metadata ---------------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch) -> None:
        if forward_batch.forward_mode.is_decode():
            self.init_forward_metadata_out_graph(forward_batch)
            return
        self.refresher.refresh_slow_rows()
        if forward_batch.forward_mode.is_mixed() and not self.mixed_seen:
            self.mixed_seen = True
            logger.info("SFI: a prefill chunk shares a batch with running decodes (--enable-mixed-chunk): "
                        "those attend densely in it and rebuild their selection, as at a prefill")
        self.dense.init_forward_metadata(forward_batch)
        if self.spans is not None:
            self.spans.write(forward_batch.input_ids, forward_batch.out_cache_loc)
        if forward_batch.forward_mode.is_extend():
            self.refresher.plan_prefill(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """Decode metadata; also run before every graph replay. Device work, and at most a wait for the
        previous step's slow-mask copy (``Refresher.refresh_slow_rows``)."""
        self.refresher.refresh_slow_rows()
        fb, cfg, st = forward_batch, self.cfg, self.store
        bs = fb.batch_size
        real = bs - (getattr(fb, "num_padding", 0) or 0)
        if self.spans is not None:
            self.spans.write(fb.input_ids, fb.out_cache_loc)
        self.kernels.plan_step(fb.input_ids, fb.req_pool_indices, fb.seq_lens, real, bs, self.token_class, st.ready,
                               st.steps, st.run, st.hi, st.count, self.rows, self.stats.acc, sinks=cfg.sinks,
                               recent=cfg.recent, topk=cfg.topk, max_fast=cfg.max_fast_steps,
                               min_gap=cfg.min_refresh_gap, logit_rows=cfg.slow_logit_rows)
        self._plan_windows(fb.seq_lens, bs)
        self.stats.decode_steps += 1
        if not in_capture and real > 0:
            host_lens = fb.seq_lens_cpu[:real] if fb.seq_lens_cpu is not None else fb.seq_lens[:real].cpu()
            self.refresher.note_step(self.rows, real, host_lens)
            self.stats.publish()  # to Prometheus, from a completed copy: no sync
        if cfg.log_interval and self.stats.decode_steps % cfg.log_interval == 0:
            reuse = self.reuse
            self.stats.log(reuse.summary() if reuse else "", reuse.metrics() if reuse else None)

    def _plan_windows(self, seq_lens: torch.Tensor, bs: int) -> None:
        """Where each row's window starts, per window size of the sliding-window layers."""
        for w, hi in self.window_hi.items():
            hi[:bs].copy_(window_start(seq_lens[:bs], w))

    # ---- forward ----------------------------------------------------------------------------

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        li = self.shape.sfi_layer.get(layer.layer_id)
        if li is not None:
            self.refresher.save_prefill_queries(li, q, forward_batch)
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        pool = self.token_to_kv_pool
        if save_kv_cache and k is not None:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale)
        sh, st, rows, ref = self.shape, self.store, self.rows, self.refresher
        bs = forward_batch.batch_size
        li = self.shape.sfi_layer.get(layer.layer_id)
        common = (q.reshape(bs, sh.q_heads, sh.head_dim), pool.get_key_buffer(layer.layer_id),
                  pool.get_value_buffer(layer.layer_id), self.req_to_token, forward_batch.req_pool_indices[:bs],
                  forward_batch.seq_lens[:bs])
        if li is None:  # a sliding-window layer: its window, densely
            out = self.kernels.decode(*common, self.no_rows[:bs], self.window_hi[sh.windows[layer.layer_id]][:bs],
                                      self.no_count[:bs], st.pos[0], 0, sh.sm_scale, sh.logit_cap)
        else:
            slow = (rows.slow if li >= self.cfg.dense_layers else self.all_slow)[:bs]
            out = self.kernels.decode(
                *common, slow, rows.hi[:bs], rows.count[:bs], st.pos[li], self.cfg.sinks, sh.sm_scale, sh.logit_cap,
                ref.slow_logits[li] if self.cfg.slow_logit_rows else None, rows.logit_row[:bs],
                q_out=ref.q_hist[li],  # saved for the Selector (the refresh after a slow row)
            )
        return out.reshape(-1, sh.q_heads * sh.v_head_dim)

    def coverage_summary(self, slot: int) -> dict[str, float] | None:
        """Coverage of the request in req-pool ``slot`` so far (``Refresher.coverage_summary``)."""
        return self.refresher.coverage_summary(slot)

    # ---- plumbing ---------------------------------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Decode needs no per-graph state beyond the per-row buffers, sized here if graphs run larger batches."""
        if max_bs > self.rows.slow.shape[0]:
            self._alloc_rows(max_bs)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def support_triton(self):
        return self.dense.support_triton()


def window_start(seq_lens: torch.Tensor, window: int) -> torch.Tensor:
    """First position a decode query sees in a sliding-window layer: the query (position ``n - 1``)
    attends to ``[n - 1 - window, n - 1]``, sglang's ``sliding_window_size`` convention."""
    return (seq_lens - (window + 1)).clamp_(min=0)


def _tokenizer(runner):
    """The model's tokenizer (the token classes); None, with a warning, if it cannot be loaded."""
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    sa = runner.server_args
    try:
        return get_tokenizer(
            sa.tokenizer_path or sa.model_path, tokenizer_mode=sa.tokenizer_mode,
            trust_remote_code=sa.trust_remote_code, tokenizer_revision=getattr(sa, "revision", None),
        )
    except Exception as e:  # noqa: BLE001 - any tokenizer failure means: no token classes from it
        logger.warning("SFI: could not load the tokenizer (%s); slow steps follow max_fast_steps and "
                       "SFI_CONFIG boundary_ids only, and selections are not span-complete", e)
        return None


def create_sfi_backend(runner) -> SFIBackend:
    """Factory registered as attention backend ``sfi``."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    cfg = SFIConfig.from_env()
    dense_name = cfg.resolve_dense_backend(torch.device(runner.device).type)
    dense = ATTENTION_BACKENDS[dense_name](runner)
    return SFIBackend(runner, dense, cfg)
