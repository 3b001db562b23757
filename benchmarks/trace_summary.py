"""Where a decode step's time goes, from a PyTorch profiler trace of sglang's scheduler.

    python benchmarks/trace_summary.py TRACE.json[.gz] [--steps N]

``engine_decode.py --profile-steps N`` records N forward steps with sglang's own profiler
(``Engine.start_profile``) and summarises the trace with :func:`summarize`: the GPU's busy and
idle time over the span of its kernels (idle: the GPU waited for the host), kernel time by
category (GEMMs, dense attention, sfi's decode kernels, the Selector's kernels, communication,
other), the heaviest kernels, counts of host calls that matter here (kernel and graph launches,
allocations, synchronisations), and sfi's own ranges (``sfi_refresh_selector``: the Selector
refresh after slow steps, ``sfi_prefill_selector``: a prefill's; host time and the GPU time of their kernels).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable

CATEGORIES = (  # first match wins
    ("sfi_decode", re.compile(r"_sfi_decode|_plan_step")),
    ("selector", re.compile(r"_candidate_logits|_block_stats|_scores|_topk_select|_held_ranges|_held_selected")),
    ("communication", re.compile(r"nccl|all_?reduce|cross_device", re.I)),
    ("dense_attention", re.compile(r"flashinfer|BatchDecode|BatchPrefill|PersistentVariableLength|_fwd_kernel|"
                                   r"decode_kernel|fmha", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|cublas|nvjet|xmma|matmul|splitK", re.I)),
)
RUNTIME = {"kernel_launches": ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"),
           "graph_launches": ("cudaGraphLaunch",),
           "allocations": ("cudaMalloc", "cudaFree", "cudaMallocAsync", "cudaFreeAsync"),
           "synchronizations": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")}


def category(kernel: str) -> str:
    return next((name for name, pattern in CATEGORIES if pattern.search(kernel)), "other")


def _union_ms(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals (microseconds in, ms out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def summarize(trace: dict, steps: int) -> dict:
    """Summary of a Chrome-format trace (``traceEvents``) of ``steps`` forward steps; times in ms."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    by_cat: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        cat = category(e["name"])
        by_cat[cat] = by_cat.get(cat, 0.0) + e["dur"] / 1e3
        entry = by_name.setdefault(e["name"], [0, 0.0])
        entry[0] += 1
        entry[1] += e["dur"] / 1e3
    span = (max(b for _, b in spans) - min(a for a, _ in spans)) / 1e3 if spans else 0.0
    busy = _union_ms(spans)
    runtime = {key: sum(1 for e in events if e.get("cat") == "cuda_runtime" and e["name"] in names)
               for key, names in RUNTIME.items()}
    ranges: dict[str, dict[str, float]] = {}
    for e in events:
        if e.get("cat") in ("user_annotation", "gpu_user_annotation") and e["name"].startswith("sfi_"):
            r = ranges.setdefault(e["name"], {"count": 0, "host_ms": 0.0, "gpu_ms": 0.0})
            if e["cat"] == "user_annotation":
                r["count"] += 1
                r["host_ms"] += e["dur"] / 1e3
            else:
                r["gpu_ms"] += e["dur"] / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
    per = max(steps, 1)
    return {
        "steps": steps, "gpu_span_ms": span, "gpu_busy_ms": busy, "gpu_idle_ms": span - busy,
        "per_step_ms": {"span": span / per, "busy": busy / per, "idle": (span - busy) / per,
                        **{k: v / per for k, v in sorted(by_cat.items())}},
        "kernels": len(kernels), "host_calls": runtime, "sfi_ranges": ranges,
        "top_kernels": [[name[:80], n, round(ms, 3)] for name, (n, ms) in top],
    }


def load(path: str) -> dict:
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return json.load(f)


def profiled(engine, steps: int, run: Callable[[], object], out_dir: str | None = None, gpu: bool = True) -> dict:
    """The first ``steps`` forward steps of ``run()`` (which must outlast them) under sglang's profiler
    (``Engine.start_profile``), summarised; the trace stays in ``out_dir`` (default: a temporary folder)."""
    out = out_dir or tempfile.mkdtemp(prefix="sfi-profile-")
    before = set(glob.glob(os.path.join(out, "*.trace.json*")))
    engine.start_profile(output_dir=out, num_steps=steps, with_stack=False, record_shapes=False,
                         activities=["CPU", "GPU"] if gpu else ["CPU"])
    run()  # the profiler stops, and writes its trace, after `steps` steps
    new = sorted(set(glob.glob(os.path.join(out, "*.trace.json*"))) - before, key=os.path.getmtime)
    if not new:
        return {"error": f"no trace written to {out}"}
    return {"trace": new[-1], **summarize(load(new[-1]), steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="forward steps the trace holds")
    args = ap.parse_args()
    print(json.dumps(summarize(load(args.trace), args.steps), indent=1))


if __name__ == "__main__":
    main()
