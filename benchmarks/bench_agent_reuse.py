"""Agent turns over a long shared prefix: sfi with selection reuse vs sfi without it vs dense.

    python benchmarks/bench_agent_reuse.py [--prefix 16384,65536] [--turns 6] [--user 256] [--output 128]
        [--dense flashinfer] [--variants sfi_reuse,sfi_no_reuse] [--config SFI_JSON] [--profile-turn 3] [--out PATH]
    python benchmarks/bench_agent_reuse.py --device cpu --model DIR --dense torch_native ...  # CPU smoke run

Each variant runs in its own process (an sglang Engine on one GPU, dummy Qwen3-4B
weights, decode CUDA graphs on): turn ``i`` sends the shared prefix plus every
earlier turn's output and user message (token ids), streamed, one turn after the
other, as an agent loop does; the radix cache holds the history. Per turn: time
to first token, decode tokens/s, cached prompt tokens, and for sfi the selection
reuse hits and the mean time of the prefill Selector (from selection records, and
fresh) from the engine's log, over the whole run and over turns 2+ alone. Turn 1 pays
the whole prefill; on later turns sfi with
reuse scores only the selection record plus the new tokens, sfi without reuse re-scores
the whole cached prefix at every prefill: over two or more ``--prefix`` lengths, the
former's Selector time should stay flat and the latter's grow. ``--profile-turn N`` records turn
N's prefill and first decode step with sglang's profiler (``trace_summary.py``; the summary goes
in that turn's row): where a later turn's time to first token goes. Results go to ``--out``
(default: a new file in the temporary folder; the path is printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from out_path import default_out  # noqa: E402
from sfi_sglang.dummy_model import write_dummy_model  # noqa: E402
from trace_summary import profiled  # noqa: E402

PREFILL_SELECTOR = re.compile(r"prefill Selector: (\d+) from records ([\d.]+) ms, (\d+) fresh ([\d.]+) ms")
VARIANTS = {  # name -> (attention backend, SFI_CONFIG or None)
    "sfi_reuse": ("sfi", {"log_interval": 16}),
    "sfi_no_reuse": ("sfi", {"log_interval": 16, "reuse_records": 0}),
}


def run_turns(args) -> list[dict]:
    """Child process: one Engine, ``args.turns`` sequential streamed turns; returns per-turn rows."""
    import sglang as sgl

    with open(os.path.join(args.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    rng = random.Random(0)
    words = lambda n: [rng.randrange(min(1000, vocab // 2), min(50000, vocab)) for _ in range(n)]  # noqa: E731
    context = args.prefix[0] + args.turns * (args.user + args.output) + 64
    if args.device == "cuda":
        kw = dict(load_format="dummy", mem_fraction_static=0.7, cuda_graph_max_bs_decode=4)
    else:  # a small real-format model (e.g. sfi_sglang.dummy_model --random-weights), as the CPU tests run it
        kw = dict(device="cpu", load_format="auto", max_total_tokens=2 * context, cuda_graph_backend_decode="disabled")
    engine = sgl.Engine(model_path=args.model, attention_backend=args.backend, random_seed=0, context_length=context,
                        cuda_graph_backend_prefill="disabled", log_level="info", **kw)
    history, rows = words(args.prefix[0]), []

    def turn(i: int) -> None:
        nonlocal history
        params = {"temperature": 0.0, "max_new_tokens": args.output, "ignore_eos": True}
        t0 = time.perf_counter()
        first = last = None
        for chunk in engine.generate(input_ids=history, sampling_params=params, stream=True):
            last = chunk
            first = first or time.perf_counter()
        t1 = time.perf_counter()
        meta = last["meta_info"]
        n = meta["completion_tokens"]
        rows.append({"turn": i, "prompt_tokens": len(history), "cached_tokens": meta.get("cached_tokens"),
                     "ttft_ms": 1e3 * (first - t0), "decode_tok_s": (n - 1) / (t1 - first)})
        print(f"turn {i}: prompt {len(history)}, cached {meta.get('cached_tokens')}, "
              f"ttft {rows[-1]['ttft_ms']:.1f} ms, decode {rows[-1]['decode_tok_s']:.1f} tok/s", flush=True)
        history = history + last["output_ids"] + words(args.user)

    try:
        for i in range(1, args.turns + 1):
            if i == args.profile_turn:  # its prefill and first decode step under sglang's profiler
                prof = profiled(engine, 2, lambda: turn(i), gpu=args.device == "cuda")
                rows[-1]["profile"] = prof
            else:
                turn(i)
            print(f"TURN {i} DONE", flush=True)  # the parent splits the engine's log here
    finally:
        engine.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", default="16384,65536", type=lambda v: [int(x) for x in v.split(",")],
                    help="shared prefix lengths (tokens), one run of every variant each")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--user", type=int, default=256, help="new user/tool tokens per turn")
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--dense", default="flashinfer", help="dense backend to compare (empty: sfi only)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="sfi variants to run (comma list)")
    ap.add_argument("--config", default="{}", help="extra SFI_CONFIG fields (JSON) for both sfi variants")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke run on --model with the CPU engine (source checkout; dense: torch_native)")
    ap.add_argument("--model", help="model folder (default: a dummy-weight Qwen3-4B, cuda only)")
    ap.add_argument("--profile-turn", type=int, default=0,
                    help="record this turn's prefill and first decode step with sglang's profiler "
                         "(trace_summary.py; the summary goes in that turn's row)")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--out", default=None, help="result JSON (default: a new file in the temporary folder, printed)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.model, args.backend = args.child
        print("ROWS " + json.dumps(run_turns(args)))
        return

    import torch

    if args.device == "cpu" and not args.model:
        ap.error("--device cpu needs --model")
    if args.out is None:
        args.out = default_out("agent-reuse")
    print("results go to", args.out, flush=True)
    model = args.model or write_dummy_model(tempfile.mkdtemp(prefix="sfi-agent-"), "qwen3-4b")
    extra = json.loads(args.config)
    chosen = set(filter(None, args.variants.split(",")))
    if chosen - set(VARIANTS):
        ap.error(f"--variants: unknown {sorted(chosen - set(VARIANTS))}; known: {sorted(VARIANTS)}")
    variants = {name: (backend, {**cfg, **extra}) for name, (backend, cfg) in VARIANTS.items() if name in chosen}
    if args.dense:
        variants[args.dense] = (args.dense, None)
    runs = []
    for prefix in args.prefix:
        results = {}
        for name, (backend, cfg) in variants.items():
            results[name] = run_variant(name, backend, cfg, model, prefix, args)
        results = {k: v for k, v in results.items() if v is not None}
        table(results, args.turns)
        runs.append({"prefix": prefix, "variants": results})
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(),
                       "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "config": extra,
                       "model": args.model or "qwen3-4b (dummy weights)", "user_tokens": args.user, "output_tokens": args.output,
                       "runs": runs}, f, indent=1)
    print("\nprefill Selector on turns 2+, calls x mean ms (from records / fresh):")
    for run in runs:
        print(f"  prefix {run['prefix']:>6}: " + ", ".join(
            f"{n} {v['later_turns_selector']['from_records']} / {v['later_turns_selector']['fresh']}"
            for n, v in run["variants"].items() if v.get("later_turns_selector")))
    print("wrote", args.out)


def run_variant(name: str, backend: str, cfg: dict | None, model: str, prefix: int, args) -> dict | None:
    """One child process (one Engine) over the turns at ``prefix``; its rows and sfi's logged counters."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN="1")
    if args.device == "cpu":
        from sfi_sglang.cpu_env import cpu_engine_env

        env = cpu_engine_env(env)
    if cfg is not None:
        env["SFI_CONFIG"] = json.dumps(cfg)
    cmd = [sys.executable, __file__, "--child", model, backend, "--prefix", str(prefix), "--turns", str(args.turns),
           "--user", str(args.user), "--output", str(args.output), "--device", args.device,
           "--profile-turn", str(args.profile_turn)]
    try:
        # one stream, in write order (the engine's log lines and the turn markers)
        log = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=args.timeout).stdout
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode(errors="replace")
    found = [ln for ln in log.splitlines() if ln.startswith("ROWS ")]
    if not found:
        print(f"[{name} prefix {prefix}] failed:\n{log[-3000:]}", file=sys.stderr)
        return None
    reuse = re.findall(r"selection reuse: hits (\d+), misses (\d+)", log)
    sel = PREFILL_SELECTOR.findall(log)
    out = {"turns": json.loads(found[-1][5:]),
           "reuse_hits": int(reuse[-1][0]) if reuse else None, "reuse_misses": int(reuse[-1][1]) if reuse else None,
           "selector_record_ms": float(sel[-1][1]) if sel else None, "selector_fresh_ms": float(sel[-1][3]) if sel else None,
           "later_turns_selector": later_turns_selector(log)}
    print(f"[{name} prefix {prefix}] " + ", ".join(f"t{r['turn']} {r['ttft_ms']:.0f} ms / {r['decode_tok_s']:.0f} tok/s"
                                                  for r in out["turns"]))
    return out


def later_turns_selector(log: str) -> dict[str, list[float]] | None:
    """The prefill Selector's calls and mean device ms on turns 2+ only (from records, fresh): the
    difference of sfi's cumulative counter lines at the end and before turn 2 (turn 1's whole-prompt
    prefill, its chunks and first-use kernel compiles stay out). None if either line is missing."""
    cut = log.find("TURN 1 DONE")
    before, after = PREFILL_SELECTOR.findall(log[:cut]) if cut >= 0 else [], PREFILL_SELECTOR.findall(log)
    if not before or not after:
        return None
    (n0, m0, f0, g0), (n1, m1, f1, g1) = ([float(x) for x in line] for line in (before[-1], after[-1]))

    def window(c0: float, ms0: float, c1: float, ms1: float) -> list[float]:
        return [int(c1 - c0), round((c1 * ms1 - c0 * ms0) / (c1 - c0), 2) if c1 > c0 else 0.0]

    return {"from_records": window(n0, m0, n1, m1), "fresh": window(f0, g0, f1, g1)}


def table(results: dict, turns: int) -> None:
    print(f"\n{'turn':>4} {'prompt':>7} " + " ".join(f"{n + ' ttft':>18} {'tok/s':>7}" for n in results))
    for i in range(turns):
        cells = [results[n]["turns"][i] for n in results if i < len(results[n]["turns"])]
        if cells:
            print(f"{i + 1:>4} {cells[0]['prompt_tokens']:>7} "
                  + " ".join(f"{c['ttft_ms']:>15.1f} ms {c['decode_tok_s']:>7.0f}" for c in cells))


if __name__ == "__main__":
    main()
