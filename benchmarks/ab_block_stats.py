"""A/B on one GPU, same run, inside CUDA graphs: ``group_scores`` with the block-statistics pass
that reuses a block's statistics for the region when every candidate of the block is in it (this
branch) against main's (``gpurun/group_scores_main.py``: ``git show main:kernels/group_scores.py``),
at the Selector's shapes: kept fp16 logits through the transposed view (refresh from kept logits) and
fp32 query-major logits (refresh from the keys), coverage on. Outputs checked close.
``python benchmarks/ab_block_stats.py``"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench_kernels import load_file, timed  # noqa: E402
from sfi_sglang.kernels.group_scores import group_scores  # noqa: E402
from sfi_sglang.selector import region_positions  # noqa: E402

HKV, G = 8, 4


def main() -> None:
    old = load_file("group_scores_main", "gpurun/group_scores_main.py")
    dev = "cuda"
    print(torch.cuda.get_device_name(), "main / this branch, us per call")
    for kept, s_rows, n in [(True, 560, 8192), (True, 144, 32768), (True, 32, 131072), (True, 36, 131072),
                            (False, 16, 131072), (False, 16, 32768), (False, 36, 8192)]:
        if kept:  # token-major fp16, as the slow step keeps them, read through a transposed view
            logits = (3 * torch.randn(s_rows, HKV, n, G, device=dev)).half().transpose(2, 3)
        else:
            logits = 3 * torch.randn(s_rows, HKV, G, n, device=dev)
        z = torch.zeros(s_rows, dtype=torch.int32, device=dev)
        end = torch.full((s_rows,), n, dtype=torch.int32, device=dev)
        pos = region_positions(z, end, n)
        lo, hi = z + 4, end - 1024
        held = torch.rand(s_rows, HKV, n, device=dev) < 0.05
        a = lambda: old.group_scores(logits, pos, lo, hi, 0.5, held)  # noqa: E731
        b = lambda: group_scores(logits, pos, lo, hi, 0.5, held)  # noqa: E731
        for u, w in zip(a(), b()):
            torch.testing.assert_close(w, u, atol=0, rtol=0)
        print(f"{'kept fp16' if kept else 'fp32':>9} rows {s_rows:>3} x {HKV}, {n:>6}: {timed(a, 10, True)[0]:8.1f} / "
              f"{timed(b, 10, True)[0]:8.1f}", flush=True)


if __name__ == "__main__":
    main()
