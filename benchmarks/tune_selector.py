"""Launch-shape sweep of the Selector's kernels on one GPU (inside CUDA graphs).

    python benchmarks/tune_selector.py [--out PATH]

``topk_select``: candidates per loop step and warps, for as many (row, KV head) rows as a
refresh gives it (one layer of batch 16, or 12 layers of batch 4 and more) at 8K-128K candidates,
the default topk and neighbour window, scores scaled by their totals in the kernel (rows split
over about ``topk_select.PROGRAMS`` chunk programs).
``group_scores``: candidates per program and warps at batch 4 and 16, four queries per KV head, on the
logits of a refresh from the keys (fp32, query-major) and on a slow step's kept logits (fp16,
token-major, read through a transposed view; two layers of batch 16 per call at 128K). Prints each
shape's times and the best launch; the chosen defaults go into the kernels by hand, with the
numbers that justify them. ``--kernels`` picks which.
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

from out_path import default_out  # noqa: E402
from bench_kernels import CFG, HKV, timed  # noqa: E402
from sfi_sglang.kernels.group_scores import BLOCK_N as SCORE_BLOCK, NUM_WARPS as SCORE_WARPS, group_scores  # noqa: E402
from sfi_sglang.kernels.topk_select import BLOCK_N, NUM_WARPS, topk_select  # noqa: E402
from sfi_sglang.selector import region_positions  # noqa: E402

TOPK_SHAPES = [(16, 8192), (128, 8192), (36 * 16, 8192), (16, 32768), (96, 32768), (384, 32768), (32, 131072),
               (96, 131072), (384, 131072)]  # (requests x layers, candidates)
TOPK_LAUNCHES = list(itertools.product((512, 1024, 2048, 4096), (4, 8, 16)))
SCORE_SHAPES = [(4, 131072, "keys"), (16, 32768, "keys"), (16, 8192, "keys"), (32, 131072, "kept"), (16, 32768, "kept"),
                (16, 8192, "kept")]  # (rows, candidates, logits)
SCORE_LAUNCHES = list(itertools.product((256, 512, 1024, 2048), (4, 8)))


def report(kernel: str, shape: str, times: dict, default: tuple[int, int]) -> None:
    """One shape's line: the default launch's time and the best one's."""
    best = min(times, key=times.get)
    print(f"{kernel} {shape}: default {times[default]:8.1f} us, best {times[best]:8.1f} us at block {best[0]}, "
          f"{best[1]} warps", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", default=10, type=int)
    ap.add_argument("--kernels", default="topk_select,group_scores", type=lambda x: x.split(","))
    ap.add_argument("--out", default=None, help="result JSON (default: a new file in the temporary folder, printed)")
    args = ap.parse_args()
    if args.out is None:
        args.out = default_out("tune-selector")
    print("results go to", args.out, flush=True)
    dev = torch.device("cuda")
    rows = []
    for s, n in TOPK_SHAPES if "topk_select" in args.kernels else ():
        f = torch.rand(s, HKV, n, device=dev)
        total = f.sum(-1)  # the backend passes group_scores' totals: the kernel scales by them
        pos = region_positions(torch.zeros(s, dtype=torch.int32, device=dev), torch.full((s,), n, device=dev), n)
        times = {}
        for block, warps in TOPK_LAUNCHES:
            fn = lambda: topk_select(f, pos, CFG.topk, CFG.neighbor_window, total, block=block,  # noqa: E731
                                     num_warps=warps)
            times[(block, warps)] = timed(fn, args.iters, True)[0]
            rows.append({"kernel": "topk_select", "rows": s, "candidates": n, "block": block, "warps": warps,
                         "time_us": times[(block, warps)]})
        report("topk_select", f"{s:>4} x {HKV} rows, {n:>6} candidates", times, (BLOCK_N, NUM_WARPS))
    for s, n, kind in SCORE_SHAPES if "group_scores" in args.kernels else ():
        if kind == "keys":
            logits = torch.randn(s, HKV, 4, n, device=dev)
        else:
            logits = torch.randn(s, HKV, n, 4, device=dev).half().transpose(2, 3)
        pos = region_positions(torch.zeros(s, dtype=torch.int32, device=dev), torch.full((s,), n, device=dev), n)
        lo, hi = torch.full((s,), 4, device=dev), torch.full((s,), n - 512, device=dev)
        held = torch.rand(s, HKV, n, device=dev) < 0.1
        times = {}
        for block, warps in SCORE_LAUNCHES:
            fn = lambda: group_scores(logits, pos, lo, hi, CFG.alpha, held, block=block, num_warps=warps)  # noqa: E731
            times[(block, warps)] = timed(fn, args.iters, True)[0]
            rows.append({"kernel": "group_scores", "rows": s, "candidates": n, "logits": kind, "block": block,
                         "warps": warps, "time_us": times[(block, warps)]})
        report("group_scores", f"{s:>4} rows, {n:>6} candidates, {kind} logits", times, (SCORE_BLOCK, SCORE_WARPS))
    with open(args.out, "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "rows": rows},
                  fh, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
