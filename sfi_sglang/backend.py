"""The ``sfi`` attention backend: dense prefill through a wrapped SGLang backend,
slow/fast decode through per-(request, KV head) index lists.

Per decode step (``init_forward_metadata``): the policy marks slow rows, the index
builder lays out every row's lists (slow: whole context, fast: sinks + selected +
live tail) and the state advances. Per layer (``forward_decode``): write this
step's K/V, attend over the lists, and let the Selector refresh the slow rows'
selections from their dense attention. Per prefill (``forward_extend``): the wrapped
backend does the work, then the Selector builds the first selection from the last
prompt queries so that decoding starts on fast steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sfi_sglang.config import SFIConfig
from sfi_sglang.indices import DecodeLayout, build_layout, layer_indices
from sfi_sglang.memory import SelectionStore
from sfi_sglang.metrics import SFIStats
from sfi_sglang.model_check import AttentionShape, attention_shape
from sfi_sglang.policy import boundary_ids_from_tokenizer, boundary_table, slow_rows
from sfi_sglang.selector import group_scores, topk_positions
from sfi_sglang.kernels.sparse_decode import FlashInferSparseDecode, sparse_decode_ref

logger = logging.getLogger("sfi_sglang")


@dataclass
class _Refresh:
    """One request whose selection is rebuilt in this forward pass (host-side ints)."""

    slot: int
    q_rows: slice  # rows of this forward's q that score the candidates
    lo: int
    hi: int


class SFIBackend(AttentionBackend):
    def __init__(self, runner, dense: AttentionBackend, cfg: SFIConfig):
        super().__init__()
        self.cfg = cfg
        self.dense = dense
        self.device = torch.device(runner.device)
        self.token_to_kv_pool = runner.token_to_kv_pool
        self.req_to_token_pool = runner.req_to_token_pool
        self.req_to_token = runner.req_to_token_pool.req_to_token
        self.shape: AttentionShape = attention_shape(runner)
        self.start_layer = getattr(self.token_to_kv_pool, "start_layer", 0) or 0
        self.store = SelectionStore(
            cfg, self.shape.num_layers, self.req_to_token.shape[0], self.shape.kv_heads, self.device
        )
        vocab = runner.model_config.vocab_size
        self.is_boundary = boundary_table(cfg, vocab, _derived_boundary_ids(runner, cfg), self.device)
        self.stats = SFIStats(self.device, export=bool(getattr(runner.server_args, "enable_metrics", False)))
        self.sparse = None
        if self.device.type == "cuda":
            ws = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=self.device)
            self.sparse = FlashInferSparseDecode(
                ws, self.shape.q_heads // self.shape.kv_heads, self.shape.head_dim,
                self.token_to_kv_pool.get_key_buffer(self.start_layer).dtype,
                self.shape.sm_scale, self.shape.logit_cap,
            )
        self.layout: DecodeLayout | None = None
        self.refreshes: list[_Refresh] = []
        logger.info(
            "SFI backend: dense=%s, %d layers, %d/%d q/kv heads, %d boundary ids, selection state %.1f MiB, config %s",
            type(dense).__name__, self.shape.num_layers, self.shape.q_heads, self.shape.kv_heads,
            int(self.is_boundary.sum()), self.store.nbytes / 2**20, cfg.to_dict(),
        )

    # ---- metadata ---------------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch) -> None:
        mode = forward_batch.forward_mode
        if mode.is_decode():
            self._plan_decode(forward_batch)
            return
        self.dense.init_forward_metadata(forward_batch)
        self.layout = None
        self.refreshes = self._plan_extend(forward_batch) if mode.is_extend() else []

    def _plan_decode(self, fb) -> None:
        slots, seq_lens, st = fb.req_pool_indices, fb.seq_lens, self.store
        slow = slow_rows(fb.input_ids, st.ready[slots], st.steps[slots], self.is_boundary, self.cfg)
        self.layout = build_layout(st, self.req_to_token, slots, seq_lens, slow)
        self.stats.add_decode(slow, self.layout.kept, seq_lens)
        st.advance(slots, seq_lens, slow)
        rows = slow.nonzero().flatten()
        his = st.hi[slots[rows]].tolist()
        self.refreshes = [
            _Refresh(slot, slice(i, i + 1), min(hi, self.cfg.sinks), hi)
            for i, slot, hi in zip(rows.tolist(), slots[rows].tolist(), his)
        ]
        if self.sparse is not None:
            self.sparse.plan(self.layout.kv_indptr, self.layout.base.to(torch.int32))
        if self.cfg.log_interval and self.stats.decode_steps % self.cfg.log_interval == 0:
            self.stats.log()

    def _plan_extend(self, fb) -> list[_Refresh]:
        slots, seq_lens, st = fb.req_pool_indices, fb.seq_lens, self.store
        if self.cfg.prefill_queries == 0:
            st.clear(slots)
            return []
        lo, hi = st.start(slots, seq_lens)
        ext_lens = fb.extend_seq_lens_cpu
        starts = accumulate([0, *ext_lens[:-1]])
        out = []
        for slot, start, n, a, b in zip(slots.tolist(), starts, ext_lens, lo.tolist(), hi.tolist()):
            w = min(self.cfg.prefill_queries, n)
            out.append(_Refresh(slot, slice(start + n - w, start + n), a, b))
        self.stats.add_refreshes(len(out))
        return out

    # ---- forward ----------------------------------------------------------------------------

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        self._refresh(q, layer)
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale)
        sh = self.shape
        kbuf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        vbuf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        idx = layer_indices(self.layout, self.store, self.req_to_token, layer.layer_id - self.start_layer)
        bsz = forward_batch.batch_size
        if self.sparse is not None:
            qv = q.reshape(bsz * sh.kv_heads, sh.q_heads // sh.kv_heads, sh.head_dim)
            out = self.sparse.run(qv, kbuf.view(-1, 1, 1, sh.head_dim), vbuf.view(-1, 1, 1, sh.v_head_dim), idx)
        else:
            out = sparse_decode_ref(
                q.reshape(bsz, sh.q_heads, sh.head_dim), kbuf.view(-1, sh.head_dim), vbuf.view(-1, sh.v_head_dim),
                self.layout.kv_indptr, idx, sh.sm_scale, sh.logit_cap,
            )
        self._refresh(q, layer)
        return out.reshape(-1, sh.q_heads * sh.v_head_dim)

    def _refresh(self, q: torch.Tensor, layer) -> None:
        """Rebuild this layer's selection of every planned request from its queries' dense attention."""
        if not self.refreshes:
            return
        sh, cfg = self.shape, self.cfg
        kbuf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        pos = self.store.pos[layer.layer_id - self.start_layer]
        q3 = q.reshape(-1, sh.q_heads, sh.head_dim)
        for r in self.refreshes:
            if r.hi <= r.lo:
                continue
            keys = kbuf[self.req_to_token[r.slot, r.lo : r.hi].long()]
            scores = group_scores(
                q3[r.q_rows], keys, sh.sm_scale, cfg.alpha, cfg.prior_lambda_max, sh.logit_cap, cfg.neighbor_window
            )
            sel = topk_positions(scores, cfg.topk, r.lo)
            pos[r.slot, :, : sel.shape[1]] = sel

    # ---- plumbing ---------------------------------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        raise RuntimeError(
            "sfi does not run inside decode CUDA graphs yet; start the server with "
            "--cuda-graph-backend-decode disabled (sfi's plugin sets this by default)"
        )

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value()

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
