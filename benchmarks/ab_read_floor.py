"""Read floor of a sparse decode on one GPU, same run, inside CUDA graphs: time to only read the same
gathered K and V rows that ``sfi_decode`` reads (the same per-(row, KV head) token lists, from precomputed
KV-pool rows or from positions through ``req_to_token``), against ``sfi_decode`` and a contiguous read
of as many bytes; % of the copy bandwidth measured in the same run. Kernel against kernel: it bounds
what a sparse decode over these lists can reach, it is not a speed against dense.
``python benchmarks/ab_read_floor.py``"""
import os
import sys

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench_decode import copy_bandwidth  # noqa: E402
from bench_kernels import CFG, HKV, SCALE, D, decode_case, kv_bytes, timed  # noqa: E402
from sfi_sglang.kernels.sfi_decode import sfi_decode, token_positions  # noqa: E402


@triton.jit
def _gather_read(K, V, Idx, R2T, Out, L, ctx, CHUNK: tl.constexpr, BLOCK: tl.constexpr, HKV: tl.constexpr,
                 D: tl.constexpr, VIA_POSITIONS: tl.constexpr):
    """Sum of the K and V rows of list ``bh``'s chunk: ``Idx`` holds KV-pool rows, or positions that
    map to them through ``R2T`` (``VIA_POSITIONS``: two dependent loads before K, as in sfi_decode)."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    h = bh % HKV
    acc = tl.zeros([BLOCK, D], tl.float32)
    offs_d = tl.arange(0, D)
    for j0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        tok = tl.load(Idx + bh * L + j, mask=j < L, other=0)
        if VIA_POSITIONS:
            tok = tl.load(R2T + (bh // HKV) * ctx + tok, mask=j < L, other=0)
        row = (tok.to(tl.int64) * HKV + h)[:, None] * D + offs_d[None, :]
        acc += tl.load(K + row, mask=(j < L)[:, None], other=0.0).to(tl.float32)
        acc += tl.load(V + row, mask=(j < L)[:, None], other=0.0).to(tl.float32)
    tl.store(Out + bh * tl.num_programs(1) + c, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _read(X, Out, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(Out + pid, tl.sum(tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32), 0))


def main() -> None:
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    print(torch.cuda.get_device_name(), f"copy {bw/1e12:.2f} TB/s; us per call (% of copy bandwidth)")
    for bs, ctx, kept in [(8, 32768, 2048), (16, 8192, 2048), (32, 8192, 2048), (8, 32768, 4096), (16, 32768, 4096)]:
        c, store, flags = decode_case(bs, ctx, kept, dev)
        pos = torch.stack([torch.stack([token_positions(False, ctx, int(store.hi[b]), int(store.count[b]), CFG.sinks,
                           store.pos[0, b, h]).to(dev) for h in range(HKV)]) for b in range(bs)]).int()
        tok = torch.stack([c.req_to_token[b, pos[b].long()] for b in range(bs)]).int()
        L = tok.shape[-1]
        assert L == kept, L
        nbytes = kv_bytes(bs, kept)
        decode = lambda: sfi_decode(c.q, c.k, c.v, c.req_to_token, c.slots, c.seq_lens, flags,  # noqa: E731
                                    store.hi, store.count, store.pos[0], CFG.sinks, SCALE)
        res = {"sfi_decode": timed(decode, 20, True)[0]}
        for label, idx, via in ("via positions", pos, True), ("gather read", tok, False):
            for chunk, block, warps in [(256, 64, 4), (128, 128, 4), (256, 32, 4)]:
                out = torch.empty(bs * HKV, triton.cdiv(L, chunk), device=dev)
                fn = lambda: _gather_read[(bs * HKV, triton.cdiv(L, chunk))](  # noqa: E731
                    c.k, c.v, idx, c.req_to_token, out, L, ctx, CHUNK=chunk, BLOCK=block, HKV=HKV, D=D,
                    VIA_POSITIONS=via, num_warps=warps)
                res[f"{label} {chunk}/{block}/{warps}w"] = timed(fn, 20, True)[0]
        x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=dev)
        for blk in (16384,):
            o = torch.empty(triton.cdiv(x.numel(), blk), device=dev)
            res[f"contiguous read {blk}"] = timed(lambda: _read[(o.numel(),)](x, o, x.numel(), BLOCK=blk), 20, True)[0]
        print(f"bs {bs} ctx {ctx} kept {kept} ({nbytes/1e6:.0f} MB): " + "; ".join(
            f"{k} {t:.1f} ({100*nbytes/(t*1e-6)/bw:.0f}%)" for k, t in res.items()), flush=True)


if __name__ == "__main__":
    main()
