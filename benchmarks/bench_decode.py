"""Decode throughput on one GPU: sfi vs SGLang's dense backends, same run, CUDA graphs on.

    python benchmarks/bench_decode.py [--model qwen3-4b] [--shapes 1x8192,16x8192,4x32768]
        [--output-len 512] [--refresh 16,32] [--memories 2048/512,3072/1024]
        [--logit-rows 0,4] [--variants '{};{"dense_layers": 1}'] [--tp 1]
        [--runner engine [--stagger 2] [--profile-steps 64]] [--out PATH]

Every backend runs sglang's one-batch benchmark (``sfi_sglang.bench_one_batch``; or, with
``--runner engine``, an Engine with the overlap scheduler: ``engine_decode.py``), one
process per backend and context (holding that context's batch sizes), on the same
dummy-weight model config, with decode CUDA graphs on. Results are written after
every process, so a shape that fails (e.g. out of memory in the one-shot prefill)
loses only its own process; each process's static memory fraction is sized to its
largest batch (weights + KV), leaving the rest to the one-shot prefill. Dummy weights write no sentences, so sfi's slow steps are
forced every R steps (``max_fast_steps = R - 1``, boundary and digit triggers off): R=16 is the
worst case the issue asks for, R=32 the usual one. Decode step time is the mean over
all decode steps (slow steps and Selector refreshes included), not the median.
Prints a table with the ratio sfi / best dense backend, the ideal ratio from bytes
moved, and the fraction of HBM copy bandwidth (measured in this run) each step uses;
with ``--tp N`` bytes and bandwidth are per GPU (weights and KV heads split N ways).
A shape of context <= 1024 at some batch size (e.g. ``16x512``) measures the step
outside attention (weights, GEMMs, norms, sampling, launches) at that batch; the table
then adds ``attn``, the ratio of the attention parts (each step minus that floor). With
``--runner engine --stagger N``, ``stag`` is the ratio with requests sent N steps apart, so that
sfi's slow steps fall on different steps for different requests, as in serving; with
``--profile-steps N`` each process's largest batch then runs N steps under sglang's profiler, and
its row gets ``profile`` (``trace_summary.py``: GPU busy/idle time and kernels by category per step,
host calls, sfi's Selector ranges). sfi rows also
carry ``refreshes``: calls and mean device milliseconds of the Selector refreshes after slow steps
(from kept logits, from keys) and the mean host time to issue one, over the process's run, read from
sfi's counter line (device time close to host time: the refresh is launch-bound).

Every row's step times are checked (``engine_decode.check_step_times``): a step faster than the
bytes it must move at the copy bandwidth measured in the run, or (engine runner) a timed send
further than 10% from its measurement's median, is listed in the row's ``timing_warnings`` and
marked ``!`` in the table; the engine runner refuses a non-positive step time. Results go to
``--out`` (default: a new file in the system's temporary folder; the path is printed).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from engine_decode import TimingError, check_step_times, pool_tokens  # noqa: E402
from out_path import default_out  # noqa: E402
from sfi_sglang.config import SFIConfig  # noqa: E402
from sfi_sglang.dummy_model import PRESETS, write_dummy_model  # noqa: E402


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), best of 10."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / best


def has_fa3() -> bool:
    try:
        return importlib.util.find_spec("sgl_kernel.flash_attn") is not None
    except ImportError:
        return False


def model_bytes(cfg: dict) -> tuple[int, int]:
    """(weight bytes, KV bytes per token, all layers) of a bf16 Qwen3- or Gemma-3-style config."""
    h, hq, hkv, d, i, v, layers = (cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                   "head_dim", "intermediate_size", "vocab_size", "num_hidden_layers"))
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * i + 4 * h + 2 * d
    params = layers * per_layer + v * h * (1 if cfg["tie_word_embeddings"] else 2) + h
    return 2 * params, 2 * 2 * layers * hkv * d


def windows(cfg: dict) -> list[int | None]:
    """Per layer: the tokens a sliding-window layer's query sees (its window), None for full attention."""
    types = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    return [cfg["sliding_window"] if t == "sliding_attention" else None for t in types]


def tokens_read(cfg: dict, context: int, steps: int, sfi: dict | None = None, refresh: int = 0) -> float:
    """KV tokens one request's decode step reads, averaged over its layers and ``steps`` steps from
    ``context`` (each step adds one): a window layer its window, a full layer the context (sfi: slow
    steps the context, one in ``refresh``, fast steps the memory; its ``dense_layers`` first full
    layers the context)."""
    per_layer = windows(cfg)
    read = context
    if sfi is not None:
        kept = sfi["sinks"] + sfi["topk"] + sfi["recent"] + refresh / 2
        sparse = context / refresh + min(kept, context) * (refresh - 1) / refresh
        dense_share = sfi["dense_layers"] / per_layer.count(None)
        read = dense_share * context + (1 - dense_share) * sparse
    return sum(read + steps / 2 if w is None else min(w, context + steps / 2) for w in per_layer) / len(per_layer)


def mem_fraction(args, w_bytes: int, kv_tok: int, context: int, batch: int) -> float:
    """Static memory fraction for weights and a KV pool that holds ``batch`` requests (the Engine
    runner's pool: ``engine_decode.pool_tokens``; 5% spare and 2 GB for sglang's own buffers); the
    rest is left to the one-shot prefill's activations."""
    if args.mem_fraction != "auto":
        return float(args.mem_fraction)
    tokens = pool_tokens(batch, context, args.output_len) if args.runner == "engine" else \
        batch * (context + args.output_len + 64)
    need = (w_bytes + 1.05 * tokens * kv_tok) / args.tp + 2e9
    return round(min(0.9, max(0.3, need / torch.cuda.get_device_properties(0).total_memory)), 3)


def run_backend(name: str, backend: str, model: str, args, sfi_cfg: dict | None, context: int,
                batches: list[int], fraction: float) -> tuple[list[dict], str]:
    """One one-batch process over ``batches`` at ``context``; returns its result rows and log."""
    res = tempfile.mktemp(suffix=".jsonl")
    env = dict(os.environ, PYTHONUNBUFFERED="1", SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN="1")
    if sfi_cfg is not None:
        env["SFI_CONFIG"] = json.dumps(sfi_cfg)
    common = ["--mem-fraction-static", str(fraction), "--tp-size", str(args.tp), "--batch-size", *map(str, batches),
              "--input-len", str(context), "--output-len", str(args.output_len), "--result-filename", res]
    if args.runner == "engine":
        cmd = [sys.executable, os.path.join(HERE, "engine_decode.py"), model, backend, *common,
               "--stagger", str(args.stagger), "--profile-steps", str(args.profile_steps)]
    else:
        cmd = [sys.executable, "-m", "sfi_sglang.bench_one_batch", "--model-path", model, "--load-format", "dummy",
               "--attention-backend", backend, "--cuda-graph-backend-prefill", "disabled",
               "--context-length", str(context + args.output_len + 64), "--cuda-graph-max-bs-decode", str(max(batches)),
               "--run-name", name, *common]
    # own process group: a timeout must also end the tp workers, which would hold their GPU memory
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, rc = p.communicate(timeout=args.timeout)[0], p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, rc = p.communicate()[0], "timeout"
    rows = [json.loads(line) for line in open(res)] if os.path.exists(res) else []
    for r in rows:
        if "step_s" not in r:  # one-batch rows: mean decode step over all steps after the prefill
            r["step_s"] = (r["total_latency"] - r["prefill_latency"]) / (r["output_len"] - 1)
    if rc != 0 or len(rows) < len(batches):  # tp workers' failures leave rc 0
        print(f"[{name}] exit {rc}, {len(rows)} of {len(batches)} results:\n{log[-3000:]}", file=sys.stderr)
    return rows, log


def slow_frac_from_log(log: str) -> float | None:
    """Slow-step fraction from sfi's last cumulative counter line."""
    found = re.findall(r"slow frac ([0-9.]+)", log)
    return float(found[-1]) if found else None


def refreshes_from_log(log: str) -> dict:
    """Refreshes after slow steps from sfi's last counter line: ``{"from_logits": [calls, mean ms],
    "from_keys": [...], "host_ms": mean}`` (device time per call, all layers and the call's rows;
    host: the time to issue a call), or {}."""
    found = re.findall(r"refresh Selector: (\d+) from logits ([\d.]+) ms, (\d+) from keys ([\d.]+) ms, "
                       r"host ([\d.]+) ms", log)
    if not found:
        return {}
    a, b, c, d, host = found[-1]
    return {"from_logits": [int(a), float(b)], "from_keys": [int(c), float(d)], "host_ms": float(host)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-4b", choices=[p for p in PRESETS if not p.startswith(("tiny", "small"))])
    ap.add_argument("--shapes", default="1x8192,4x8192,16x8192,1x32768,4x32768",
                    type=lambda s: [tuple(map(int, x.split("x"))) for x in s.split(",")], help="BATCHxCONTEXT,...")
    ap.add_argument("--output-len", default=512, type=int)
    ap.add_argument("--refresh", default="16,32", type=lambda s: [int(x) for x in s.split(",") if x],
                    help="sfi refresh periods R (empty: dense backends only)")
    ap.add_argument("--memories", default="", type=lambda s: [tuple(map(int, x.split("/"))) for x in s.split(",") if x],
                    help="sfi TOPK/RECENT pairs, e.g. 2048/512,3072/1024 (each runs per R; empty: the default)")
    ap.add_argument("--logit-rows", default="", type=lambda s: [int(x) for x in s.split(",") if x],
                    help="sfi slow_logit_rows values, e.g. 0,4 (0: the Selector re-reads K; empty: the default)")
    ap.add_argument("--variants", default="{}", type=lambda s: [json.loads(x) for x in s.split(";")],
                    help='";"-separated JSON objects of SFI_CONFIG fields, one sfi run each, e.g. \'{};{"dense_layers": 1}\'')
    ap.add_argument("--dense", default="flashinfer,triton,fa3")
    ap.add_argument("--mem-fraction", default="auto", help="static memory fraction; auto: sized per context")
    ap.add_argument("--tp", default=1, type=int, help="tensor parallel GPUs (sglang --tp-size)")
    ap.add_argument("--runner", default="one_batch", choices=["one_batch", "engine"],
                    help="one_batch: sglang's one-batch benchmark (synchronous steps); engine: an Engine with the "
                         "overlap scheduler, as a server decodes (benchmarks/engine_decode.py)")
    ap.add_argument("--stagger", default=0, type=int,
                    help="engine runner: also time requests sent N steps apart (desynchronized slow steps)")
    ap.add_argument("--profile-steps", default=0, type=int,
                    help="engine runner: profile this many steps of each process's largest batch (trace_summary.py)")
    ap.add_argument("--timeout", default=900, type=int)
    ap.add_argument("--out", default=None,
                    help="result JSON (default: a new file in the temporary folder, printed)")
    args = ap.parse_args()
    if (args.stagger or args.profile_steps) and args.runner != "engine":
        ap.error("--stagger and --profile-steps need --runner engine")
    if args.out is None:
        args.out = default_out("decode")
    print("results go to", args.out, flush=True)

    model = write_dummy_model(tempfile.mkdtemp(prefix="sfi-bench-"), args.model)
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    w_bytes, kv_tok = model_bytes(PRESETS[args.model])
    print(f"{gpu}: copy bandwidth {bw / 1e12:.2f} TB/s; {args.model}: weights {w_bytes / 1e9:.2f} GB, "
          f"KV {kv_tok // 1024} KiB/token; tp {args.tp}")

    runs = []  # (name, backend, sfi config, refresh)
    for dense in filter(None, args.dense.split(",")):
        if dense == "fa3" and not has_fa3():
            print("fa3: not installed here, skipped")
            continue
        runs.append((dense, dense, None, None))
    base = SFIConfig()
    for r in args.refresh:
        for memory in args.memories or [(base.topk, base.recent)]:
            for x, extra in itertools.product(args.logit_rows or [base.slow_logit_rows], args.variants):
                cfg = {"max_fast_steps": r - 1, "min_refresh_gap": min(base.min_refresh_gap, r - 1),
                       "boundary": False, "value_refresh": False, "log_interval": 64, "topk": memory[0],
                       "recent": memory[1], "slow_logit_rows": x, **extra}
                name = f"sfi_R{r}" + (f"_k{memory[0]}r{memory[1]}" if args.memories else "") + (
                    f"_x{x}" if args.logit_rows else "") + "".join(f"_{k}{v}" for k, v in extra.items())
                runs.append((name, "sfi", cfg, r))
    runs.sort(key=lambda run: run[0] in args.dense.split(",")[1:])  # first dense, sfi, then the other dense

    groups: dict[int, list[int]] = {}
    for bs, ctx in args.shapes:
        groups.setdefault(ctx, []).append(bs)
    rows = []
    for (name, backend, cfg, r), (ctx, batches) in ((run, g) for run in runs for g in sorted(groups.items())):
        results, log = run_backend(name, backend, model, args, cfg, ctx, sorted(batches),
                                   mem_fraction(args, w_bytes, kv_tok, ctx, max(batches)))
        frac = slow_frac_from_log(log) if cfg else 0.0
        refreshes = refreshes_from_log(log) if cfg else {}
        for res in results:
            bs, ctx = res["batch_size"], res["input_len"]
            steps, step_s = res["output_len"] - 1, res["step_s"]
            dense_layers = cfg.get("dense_layers", base.dense_layers) if cfg else None
            read = tokens_read(PRESETS[args.model], ctx, steps, {**base.to_dict(), **cfg} if cfg else None, r)
            moved = w_bytes + bs * kv_tok * read
            floor_s = moved / args.tp / bw  # no step can move its bytes faster than the copy bandwidth
            warnings = list(res.get("timing_warnings", []))  # engine runner: sends far from their median
            try:
                for key in ("step_s", "staggered_step_s"):
                    if key in res:
                        warnings += [f"{key} {w}" for w in
                                     check_step_times(res.get(key + "_runs", [res[key]]), floor_s, spread=None)]
            except TimingError as e:
                print(f"[{name}] bs {bs} ctx {ctx}: timing refused, row left out: {e}", file=sys.stderr, flush=True)
                continue
            rows.append({
                "gpu": gpu, "model": args.model, "tp": args.tp, "runner": args.runner, "backend": name, "batch": bs,
                "context": ctx,
                "output_len": res["output_len"], "refresh_every": r, "topk": cfg["topk"] if cfg else None,
                "recent": cfg["recent"] if cfg else None,
                "slow_logit_rows": cfg["slow_logit_rows"] if cfg else None,
                "dense_layers": dense_layers, "decode_tok_s": bs / step_s,
                "step_ms": 1e3 * step_s, "slow_step_frac": frac, "hbm_frac": moved / args.tp / step_s / bw,
                "bytes_moved": moved, "timing_warnings": warnings,
            })
            for key in ("step_s_runs", "staggered_step_s", "staggered_step_s_runs"):  # engine runner: seconds -> ms
                if key in res:
                    rows[-1][key.replace("step_s", "step_ms")] = (
                        [1e3 * t for t in res[key]] if key.endswith("runs") else 1e3 * res[key])
            if "uncached_prompt_tokens" in res:  # engine runner: prompt tokens timed sends prefilled again
                rows[-1]["uncached_prompt_tokens"] = res["uncached_prompt_tokens"]
            if refreshes:  # the process's whole run (all its batch sizes, warm-up included)
                rows[-1]["refreshes"] = refreshes
            if "profile" in res:
                rows[-1]["profile"] = res["profile"]
                print(f"{name:>12} bs {bs:>3} ctx {ctx:>6} profile, ms per step: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in res["profile"].get("per_step_ms", {}).items()), flush=True)
            spread = res.get("step_s_runs", [step_s])
            print(f"{name:>12} bs {bs:>3} ctx {ctx:>6}: {1e3 * step_s:8.2f} ms/step, {bs / step_s:9.1f} tok/s"
                  + (f" (runs {1e3 * min(spread):.2f}-{1e3 * max(spread):.2f} ms)" if len(spread) > 1 else "")
                  + (f", {res['uncached_prompt_tokens']} prompt tokens prefilled again"
                     if res.get("uncached_prompt_tokens") else "")
                  + "".join(f"; refresh {k} {refreshes[k][0]} x {refreshes[k][1]:.2f} ms"
                            for k in ("from_logits", "from_keys") if refreshes.get(k, [0])[0])
                  + (f" (host {refreshes['host_ms']:.2f} ms per call)" if refreshes else "")
                  + "".join(f"\n    timing warning: {w}" for w in warnings),
                  flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "copy_bandwidth_bytes_s": bw,
                       "weight_bytes": w_bytes, "kv_bytes_per_token": kv_tok, "rows": rows}, f, indent=1)
    table(rows)
    print("wrote", args.out)


FLOOR_CONTEXT = 1024  # shapes up to this context measure the step outside attention


def table(rows: list[dict]) -> None:
    """Per (batch, context): best dense backend vs each sfi setting, measured and ideal ratio, and
    (where a short-context shape ran at that batch) the cap (the dense step over the step outside
    attention: what no attention backend can beat) and the ratio of the steps' attention parts. ``!``:
    a row of the pair has timing warnings."""
    print(f"\n{'batch':>5} {'ctx':>6} {'best dense':>16} {'sfi':>13} {'tok/s':>9} {'ratio':>6} {'ideal':>6} "
          f"{'cap':>5} {'slow':>6} {'%HBM':>5} {'attn':>5} {'stag':>5}")
    for bs, ctx in sorted({(r["batch"], r["context"]) for r in rows}):
        short = [r["step_ms"] for r in rows if r["batch"] == bs and r["context"] <= FLOOR_CONTEXT]
        floor = min(short) if short and ctx > FLOOR_CONTEXT else None
        at = [r for r in rows if (r["batch"], r["context"]) == (bs, ctx)]
        dense = [r for r in at if r["refresh_every"] is None]
        if not dense:
            continue
        best = max(dense, key=lambda r: r["decode_tok_s"])
        for r in (r for r in at if r["refresh_every"] is not None):
            print(f"{bs:>5} {ctx:>6} {best['backend']:>9} {best['decode_tok_s']:6.0f} {r['backend']:>13} "
                  f"{r['decode_tok_s']:9.1f} {r['decode_tok_s'] / best['decode_tok_s']:6.2f} "
                  f"{best['bytes_moved'] / r['bytes_moved']:6.2f} "
                  + (f"{best['step_ms'] / floor:5.2f} " if floor else f"{'-':>5} ")
                  + f"{r['slow_step_frac']:6.3f} {100 * r['hbm_frac']:5.1f} "
                  + (f"{(best['step_ms'] - floor) / (r['step_ms'] - floor):5.2f}" if floor else f"{'-':>5}")
                  + (f" {best['staggered_step_ms'] / r['staggered_step_ms']:5.2f}" if "staggered_step_ms" in r
                     and "staggered_step_ms" in best else f" {'-':>5}")
                  + (" !" if best.get("timing_warnings") or r.get("timing_warnings") else ""))


if __name__ == "__main__":
    main()
