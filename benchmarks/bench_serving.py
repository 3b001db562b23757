"""What users measure a server with: SGLang's own serving client, ``python -m sglang.benchmark.serving``,
against an sfi server and a dense server (FlashInfer) on the same GPU, one after the other.

Each load runs once per backend, on a fresh server with dummy weights of a preset's shapes (the step
time does not depend on the weights' values; outputs ignore EOS, so every request decodes its full
length):

- ``random``: ``--dataset-name random-ids``, every request ``--input-len`` random tokens in,
  ``--output-len`` out, ``--concurrency`` in flight (long-context decode);
- ``shared-prefix``: ``--dataset-name generated-shared-prefix`` with ``--turns`` turns per conversation,
  a ``--prefix-len``-token system prompt shared within each group (an agent's load: one long cached
  prefix, short new turns, so sfi's selections are reused from the radix tree).

Rows: ``{backend, load, output_throughput, median_tpot_ms, median_ttft_ms, ...}`` as the client reports
them (sfi rows add the slow-step rate and the selection reuse the server counted, from its metrics), and
per load sfi's ratios to the dense server (throughput up, TPOT down). With dummy weights the outputs
are random tokens, so few boundary tokens trigger slow steps: compare ``slow_step_rate`` with a real
model's (benchmarks/RESULTS.md).

    python benchmarks/bench_serving.py --out serving.json                 # Qwen3-4B shapes, 8 x 32K
    python benchmarks/bench_serving.py --loads shared-prefix --prefix-len 16000 --turns 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from out_path import default_out  # noqa: E402

from sfi_sglang.agents import LocalServer, metric_totals  # noqa: E402
from sfi_sglang.dummy_model import PRESETS, write_dummy_model  # noqa: E402

KEYS = ("completed", "duration", "output_throughput", "request_throughput", "median_tpot_ms", "p99_tpot_ms",
        "median_itl_ms", "median_ttft_ms", "p99_ttft_ms", "median_e2e_latency_ms", "total_input_tokens",
        "total_output_tokens")


def load_args(load: str, a) -> list[str]:
    """The client's dataset arguments for ``load``."""
    if load == "random":
        return ["--tokenize-prompt", "--dataset-name", "random-ids", "--random-input-len", str(a.input_len),
                "--random-output-len", str(a.output_len), "--random-range-ratio", "1", "--num-prompts", str(a.prompts)]
    return ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(a.groups), "--gsp-prompts-per-group",
            str(a.prompts // a.groups), "--gsp-system-prompt-len", str(a.prefix_len), "--gsp-question-len",
            str(a.question_len), "--gsp-output-len", str(a.output_len), "--gsp-num-turns", str(a.turns)]


def run_client(port: int, model: str, load: str, a, out: str) -> dict:
    """One run of sglang's serving client against the server on ``port``; its summary line."""
    client = "sglang" if load == "random" else "sglang-oai-chat"  # the client sends turns only as chats
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", client,
           "--base-url", f"http://127.0.0.1:{port}", "--model", model, "--tokenizer", model,
           "--max-concurrency", str(a.concurrency), "--seed", "0", "--disable-tqdm", "--output-file", out,
           *load_args(load, a)]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    with open(out) as f:
        return json.loads(f.read().splitlines()[-1])


def sfi_counts(before: dict, after: dict) -> dict:
    """sfi's counters over one load (the server's metrics before and after it)."""
    grew = {k.removeprefix("sglang:sfi_").removesuffix("_total"): after[k] - before.get(k, 0) for k in after}
    rows = grew.get("slow_steps", 0) + grew.get("fast_steps", 0)
    return {"slow_step_rate": round(grew.get("slow_steps", 0) / rows, 4) if rows else None,
            "reuse_hits": grew.get("reuse_hits"), "reuse_misses": grew.get("reuse_misses")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-4b", choices=sorted(PRESETS), help="dummy-weight preset")
    p.add_argument("--dense", default="flashinfer", help="the dense backend compared with")
    p.add_argument("--config", default="{}", help="sfi's SFI_CONFIG (JSON)")
    p.add_argument("--loads", nargs="+", default=["random", "shared-prefix"], choices=["random", "shared-prefix"])
    p.add_argument("--input-len", type=int, default=32000)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--prompts", type=int, default=16, help="requests per load (shared-prefix: over all groups)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--groups", type=int, default=4, help="shared-prefix: system prompts")
    p.add_argument("--prefix-len", type=int, default=16000, help="shared-prefix: system prompt tokens")
    p.add_argument("--question-len", type=int, default=256, help="shared-prefix: tokens of each new turn")
    p.add_argument("--turns", type=int, default=4, help="shared-prefix: turns per conversation")
    p.add_argument("--server-args", default="", help="more sglang server arguments, one string")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    json.loads(a.config)  # a bad config fails here, before any server starts
    out = a.out or default_out("serving")
    model = write_dummy_model(tempfile.mkdtemp(prefix="sfi-serving-"), a.model)
    context = max(a.input_len, a.prefix_len + a.turns * (a.question_len + a.output_len)) + a.output_len + 64
    extra = ["--load-format", "dummy", "--context-length", str(context), "--cuda-graph-backend-prefill", "disabled",
             "--max-running-requests", str(a.concurrency), "--enable-metrics", *a.server_args.split()]
    import torch

    result = {"model": a.model, "gpu": torch.cuda.get_device_name(), "config": json.loads(a.config),
              "client": "python -m sglang.benchmark.serving", "args": vars(a), "rows": []}
    for backend in (a.dense, "sfi"):
        env = {**os.environ, "SFI_CONFIG": a.config}
        log_path = os.path.join(tempfile.mkdtemp(prefix="sfi-serving-"), "server.log")
        print(f"{backend}: server log {log_path}", flush=True)
        with open(log_path, "w") as log, LocalServer(model, extra, env=env, log=log, backend=backend) as srv:
            for load in a.loads:
                t0 = time.time()
                before = metric_totals(srv.url) or {}
                res = run_client(srv.port, model, load, a, tempfile.mktemp(suffix=".jsonl"))
                row = {"backend": backend, "load": load, **{k: res.get(k) for k in KEYS}}
                if backend == "sfi":
                    row.update(sfi_counts(before, metric_totals(srv.url) or {}))
                result["rows"].append(row)
                print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
                with open(out, "w") as f:  # rewritten after each load: a stopped run keeps what it measured
                    json.dump(result, f, indent=1)
    by = {(r["backend"], r["load"]): r for r in result["rows"]}
    result["ratios"] = {load: {"output_throughput": round(by["sfi", load]["output_throughput"]
                                                          / by[a.dense, load]["output_throughput"], 3),
                               "median_tpot": round(by[a.dense, load]["median_tpot_ms"]
                                                    / by["sfi", load]["median_tpot_ms"], 3)}
                        for load in a.loads}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["ratios"]), "\nresult:", out)


if __name__ == "__main__":
    main()
