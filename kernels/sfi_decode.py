"""SFI decode attention: each (request row, KV head) attends to its own token list,
derived on the device from the selection state, in one launch for slow and fast rows.

Row ``b`` (req-pool slot ``s``, ``n`` tokens) attends, for KV head ``h``, to
- slow rows: positions ``[0, n)`` (dense);
- fast rows: ``[0, lo) + pos[s, h, :cnt] + [hi, n)`` with ``hi = hi_s[b]``,
  ``cnt = cnt_s[b]`` (the row's selection state, given per batch row: read through the
  slot it would cost one more dependent load), ``lo = min(sinks, hi)``: sinks, the
  Selector's positions (ascending) and the live tail.
Positions map to KV-pool rows through ``req_to_token[s]``. Slow rows given a row ``r`` of
``logits`` (``logit_row[b] >= 0``) also leave there their attention logits (scaled and capped,
fp16) over the whole context, ``logits[r, h, :n, :]`` (token-major: the KV head's query group
contiguous): the Selector ranks tokens from them, through a transposed view, after the step instead
of reading the keys again (``Refresher.select``). Token-major because the [group, tokens] layout
of the tile would cost every row of the kernel registers and occupancy, storing or not
(benchmarks/RESULTS.md, "Kernels").

Why not FlashInfer over materialised index lists: its decode plan needs every
list length on the host, and in a CUDA-graph replay sglang gives the backend
no host-side request ids, so the lengths (which depend on per-request
selection state) could only be had with a host sync per step. Here lengths are
read on the device, the grid is static (graph-safe), no per-layer index list
is written, and slow and fast rows share one launch. Kernel against kernel over the
same lists (``benchmarks/bench_kernels.py``), this one is faster at small batches and
FlashInfer somewhat faster at batch 16-32 with 2048+ kept tokens, before the host sync and
per-step list rebuild it would need (benchmarks/RESULTS.md, "Kernels").

Given ``q_out``, the kernel also saves each row's query there (the first split program of each
(row, KV head) stores the tile it loaded): the Selector scores a slow row's candidates with it at
the next step, and a separate copy was one more launch per layer inside the decode graph.

``sfi_decode_ref`` is the torch reference (CPU runs and tests); ``sfi_decode``
runs the Triton kernels (split-KV pass + merge).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl


FP16_MAX = tl.constexpr(torch.finfo(torch.float16).max)  # kept logits are clamped to it (never inf)


@dataclass(frozen=True)
class Launch:
    """Tile and split shape of one ``sfi_decode`` call: ``block`` tokens per loop step, at least
    ``min_chunk`` tokens per split (short lists spread over fewer, longer programs as it grows),
    ``min_chunk_slow`` for slow rows (0: ``min_chunk``)."""

    block: int = 64
    min_chunk: int = 64
    num_warps: int = 4
    num_stages: int = 2
    min_chunk_slow: int = 0


def launch_for(batch: int, head_dim: int = 128) -> Launch:
    """Launch shape for a batch of ``batch`` rows, tuned with ``benchmarks/tune_sfi_decode.py`` (head
    dim 128): 128-token steps, and longer splits as the batch alone fills the GPU; at batch 1 slow rows
    split into chunks of >= 512 tokens with a 3-stage loop (a long dense row is most of such a step).
    Heads wider than 128 (Gemma 3: 256) step 64 tokens in a 2-stage loop, so that the K and V tiles
    fit in shared memory."""
    if batch == 1:
        launch = Launch(block=128, min_chunk=128, min_chunk_slow=512, num_stages=3)
    else:
        launch = Launch(block=128, min_chunk=128 if batch < 4 else 256 if batch < 16 else 512)
    return launch if head_dim <= 128 else replace(launch, block=64, num_stages=2)


def token_positions(slow: bool, n: int, hi: int, cnt: int, sinks: int, pos_row: torch.Tensor) -> torch.Tensor:
    """Positions one (row, KV head) attends to, in order (host-side reference)."""
    dev = pos_row.device
    if slow:
        return torch.arange(n, device=dev)
    lo = min(sinks, hi)
    return torch.cat([torch.arange(lo, device=dev), pos_row[:cnt].long(), torch.arange(hi, n, device=dev)])


def sfi_decode_ref(q, k_buf, v_buf, req_to_token, slots, seq_lens, slow, hi_s, cnt_s, pos, sinks: int,
                   sm_scale: float, logit_cap: float = 0.0, logits: torch.Tensor | None = None,
                   logit_row: torch.Tensor | None = None, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[B, Hq, D]``; k/v_buf ``[P, Hkv, D]``; pos ``[R, Hkv, K]`` (one layer) -> ``[B, Hq, Dv]``;
    optionally the slow rows' logits into ``logits [rows, Hkv, >= n, G]`` at ``logit_row [B]`` (-1: not kept)
    and the queries into ``q_out [>= B, Hq, D]``."""
    bsz, hq, _ = q.shape
    if q_out is not None:
        q_out[:bsz].copy_(q)
    hkv = k_buf.shape[1]
    g = hq // hkv
    out = torch.empty(bsz, hq, v_buf.shape[-1], dtype=q.dtype, device=q.device)
    for b in range(bsz):
        s, n = int(slots[b]), int(seq_lens[b])
        for h in range(hkv):
            p = token_positions(bool(slow[b]), n, int(hi_s[b]), int(cnt_s[b]), sinks, pos[s, h])
            tok = req_to_token[s, p.to(req_to_token.device)].long()
            x = q[b, h * g:(h + 1) * g].float() @ k_buf[tok, h].float().T * sm_scale
            if logit_cap > 0:
                x = logit_cap * torch.tanh(x / logit_cap)
            if logits is not None and slow[b] and logit_row[b] >= 0:
                logits[int(logit_row[b]), h, :n] = x.T.clamp(-FP16_MAX.value, FP16_MAX.value)
            out[b, h * g:(h + 1) * g] = (x.softmax(-1) @ v_buf[tok, h].float()).to(q.dtype)
    return out


@triton.jit
def _row_span(Slots, SeqLens, Slow, HiS, CntS, b, SINKS: tl.constexpr, MAX_SPLITS: tl.constexpr,
              MIN_CHUNK_: tl.constexpr, MIN_CHUNK_SLOW: tl.constexpr, BLOCK: tl.constexpr):
    """Slot, length, list layout and split size of row ``b``."""
    slot = tl.load(Slots + b).to(tl.int64)
    n = tl.load(SeqLens + b).to(tl.int32)
    is_slow = tl.load(Slow + b) != 0
    hi = tl.load(HiS + b)
    cnt = tl.load(CntS + b)
    lo = tl.minimum(hi, SINKS)
    length = tl.where(is_slow, n, lo + cnt + n - hi)
    wanted = tl.where(is_slow, (length + MIN_CHUNK_SLOW - 1) // MIN_CHUNK_SLOW, (length + MIN_CHUNK_ - 1) // MIN_CHUNK_)
    splits = tl.minimum(tl.maximum(wanted, 1), MAX_SPLITS)
    chunk = ((length + splits - 1) // splits + BLOCK - 1) // BLOCK * BLOCK
    return slot, n, is_slow, lo, hi, cnt, length, splits, chunk


@triton.jit
def _sfi_decode_split(
    Q, K, V, ReqToToken, Slots, SeqLens, Slow, HiS, CntS, Pos, MidO, MidLse, Logits, LogitRow, QOut,
    sm_scale, logit_cap,
    stride_qb, stride_qh, stride_sqb, stride_sqh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_r, stride_ps, stride_ph, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_xr, stride_xh,
    G: tl.constexpr, SINKS: tl.constexpr, MAX_SPLITS: tl.constexpr, MIN_CHUNK_: tl.constexpr,
    MIN_CHUNK_SLOW: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAP: tl.constexpr, KEEP_LOGITS: tl.constexpr,
    SAVE_Q: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    slot, n, is_slow, lo, hi, cnt, length, splits, chunk = _row_span(
        Slots, SeqLens, Slow, HiS, CntS, b, SINKS, MAX_SPLITS, MIN_CHUNK_, MIN_CHUNK_SLOW, BLOCK)
    if split >= splits:
        return
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    heads = h * G + offs_g
    g_mask = offs_g < G
    q_mask = g_mask[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    if SAVE_Q:
        tl.store(QOut + b * stride_sqb + heads[:, None] * stride_sqh + offs_d[None, :], q.to(QOut.dtype.element_ty),
                 mask=q_mask & (split == 0))
    if KEEP_LOGITS:
        x_row = tl.load(LogitRow + b)
        keep = is_slow & (x_row >= 0)
        x_base = Logits + tl.maximum(x_row, 0).to(tl.int64) * stride_xr + h * stride_xh + offs_g[:, None]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for j0 in range(start, end, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        valid = j < end
        in_sel = (j >= lo) & (j < lo + cnt) & (is_slow == 0)
        p_sel = tl.load(Pos + slot * stride_ps + h * stride_ph + (j - lo), mask=valid & in_sel, other=0)
        p = tl.where(is_slow | (j < lo), j, tl.where(in_sel, p_sel, hi + j - lo - cnt))
        p = tl.minimum(tl.maximum(p, 0), n - 1)
        tok = tl.load(ReqToToken + slot * stride_r + p, mask=valid, other=0).to(tl.int64)
        k = tl.load(K + tok[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                    mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        if CAP:
            s = logit_cap * (2.0 * tl.sigmoid(2.0 * s / logit_cap) - 1.0)
        if KEEP_LOGITS:  # slow rows: position j is token j
            tl.store(x_base + j[None, :] * G, tl.minimum(tl.maximum(s, -FP16_MAX), FP16_MAX).to(tl.float16),
                     mask=keep & g_mask[:, None] & valid[None, :])
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(s - m_new[:, None])
        v = tl.load(V + tok[:, None] * stride_vt + h * stride_vh + offs_dv[None, :],
                    mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(e.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(e, 1)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    base = b * stride_mb + heads * stride_mh + split * stride_ms
    tl.store(MidO + base[:, None] + offs_dv[None, :], out, mask=g_mask[:, None] & (offs_dv[None, :] < DV))
    tl.store(MidLse + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _sfi_decode_merge(
    MidO, MidLse, Out, Slots, SeqLens, Slow, HiS, CntS,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
    SINKS: tl.constexpr, MAX_SPLITS: tl.constexpr, MIN_CHUNK_: tl.constexpr, MIN_CHUNK_SLOW: tl.constexpr,
    BLOCK: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    _, _, _, _, _, _, _, splits, _ = _row_span(
        Slots, SeqLens, Slow, HiS, CntS, b, SINKS, MAX_SPLITS, MIN_CHUNK_, MIN_CHUNK_SLOW, BLOCK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dmask = offs_dv < DV
    m = float("-inf")
    den = 0.0
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s in range(0, splits):
        lse = tl.load(MidLse + b * stride_lb + head * stride_lh + s)
        o = tl.load(MidO + b * stride_mb + head * stride_mh + s * stride_ms + offs_dv, mask=dmask, other=0.0)
        m_new = tl.maximum(m, lse)
        scale = tl.exp(m - m_new)
        w = tl.exp(lse - m_new)
        acc = acc * scale + w * o
        den = den * scale + w
        m = m_new
    tl.store(Out + b * stride_ob + head * stride_oh + offs_dv, (acc / den).to(Out.dtype.element_ty), mask=dmask)


def max_splits_for(batch: int) -> int:
    """Split budget per list: enough for one long slow row to fill the GPU, bounded scratch."""
    return max(8, min(64, 4096 // max(batch, 1)))


def sfi_decode(q, k_buf, v_buf, req_to_token, slots, seq_lens, slow, hi_s, cnt_s, pos, sinks: int,
               sm_scale: float, logit_cap: float = 0.0, logits: torch.Tensor | None = None,
               logit_row: torch.Tensor | None = None, q_out: torch.Tensor | None = None,
               launch: Launch | None = None) -> torch.Tensor:
    """Triton version of :func:`sfi_decode_ref` (same arguments; ``launch`` defaults to
    :func:`launch_for` the batch); CUDA-graph safe."""
    bsz, hq, d = q.shape
    hkv, dv = k_buf.shape[1], v_buf.shape[-1]
    g = hq // hkv
    launch = launch or launch_for(bsz, d)
    splits = max_splits_for(bsz)
    block_dv = triton.next_power_of_2(dv)
    mid_o = torch.empty(bsz, hq, splits, block_dv, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(bsz, hq, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(bsz, hq, dv, dtype=q.dtype, device=q.device)
    common = dict(SINKS=sinks, MAX_SPLITS=splits, MIN_CHUNK_=launch.min_chunk,
                  MIN_CHUNK_SLOW=launch.min_chunk_slow or launch.min_chunk, BLOCK=launch.block)
    keep = logits is not None and logits.numel() > 0
    assert not keep or (logits.shape[-1] == g and logits.stride(-1) == 1 and logits.stride(-2) == g)
    x = logits if keep else mid_o
    assert q_out is None or (q_out.shape[0] >= bsz and q_out.shape[1:] == q.shape[1:] and q_out.stride(-1) == 1)
    q_save = q_out if q_out is not None else q
    _sfi_decode_split[(bsz, hkv, splits)](
        q, k_buf, v_buf, req_to_token, slots, seq_lens, slow, hi_s, cnt_s, pos, mid_o, mid_lse, x,
        logit_row if keep else slots, q_save, sm_scale, logit_cap if logit_cap > 0 else 1.0,
        q.stride(0), q.stride(1), q_save.stride(0), q_save.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0), pos.stride(0), pos.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        x.stride(0), x.stride(1),
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, DV=dv,
        BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=block_dv, CAP=logit_cap > 0, KEEP_LOGITS=keep,
        SAVE_Q=q_out is not None, num_warps=launch.num_warps, num_stages=launch.num_stages, **common,
    )
    _sfi_decode_merge[(bsz, hq)](
        mid_o, mid_lse, out, slots, seq_lens, slow, hi_s, cnt_s,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        DV=dv, BLOCK_DV=block_dv, **common,
    )
    return out
