"""A/B on one GPU, same run, inside CUDA graphs: the Selector's top-k (``topk_select``) at ranking
precisions of ``RANK_BITS`` significant bits (8: bfloat16's; fewer bits: shorter keys, smaller
histograms in both radix passes), at the Selector's shapes (rows x 8 KV heads x candidates, k 3072,
neighbour window 2, scores scaled by their row totals in the kernel, attention-like skew). Each
variant's output is checked against the torch reference at its own precision; per-pass kernel times
from the profiler. ``python benchmarks/ab_rank_bits.py``"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from ab_topk_select import SHAPES, pass_times  # noqa: E402
from bench_kernels import load_file, timed  # noqa: E402
from sfi_sglang import selector  # noqa: E402
from sfi_sglang.kernels.topk_select import topk_select_ref  # noqa: E402
from sfi_sglang.selector import region_positions, restrict  # noqa: E402

SOURCE = os.path.join(os.path.dirname(HERE), "kernels", "topk_select.py")
IMPORT = "from sfi_sglang.selector import PAD_POSITION, RANK_BITS, restrict, spread_to_neighbors, topk_positions\n"


def variant(bits: int):
    """``topk_select`` compiled at ``bits`` of ranking precision (a copy of the module)."""
    src = open(SOURCE).read()
    assert IMPORT in src
    path = os.path.join("gpurun", f"topk_select_rank{bits}.py")
    with open(path, "w") as f:
        f.write(src.replace(IMPORT, IMPORT.replace("RANK_BITS, ", "") + f"RANK_BITS = {bits}\n"))
    return load_file(f"topk_select_rank{bits}", path).topk_select


def main() -> None:
    dev, k, window = "cuda", 3072, 2
    variants = {bits: variant(bits) for bits in (8, 7, 6, 5)}
    default = selector.RANK_BITS
    g = torch.Generator(device=dev).manual_seed(0)
    print(torch.cuda.get_device_name(), "us per call at RANK_BITS", list(variants), "(per-pass kernel us)")
    for s, n in SHAPES:
        z = torch.zeros(s, dtype=torch.int32, device=dev)
        hi = torch.full((s,), n, dtype=torch.int32, device=dev)
        pos = restrict(region_positions(z, hi, n), z + 4, hi - 1024)
        f = torch.exp(2 * torch.randn(s, 8, n, device=dev, generator=g)).masked_fill(pos < 0, 0.0)
        total = f.sum(-1)
        line = []
        for bits, fn in variants.items():
            selector.RANK_BITS = bits  # the reference's coarse() reads it
            assert torch.equal(fn(f, pos, k, window, total), topk_select_ref(f, pos, k, window, total)), bits
            call = lambda fn=fn: fn(f, pos, k, window, total)  # noqa: E731
            line.append(f"{bits}: {timed(call, 10, True)[0]:7.1f} ({pass_times(call)})")
        selector.RANK_BITS = default
        print(f"rows {s:>3} x 8, {n:>6}: " + " | ".join(line), flush=True)


if __name__ == "__main__":
    main()
