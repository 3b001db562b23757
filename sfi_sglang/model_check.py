"""What SFI can serve: read the model's attention layers once and refuse what it cannot.

Sliding-window hybrids (Gemma 3) are served: sfi makes the full-attention layers sparse, and the
window layers attend densely over their window (their decode cost does not grow with the context)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


class SFIUnsupportedError(ValueError):
    """The model or server setup cannot be served by the sfi backend."""


@dataclass(frozen=True)
class AttentionShape:
    """Attention shapes (per TP rank). sfi serves the ``num_layers`` full-attention layers, model layer ids
    ``layer_ids`` (default ``0 .. num_layers - 1``); ``windows`` maps each sliding-window layer's id to its
    window ``w`` (sglang's ``sliding_window_size``: a query at position ``p`` attends to ``[p - w, p]``)."""

    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    sm_scale: float
    logit_cap: float
    layer_ids: tuple[int, ...] = ()
    windows: dict[int, int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.layer_ids:
            object.__setattr__(self, "layer_ids", tuple(range(self.num_layers)))

    @cached_property
    def sfi_layer(self) -> dict[int, int]:
        """Model layer id -> its index among the layers sfi serves (window layers are absent)."""
        return {layer_id: i for i, layer_id in enumerate(self.layer_ids)}


def attention_shape(runner) -> AttentionShape:
    """Shapes shared by all attention layers of ``runner.model`` (per TP rank), or a clear error."""
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

    if getattr(runner, "use_mla_backend", False):
        raise SFIUnsupportedError("sfi does not support MLA models (e.g. DeepSeek); use a dense backend")
    if runner.model_config.is_encoder_decoder:
        raise SFIUnsupportedError("sfi does not support encoder-decoder models")
    layers = [m for m in runner.model.modules() if isinstance(m, RadixAttention)]
    if not layers:
        raise SFIUnsupportedError("sfi found no attention layers in the model")
    if getattr(runner.model_config, "is_hybrid_swa", False):
        raise SFIUnsupportedError("sfi does not support sglang's hybrid SWA KV pool (a separate cache for the "
                                  "sliding-window layers); launch with --disable-hybrid-swa-memory")
    windows = {m.layer_id: m.sliding_window_size for m in layers
               if m.sliding_window_size is not None and m.sliding_window_size > 0}
    full = [m for m in layers if m.layer_id not in windows]
    if not full:
        raise SFIUnsupportedError("every attention layer of this model is sliding-window: sfi has no full-attention "
                                  "layer to make sparse; use a dense backend")
    for m in layers:
        if m.is_cross_attention or m.attn_type != AttentionType.DECODER:
            raise SFIUnsupportedError(f"sfi supports causal decoder self-attention only (layer {m.layer_id})")
        # attention variants sfi's decode kernel does not implement (it would attend plainly instead)
        variant = ("chunked local attention (iRoPE)" if m.use_irope else
                   f"in-kernel position encoding {m.pos_encoding_mode}" if m.pos_encoding_mode not in (None, "NONE") else
                   f"logit capping '{m.logit_capping_method}'" if m.logit_cap and m.logit_capping_method != "tanh" else
                   "position-dependent attention temperature" if m.xai_temperature_len > 0 else None)
        if variant:
            raise SFIUnsupportedError(f"sfi does not support {variant} (layer {m.layer_id})")
    if sorted(m.layer_id for m in layers) != list(range(len(layers))):
        raise SFIUnsupportedError("sfi needs every layer to be an attention layer, numbered from 0 (hybrid models "
                                  "such as Qwen3-Next mix in linear-attention layers)")
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in runner.model.modules()):
        raise SFIUnsupportedError("sfi does not support learned attention sinks (e.g. gpt-oss)")
    first = full[0]
    for m in layers:
        same = (m.tp_q_head_num, m.tp_k_head_num, m.head_dim, m.v_head_dim, m.scaling, m.logit_cap) == (
            first.tp_q_head_num, first.tp_k_head_num, first.head_dim, first.v_head_dim, first.scaling, first.logit_cap
        )
        if not same:
            raise SFIUnsupportedError(f"sfi needs the same attention shape in every layer (layer {m.layer_id} differs)")
    if first.tp_q_head_num % first.tp_k_head_num:
        raise SFIUnsupportedError("sfi needs query heads to be a multiple of KV heads")
    return AttentionShape(
        num_layers=len(full),
        q_heads=first.tp_q_head_num,
        kv_heads=first.tp_k_head_num,
        head_dim=first.head_dim,
        v_head_dim=first.v_head_dim,
        sm_scale=first.scaling,
        logit_cap=float(first.logit_cap or 0.0),
        layer_ids=tuple(sorted(m.layer_id for m in full)),
        windows=windows,
    )
