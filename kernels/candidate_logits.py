"""Selector input: attention logits of a few queries over a request's candidate tokens, for
several layers in one launch.

For layer ``l`` of the group, refresh row ``i`` (req-pool slot ``slots[i]``), KV head
``h`` and candidate ``j``: the logits of the ``W * G`` queries of that KV head's group
(``W`` query tokens, ``G`` query heads per KV head) against the layer's key at token
position ``positions[l * S + i, h, j]``, read straight from the layer's KV pool through
``req_to_token`` (no gathered copy of the keys). ``positions`` may have one head row
shared by all KV heads (a contiguous region) or one per KV head (a cached selection
plus new tokens); ``-1`` marks a padding candidate, whose logits are ``-inf``.

``candidate_logits_ref`` is the torch reference; ``candidate_logits`` the Triton kernel,
one launch for all layers (the layers' K pools are reached as offsets from the first
one's): a launch per layer cost more host time than the kernels took at 8K-32K contexts.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

BLOCK_N = 64


def candidate_logits_ref(q, k_bufs: Sequence[torch.Tensor], req_to_token, slots, positions, sm_scale: float,
                         logit_cap: float = 0.0) -> torch.Tensor:
    """q ``[L, S, W, Hq, D]`` (the queries of L layers); k_bufs: those layers' K pools ``[P, Hkv, D]``;
    positions ``[L*S, 1 or Hkv, N]`` (int, -1: padding; layer-major) -> logits ``[L*S, Hkv, W*G, N]``
    (fp32)."""
    n_layers, s_rows, w, hq, d = q.shape
    hkv = k_bufs[0].shape[1]
    g = hq // hkv
    pos = positions.expand(n_layers * s_rows, hkv, -1).long()
    valid = pos >= 0
    tok = req_to_token[slots.long().repeat(n_layers).view(-1, 1, 1), pos.clamp_min(0)].long()  # [L*S, Hkv, N]
    heads = torch.arange(hkv, device=q.device).view(1, -1, 1)
    keys = torch.cat([k[tok[x * s_rows:(x + 1) * s_rows], heads] for x, k in enumerate(k_bufs)]).float()
    qg = q.float().reshape(n_layers * s_rows, w, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(-1, hkv, w * g, d)
    x = torch.einsum("shrd,shnd->shrn", qg, keys) * sm_scale
    if logit_cap > 0:
        x = logit_cap * torch.tanh(x / logit_cap)
    return x.masked_fill(~valid.unsqueeze(2), float("-inf"))


@triton.jit(do_not_specialize=["S"])  # one compiled kernel for every row count
def _candidate_logits(
    Q, K, KOffsets, ReqToToken, Slots, Pos, Out, sm_scale, logit_cap, N, S,
    stride_ql, stride_qs, stride_qw, stride_qh, stride_kt, stride_kh, stride_r, stride_ps, stride_ph,
    stride_os, stride_oh, stride_or,
    G: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, CAP: tl.constexpr,
):
    li = tl.program_id(0)  # layer * S + row
    h = tl.program_id(1)
    blk = tl.program_id(2)
    layer = li // S
    slot = tl.load(Slots + li % S).to(tl.int64)
    j = blk * BLOCK + tl.arange(0, BLOCK)
    p = tl.load(Pos + li * stride_ps + h * stride_ph + j, mask=j < N, other=-1)
    valid = p >= 0
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_mask = offs_r < R
    dmask = offs_d < D
    qoff = layer * stride_ql + (li % S) * stride_qs + (offs_r // G) * stride_qw + (h * G + offs_r % G) * stride_qh
    q = tl.load(Q + qoff[:, None] + offs_d[None, :], mask=r_mask[:, None] & dmask[None, :], other=0.0)
    tok = tl.load(ReqToToken + slot * stride_r + p, mask=valid, other=0).to(tl.int64)
    k_off = tl.multiple_of(tl.load(KOffsets + layer), 16)  # keeps the key loads vectorised
    k = tl.load(K + k_off + tok[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                mask=valid[:, None] & dmask[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k)) * sm_scale
    if CAP:
        s = logit_cap * (2.0 * tl.sigmoid(2.0 * s / logit_cap) - 1.0)
    s = tl.where(valid[None, :], s, float("-inf"))
    tl.store(Out + li * stride_os + h * stride_oh + offs_r[:, None] * stride_or + j[None, :], s,
             mask=r_mask[:, None] & (j < N)[None, :])


def candidate_logits(q, k_bufs: Sequence[torch.Tensor], req_to_token, slots, positions, sm_scale: float,
                     logit_cap: float = 0.0) -> torch.Tensor:
    """Triton version of :func:`candidate_logits_ref` (same arguments and result). The K pools must
    share dtype and strides (one KV pool's layers)."""
    n_layers, s_rows, w, hq, d = q.shape
    k0 = k_bufs[0]
    hkv = k0.shape[1]
    g = hq // hkv
    n = positions.shape[-1]
    assert len(k_bufs) == n_layers and all(k.dtype == k0.dtype and k.stride() == k0.stride() for k in k_bufs)
    # each layer's pool as an element offset from the first one's (pinned, asynchronous copy: no sync)
    offsets = [(k.data_ptr() - k0.data_ptr()) // k0.element_size() for k in k_bufs]
    assert all(o % 16 == 0 for o in offsets) or not q.is_cuda, "K pools must be 16-element aligned"
    offsets = torch.tensor(offsets, dtype=torch.int64)
    offsets = offsets.pin_memory().to(q.device, non_blocking=True) if q.is_cuda else offsets
    pos = positions.contiguous().expand(n_layers * s_rows, hkv, n)
    blocks = triton.cdiv(n, BLOCK_N)
    out = torch.empty(n_layers * s_rows, hkv, w * g, n, dtype=torch.float32, device=q.device)
    _candidate_logits[(n_layers * s_rows, hkv, blocks)](
        q, k0, offsets, req_to_token, slots, pos, out, sm_scale, logit_cap if logit_cap > 0 else 1.0, n,
        s_rows, q.stride(0), q.stride(1), q.stride(2), q.stride(3), k0.stride(0), k0.stride(1),
        req_to_token.stride(0), pos.stride(0), pos.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        G=g, R=w * g, BLOCK_R=max(16, triton.next_power_of_2(w * g)), BLOCK=BLOCK_N,
        D=d, BLOCK_D=triton.next_power_of_2(d), CAP=logit_cap > 0,
        num_warps=4,
    )
    return out
