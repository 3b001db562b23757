"""Sinks + selected + live tail -> FlashInfer-style ``kv_indptr`` / ``kv_indices``.

Every (request row b, KV head h) is one index list, ``v = b * Hkv + h``, into the
KV pool viewed as ``[slots * Hkv, 1, D]`` (entry ``slot * Hkv + h``), so each KV
head of a request attends to its own tokens with no copy of K/V. A slow row's
lists cover the whole context; a fast row's lists are
``[0, lo) + selected + [hi, seq_len)``. The layout (``kv_indptr`` and everything
except the selected entries) is the same for all layers and is built once per
step; ``layer_indices`` fills in one layer's selected positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sfi_sglang.memory import SelectionStore


@dataclass
class DecodeLayout:
    kv_indptr: torch.Tensor  # [B*Hkv+1] int32
    base: torch.Tensor  # [T] int64 flat KV index of non-selected entries
    is_sel: torch.Tensor  # [T] bool entry comes from the selection
    sel_src: torch.Tensor  # [T] int64 flat index into SelectionStore.pos[layer]
    sel_row: torch.Tensor  # [T] int64 req_to_token row of the entry
    sel_head: torch.Tensor  # [T] int64 KV head of the entry
    kept: torch.Tensor  # [B] int64 tokens attended per KV head


def build_layout(
    store: SelectionStore,
    req_to_token: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    slow: torch.Tensor,
) -> DecodeLayout:
    """Torch reference of the index builder (one host sync for the total length)."""
    hkv, k = store.kv_heads, store.cfg.topk
    dev = seq_lens.device
    slots = slots.long()
    n = seq_lens.long()
    hi = store.hi[slots].long()
    cnt = store.count[slots].long()
    lo = hi.clamp(max=store.cfg.sinks)
    kept = torch.where(slow, n, lo + cnt + (n - hi))

    per_list = kept.repeat_interleave(hkv)
    kv_indptr = torch.zeros(per_list.numel() + 1, dtype=torch.int32, device=dev)
    torch.cumsum(per_list, 0, out=kv_indptr[1:])
    total = int(kv_indptr[-1])
    seg = torch.repeat_interleave(torch.arange(per_list.numel(), device=dev), per_list, output_size=total)
    j = torch.arange(total, device=dev) - kv_indptr[:-1].long()[seg]
    b, h = seg // hkv, seg % hkv

    fast = ~slow[b]
    lo_t, cnt_t = lo[b], cnt[b]
    is_sel = fast & (j >= lo_t) & (j < lo_t + cnt_t)
    pos = torch.where(fast & (j >= lo_t + cnt_t), hi[b] + j - lo_t - cnt_t, j)
    row = slots[b]
    base = req_to_token[row, pos.clamp(max=req_to_token.shape[1] - 1)].long() * hkv + h
    sel_src = (row * hkv + h) * k + (j - lo_t).clamp(0, k - 1)
    return DecodeLayout(kv_indptr, base, is_sel, sel_src, row, h, kept)


def layer_indices(layout: DecodeLayout, store: SelectionStore, req_to_token: torch.Tensor, layer: int) -> torch.Tensor:
    """``kv_indices`` (int32) of one layer: the layout with this layer's selected positions."""
    sel_pos = store.pos[layer].view(-1)[layout.sel_src].long()
    sel = req_to_token[layout.sel_row, sel_pos].long() * store.kv_heads + layout.sel_head
    return torch.where(layout.is_sel, sel, layout.base).to(torch.int32)
