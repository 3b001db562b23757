"""A/B on one GPU, same run, inside CUDA graphs: the Selector's top-k (``topk_select``) against a
previous version of it (a path, default ``gpurun/topk_select_main.py``: ``git show <rev>:kernels/topk_select.py``), at
the Selector's shapes (rows x 8 KV heads x candidates, k 3072, neighbour window 2, scores scaled by
their row totals in the kernel, attention-like skew: lognormal, and all equal, the compaction's worst
case). Columns: previous / this / previous again (the run-order control), each with its per-pass kernel
times (profiler); this one's output checked equal to the torch reference, and the previous one's
noted where it differs. ``python benchmarks/ab_topk_select.py [PATH]``"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench_kernels import load_file, timed  # noqa: E402
from sfi_sglang.kernels import topk_select as new  # noqa: E402
from sfi_sglang.selector import region_positions, restrict  # noqa: E402

SHAPES = [(32, 131072), (36, 131072), (144, 32768), (36, 32768), (128, 8192), (36, 8192)]


def pass_times(fn) -> str:
    """Kernel times (us) of one call of ``fn``, per launch, from the profiler (5 calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return " ".join(f"{e.key}={e.device_time_total / 5:.0f}" for e in prof.key_averages() if e.key.startswith("_chunk"))


def main() -> None:
    old = load_file("topk_select_prev", sys.argv[1] if len(sys.argv) > 1 else "gpurun/topk_select_main.py")
    dev, k, window = "cuda", 3072, 2
    g = torch.Generator(device=dev).manual_seed(0)
    print(torch.cuda.get_device_name(), "us per call: previous / this / previous again (per-pass kernel us)")
    for s, n in SHAPES:
        z = torch.zeros(s, dtype=torch.int32, device=dev)
        hi = torch.full((s,), n, dtype=torch.int32, device=dev)
        pos = restrict(region_positions(z, hi, n), z + 4, hi - 1024)
        for label, f in (("lognormal", torch.exp(2 * torch.randn(s, 8, n, device=dev, generator=g))),
                         ("all equal", torch.ones(s, 8, n, device=dev))):
            f = f.masked_fill(pos < 0, 0.0)
            total = f.sum(-1)
            want = new.topk_select_ref(f, pos, k, window, total)
            fns = [lambda mod=mod: mod.topk_select(f, pos, k, window, total) for mod in (old, new, old)]
            assert torch.equal(fns[1](), want), label
            same = "" if torch.equal(fns[0](), want) else " (previous: other output, e.g. ranking precision)"
            print(f"rows {s:>3} x 8, {n:>6}, {label}: " + " | ".join(
                f"{timed(fn, 10, True)[0]:7.1f} ({pass_times(fn)})" for fn in fns) + same, flush=True)


if __name__ == "__main__":
    main()
