"""FlashInfer's ``top_k`` against the Selector's ``topk_select``, same run, inside CUDA graphs (eagerly
where a call cannot be captured), at the Selector's shapes (rows x 8 KV heads x candidates, neighbour
window 2, scores scaled by their row totals, attention-like skew). FlashInfer ranks the coarse
(bfloat16) spread scores, made beforehand with torch and not timed; at k 2048 with ties to the smaller
index (``tie_break=1``: its FilteredTopK path, k <= 2048 only; deterministic, indices ascending), its
positions are checked equal to ours. At k 3072 (the default) only its multi-CTA radix path runs (ties not
by index): timed, not compared. ``python benchmarks/ab_flashinfer_topk.py`` (needs FlashInfer's JIT)."""
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench_kernels import timed  # noqa: E402
from sfi_sglang.kernels.topk_select import topk_select  # noqa: E402
from sfi_sglang.selector import coarse, region_positions, restrict, scaled, spread_to_neighbors  # noqa: E402

SHAPES = [(36, 131072), (32, 131072), (144, 32768), (36, 32768), (128, 8192), (36, 8192)]


def main() -> None:
    t0 = time.time()
    import flashinfer
    from flashinfer.topk import top_k

    dev, window, hkv = "cuda", 2, 8
    g = torch.Generator(device=dev).manual_seed(0)
    print(torch.cuda.get_device_name(), "flashinfer", flashinfer.__version__, "- us per call")
    for s, n in SHAPES:
        z = torch.zeros(s, dtype=torch.int32, device=dev)
        hi = torch.full((s,), n, dtype=torch.int32, device=dev)
        pos = restrict(region_positions(z, hi, n), z + 4, hi - 1024)
        f = torch.exp(2 * torch.randn(s, hkv, n, device=dev, generator=g)).masked_fill(pos < 0, 0.0)
        total = f.sum(-1)
        spread = spread_to_neighbors(scaled(f, total), pos, window, contiguous=True)
        keys = coarse(spread).masked_fill(pos < 0, -1.0).to(torch.bfloat16).view(s * hkv, n)
        line = []
        for k in (2048, 3072):
            ours = lambda k=k: topk_select(f, pos, k, window, total)  # noqa: E731
            line.append(f"k {k}: ours {timed(ours, 10, True)[0]:7.1f}")
            by_index = k <= 2048
            theirs = lambda k=k, b=by_index: top_k(keys, k, deterministic=True, tie_break=int(b))[1]  # noqa: E731
            same = "-"
            if by_index:
                got = pos.expand(s, hkv, n).reshape(s * hkv, n).gather(1, theirs()).view(s, hkv, k)
                same = str(torch.equal(got, ours()))
            t, graph = timed(theirs, 10, True)
            line.append(f"flashinfer {t:7.1f}{'' if graph else ' (eager)'} equal {same}")
        print(f"rows {s:>3} x {hkv}, {n:>6}: " + " | ".join(line), flush=True)
    print(f"({time.time() - t0:.0f} s with FlashInfer's JIT build)")


if __name__ == "__main__":
    main()
