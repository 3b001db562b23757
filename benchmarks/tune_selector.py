"""Launch-shape sweep of the Selector's kernels on one GPU (inside CUDA graphs).

    python benchmarks/tune_selector.py [--out benchmarks/results/tune_selector.json]

``topk_select``: candidates per loop step and warps, for as many (row, KV head) rows as a
refresh gives it (one layer of batch 16, or 12 layers of batch 4 and more) at 8K-128K candidates,
the default topk and neighbour window, scores divided by their totals in the kernel (rows split
over about ``topk_select.PROGRAMS`` chunk programs).
``group_scores``: candidates per program at batch 4 and 16, four queries per KV head. Prints each
shape's times and the best launch; the chosen defaults go into the kernels by hand, with the
numbers that justify them.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from bench_kernels import CFG, HKV, timed  # noqa: E402
from sfi_sglang.kernels.group_scores import group_scores  # noqa: E402
from sfi_sglang.kernels.topk_select import BLOCK_N, NUM_WARPS, topk_select  # noqa: E402
from sfi_sglang.selector import region_positions  # noqa: E402

TOPK_SHAPES = [(16, 8192), (128, 8192), (36 * 16, 8192), (16, 32768), (96, 32768), (384, 32768), (32, 131072),
               (96, 131072), (384, 131072)]  # (requests x layers, candidates)
TOPK_LAUNCHES = list(itertools.product((512, 1024, 2048, 4096), (4, 8, 16)))
SCORE_SHAPES = [(4, 131072), (16, 32768), (16, 8192)]  # (requests, candidates)
SCORE_BLOCKS = (256, 512, 1024, 2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", default=10, type=int)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tune_selector.json"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for s, n in TOPK_SHAPES:
        f = torch.rand(s, HKV, n, device=dev)
        total = f.sum(-1)  # the backend passes group_scores' totals: the kernel divides
        pos = region_positions(torch.zeros(s, dtype=torch.int32, device=dev), torch.full((s,), n, device=dev), n)
        times = {}
        for block, warps in TOPK_LAUNCHES:
            fn = lambda: topk_select(f, pos, CFG.topk, CFG.neighbor_window, total, block=block,  # noqa: E731
                                     num_warps=warps)
            times[(block, warps)] = timed(fn, args.iters, True)[0]
            rows.append({"kernel": "topk_select", "rows": s, "candidates": n, "block": block, "warps": warps,
                         "time_us": times[(block, warps)]})
        best = min(times, key=times.get)
        print(f"topk_select {s:>4} x {HKV} rows, {n:>6} candidates: default {times[(BLOCK_N, NUM_WARPS)]:8.1f} us, "
              f"best {times[best]:8.1f} us at block {best[0]}, {best[1]} warps")
    for s, n in SCORE_SHAPES:
        logits = torch.randn(s, HKV, 4, n, device=dev)
        pos = region_positions(torch.zeros(s, dtype=torch.int32, device=dev), torch.full((s,), n, device=dev), n)
        lo, hi = torch.full((s,), 4, device=dev), torch.full((s,), n - 512, device=dev)
        held = torch.rand(s, HKV, n, device=dev) < 0.1
        for block in SCORE_BLOCKS:
            t = timed(lambda: group_scores(logits, pos, lo, hi, CFG.alpha, held, block=block), args.iters, True)[0]
            rows.append({"kernel": "group_scores", "rows": s, "candidates": n, "block": block, "time_us": t})
            print(f"group_scores {s:>3} rows, {n:>6} candidates, block {block:>5}: {t:8.1f} us")
    with open(args.out, "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "rows": rows},
                  fh, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
