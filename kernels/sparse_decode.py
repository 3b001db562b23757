"""Decode attention over per-(request, KV head) index lists into the KV pool.

Virtual request ``v = b * Hkv + h`` holds the G query heads of KV head ``h`` of
request ``b`` and attends to ``k_flat[kv_indices[kv_indptr[v]:kv_indptr[v+1]]]``,
where ``k_flat`` is the pool viewed as ``[slots * Hkv, D]``.

``sparse_decode_ref`` is the torch reference (CPU, tests). On CUDA,
``FlashInferSparseDecode`` runs FlashInfer's paged decode with page size 1 over the
same lists (one KV head per virtual request).
"""

from __future__ import annotations

import torch


def sparse_decode_ref(
    q: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """q ``[B, Hq, D]``, k_flat ``[M, D]``, v_flat ``[M, Dv]`` -> ``[B, Hq, Dv]`` in q's dtype."""
    bsz, hq, d = q.shape
    nv = kv_indptr.numel() - 1
    g = hq * bsz // nv
    qv = q.float().reshape(nv, g, d)
    counts = (kv_indptr[1:] - kv_indptr[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(nv, device=q.device), counts, output_size=kv_indices.numel())
    idx = kv_indices.long()
    logits = torch.einsum("tgd,td->tg", qv[seg], k_flat[idx].float()) * sm_scale
    if logit_cap > 0:
        logits = logit_cap * torch.tanh(logits / logit_cap)
    mx = torch.full((nv, g), float("-inf"), device=q.device)
    mx.scatter_reduce_(0, seg.unsqueeze(1).expand(-1, g), logits, "amax")
    p = torch.exp(logits - mx[seg])
    den = torch.zeros(nv, g, device=q.device).index_add_(0, seg, p)
    out = torch.zeros(nv, g, v_flat.shape[-1], device=q.device)
    out.index_add_(0, seg, p.unsqueeze(-1) * v_flat[idx].float().unsqueeze(1))
    out = out / den.clamp_min(1e-30).unsqueeze(-1)
    return out.reshape(bsz, hq, -1).to(q.dtype)


class FlashInferSparseDecode:
    """FlashInfer paged decode (page size 1) over the same index lists; planned once per step.

    All layers share ``kv_indptr`` (the list lengths do not depend on the layer), so
    the step is planned once and each layer only swaps in its ``kv_indices``.
    """

    def __init__(self, workspace: torch.Tensor, group: int, head_dim: int, dtype: torch.dtype,
                 sm_scale: float, logit_cap: float = 0.0):
        import flashinfer

        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        self.group, self.head_dim, self.dtype = group, head_dim, dtype
        self.sm_scale, self.logit_cap = sm_scale, logit_cap

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor) -> None:
        last_page_len = torch.ones(kv_indptr.numel() - 1, dtype=torch.int32, device=kv_indptr.device)
        self.wrapper.plan(
            kv_indptr, kv_indices, last_page_len, self.group, 1, self.head_dim, 1,
            q_data_type=self.dtype, kv_data_type=self.dtype,
            sm_scale=self.sm_scale, logits_soft_cap=self.logit_cap or None,
        )

    def run(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
        """q ``[B*Hkv, G, D]``; k/v pages ``[M, 1, 1, D]``. ``kv_indices`` must have the planned length."""
        # plan() keeps a reference to its indices and run() reads them from this
        # attribute; each layer has its own selection, so point it at this layer's.
        self.wrapper._paged_kv_indices_buf = kv_indices
        return self.wrapper.run(q, (k_pages, v_pages))
