"""Selector input: attention logits of a few queries over a request's candidate tokens.

For refresh row ``i`` (req-pool slot ``slots[i]``), KV head ``h`` and candidate
``j`` in ``[0, hi[i] - lo[i])``: the logits of the ``W * G`` queries of that KV
head's group (``W`` query tokens, ``G`` query heads per KV head) against the key at
position ``lo[i] + j``, read straight from the KV pool through ``req_to_token``
(no gathered copy of the keys). Entries past a row's region are ``-inf``.
Optionally also the log key norms (the Selector's prior needs them).

``candidate_logits_ref`` is the torch reference; ``candidate_logits`` the Triton kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64


def candidate_logits_ref(q, k_buf, req_to_token, slots, lo, hi, width: int, sm_scale: float,
                         logit_cap: float = 0.0, norms: bool = False):
    """q ``[S, W, Hq, D]``; k_buf ``[P, Hkv, D]`` -> logits ``[S, Hkv, W*G, width]`` (fp32) and,
    if ``norms``, log key norms ``[S, Hkv, width]`` (else None)."""
    s_rows, w, hq, d = q.shape
    hkv = k_buf.shape[1]
    g = hq // hkv
    logits = torch.full((s_rows, hkv, w * g, width), float("-inf"), device=q.device)
    log_norm = torch.zeros(s_rows, hkv, width, device=q.device) if norms else None
    for i in range(s_rows):
        a, b = int(lo[i]), int(hi[i])
        keys = k_buf[req_to_token[int(slots[i]), a:b].long()].float()  # [n, Hkv, D]
        qg = q[i].float().view(w, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, w * g, d)
        x = torch.einsum("hrd,nhd->hrn", qg, keys) * sm_scale
        if logit_cap > 0:
            x = logit_cap * torch.tanh(x / logit_cap)
        logits[i, :, :, : b - a] = x
        if norms:
            log_norm[i, :, : b - a] = keys.norm(dim=-1).clamp_min(1e-6).log().T
    return logits, log_norm


@triton.jit
def _candidate_logits(
    Q, K, ReqToToken, Slots, Lo, Hi, Out, LogNorm, sm_scale, logit_cap,
    stride_qs, stride_qw, stride_qh, stride_kt, stride_kh, stride_r,
    stride_os, stride_oh, stride_or, stride_ns, stride_nh,
    G: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, CAP: tl.constexpr, NORMS: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    blk = tl.program_id(2)
    slot = tl.load(Slots + i).to(tl.int64)
    lo = tl.load(Lo + i)
    n = tl.load(Hi + i) - lo
    j = blk * BLOCK + tl.arange(0, BLOCK)
    valid = j < n
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_mask = offs_r < R
    dmask = offs_d < D
    qoff = (offs_r // G) * stride_qw + (h * G + offs_r % G) * stride_qh
    q = tl.load(Q + i * stride_qs + qoff[:, None] + offs_d[None, :], mask=r_mask[:, None] & dmask[None, :], other=0.0)
    tok = tl.load(ReqToToken + slot * stride_r + lo + j, mask=valid, other=0).to(tl.int64)
    k = tl.load(K + tok[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                mask=valid[:, None] & dmask[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k)) * sm_scale
    if CAP:
        s = logit_cap * (2.0 * tl.sigmoid(2.0 * s / logit_cap) - 1.0)
    s = tl.where(valid[None, :], s, float("-inf"))
    tl.store(Out + i * stride_os + h * stride_oh + offs_r[:, None] * stride_or + j[None, :], s, mask=r_mask[:, None])
    if NORMS:
        kf = k.to(tl.float32)
        ln = 0.5 * tl.log(tl.maximum(tl.sum(kf * kf, 1), 1e-12))
        tl.store(LogNorm + i * stride_ns + h * stride_nh + j, tl.where(valid, ln, 0.0))


def candidate_logits(q, k_buf, req_to_token, slots, lo, hi, width: int, sm_scale: float,
                     logit_cap: float = 0.0, norms: bool = False):
    """Triton version of :func:`candidate_logits_ref` (same arguments and results)."""
    s_rows, w, hq, d = q.shape
    hkv = k_buf.shape[1]
    g = hq // hkv
    blocks = triton.cdiv(width, BLOCK_N)
    out = torch.empty(s_rows, hkv, w * g, blocks * BLOCK_N, dtype=torch.float32, device=q.device)
    log_norm = torch.empty(s_rows, hkv, blocks * BLOCK_N, dtype=torch.float32, device=q.device) if norms else out
    _candidate_logits[(s_rows, hkv, blocks)](
        q, k_buf, req_to_token, slots, lo, hi, out, log_norm, sm_scale, logit_cap if logit_cap > 0 else 1.0,
        q.stride(0), q.stride(1), q.stride(2), k_buf.stride(0), k_buf.stride(1), req_to_token.stride(0),
        out.stride(0), out.stride(1), out.stride(2), log_norm.stride(0), log_norm.stride(1),
        G=g, R=w * g, BLOCK_R=max(16, triton.next_power_of_2(w * g)), BLOCK=BLOCK_N,
        D=d, BLOCK_D=triton.next_power_of_2(d), CAP=logit_cap > 0, NORMS=norms,
        num_warps=4,
    )
    return out[..., :width], (log_norm[..., :width] if norms else None)
