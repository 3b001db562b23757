"""Soak: an sfi server under concurrent multi-turn sessions, client aborts and restarts.

    python benchmarks/soak.py --model-path M --minutes 10 --sessions 64   # starts sglang --attention-backend sfi
    python benchmarks/soak.py --url http://127.0.0.1:30000/v1 --minutes 10  # a running server
    python benchmarks/soak.py --tiny --minutes 3 --sessions 8               # CPU: tiny random-weight model

Localhost only, bounded by ``--minutes``. Each session is a conversation whose prompt
grows by a random number of words per turn (so lengths are mixed) and is sent to
``/v1/completions``; some turns stream a long answer and close the connection after a
few chunks (a client disconnect, which sglang aborts), and sessions start over when
their prompt is long enough or at random. Memory is sampled every few seconds: GPU
memory used (nvidia-smi) when there is a GPU, else the server's resident memory; on a GPU
the server's torch allocator (allocated / reserved, logged with sfi's counters every
``log_interval`` decode steps) is also reported, first and last reading, to tell a leak
(allocated grows) from the caching allocator keeping a new peak (reserved grows).
Writes ``{"requests","failed","aborted","max_gpu_mem_mb_start","max_gpu_mem_mb_end",
"p50_ms","p99_ms", ...}`` and sfi's Prometheus values at the end (``--enable-metrics``, on by
default: selection-reuse hits and misses, records and bytes held); the goal is 0 failed and no growth from the first to the last
window (a minute, or a quarter of a shorter run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import subprocess
import tempfile
import threading
import time

from openai import OpenAI

from sfi_sglang.agents import LocalServer, metric_totals

from out_path import default_out

ALLOCATOR = re.compile(r"torch allocated (\d+) MiB, reserved (\d+) MiB")
WORDS = ("the report said that every host in the west region served requests while the cache warmed up and "
         "latency fell after noon when traffic moved to the new cluster").split()


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.failed = self.aborted = 0
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []

    def add(self, field: str, latency_ms: float | None = None, error: str | None = None) -> None:
        with self.lock:
            setattr(self, field, getattr(self, field) + 1)
            if latency_ms is not None:
                self.latencies_ms.append(latency_ms)
            if error is not None and len(self.errors) < 20:
                self.errors.append(error)


def session(client: OpenAI, model: str, seed: int, deadline: float, args, tally: Tally) -> None:
    rng = random.Random(seed)
    words: list[str] = []
    while time.time() < deadline:
        if len(words) > args.max_words or rng.random() < 0.05:
            words = []
        for _ in range(rng.randint(5, args.turn_words)):
            words.append(rng.choice(WORDS) + ("." if rng.random() < 0.1 else ""))
        prompt = " ".join(words)
        start = time.time()
        try:
            if rng.random() < args.abort_frac:
                stream = client.completions.create(model=model, prompt=prompt, max_tokens=args.max_new * 4,
                                                   temperature=0, stream=True)
                for i, _ in enumerate(stream):
                    if i >= 2:
                        break
                stream.close()  # the client goes away mid-generation
                tally.add("aborted")
                continue
            reply = client.completions.create(model=model, prompt=prompt, max_tokens=rng.randint(4, args.max_new),
                                              temperature=0)
            words += reply.choices[0].text.split()[:20]
            tally.add("requests", 1e3 * (time.time() - start))
        except Exception as e:  # noqa: BLE001 - every failure counts, the soak goes on
            tally.add("failed", error=repr(e)[:300])


def nvidia_smi(field: str) -> list[str] | None:
    """One line per GPU of ``nvidia-smi --query-gpu=field``; None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines() if out.returncode == 0 else None


def memory_mb(server_pid: int | None) -> tuple[float | None, str]:
    """(MiB, kind): GPU memory used on all GPUs ("gpu"), else the server process tree's
    resident memory ("rss"; None for a server not started here)."""
    used = nvidia_smi("memory.used")
    if used is not None:
        return sum(float(x) for x in used), "gpu"
    if server_pid is None:
        return None, "rss"
    import psutil

    root = psutil.Process(server_pid)
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20, "rss"


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="OpenAI-compatible base URL of a running server")
    ap.add_argument("--model-path", help="start sglang with --attention-backend sfi on this model")
    ap.add_argument("--tiny", action="store_true", help="start a CPU server on a tiny random-weight model")
    ap.add_argument("--server-args", default="--cuda-graph-backend-prefill disabled --enable-metrics")
    ap.add_argument("--sfi-config", default=None, help="SFI_CONFIG for a server started here")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--turn-words", type=int, default=400, help="most words a turn adds")
    ap.add_argument("--max-words", type=int, default=6000, help="a session starts over past this many words")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--abort-frac", type=float, default=0.1)
    ap.add_argument("--out", default=None, help="result JSON (default: a new file in the temporary folder, printed)")
    args = ap.parse_args()
    if sum(map(bool, (args.url, args.model_path, args.tiny))) != 1:
        ap.error("give one of --url, --model-path, --tiny")
    if args.out is None:
        args.out = default_out("soak")
    print("results go to", args.out, flush=True)

    log_path = os.path.join(tempfile.mkdtemp(prefix="sfi-soak-"), "server.log")
    with contextlib.ExitStack() as stack:
        url, pid, env, model_path, extra = args.url, None, None, args.model_path, args.server_args.split()
        if args.tiny:
            from sfi_sglang.cpu_env import cpu_engine_env
            from sfi_sglang.dummy_model import write_dummy_model, write_random_weights

            model_path = write_dummy_model(tempfile.mkdtemp(prefix="sfi-tiny-"), "tiny")
            write_random_weights(model_path)
            env, extra = cpu_engine_env(), [*extra, "--device", "cpu", "--max-total-tokens", "32768"]
            # 4K-token context, byte tokens: short turns, and a small budget so fast steps are sparse
            args.max_words, args.turn_words = min(args.max_words, 300), min(args.turn_words, 60)
            args.sfi_config = args.sfi_config or '{"topk": 64, "recent": 32, "log_interval": 100}'
        if model_path:
            env = dict(env or os.environ)
            if args.sfi_config:
                env["SFI_CONFIG"] = args.sfi_config
            log = stack.enter_context(open(log_path, "w"))
            srv = stack.enter_context(LocalServer(model_path, extra, env=env, log=log))
            url, pid = srv.url, srv.proc.pid
        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id

        tally, samples = Tally(), []
        t0 = time.time()
        deadline = t0 + 60 * args.minutes
        threads = [threading.Thread(target=session, args=(client, model, i, deadline, args, tally), daemon=True)
                   for i in range(args.sessions)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples.append((time.time() - t0, *memory_mb(pid)))
            time.sleep(5)
        for t in threads:
            t.join()
        alive, alive_error = True, None
        try:  # a fresh client: a pooled connection that an aborted session left closed is no sign of a dead server
            OpenAI(base_url=url, api_key="none", max_retries=2, timeout=60).models.list()
        except Exception as e:  # noqa: BLE001
            alive, alive_error = False, repr(e)
        sfi_metrics = metric_totals(url)  # sfi's Prometheus values (None without --enable-metrics)

    window = min(60.0, 15.0 * args.minutes)
    mem = [(t, m) for t, m, _ in samples if m is not None]
    last = mem[-1][0] if mem else 0.0
    server_log = open(log_path).read() if os.path.exists(log_path) else ""
    result = {
        "date": datetime.date.today().isoformat(), "gpu": (nvidia_smi("name") or [None])[0],
        "url": url if args.url else None,
        "model": "tiny (CPU)" if args.tiny else (args.model_path or model), "minutes": args.minutes,
        "sessions": args.sessions, "requests": tally.requests, "failed": tally.failed, "aborted": tally.aborted,
        "memory": samples[-1][2] if samples else None,
        "max_gpu_mem_mb_start": max((m for t, m in mem if t <= window), default=None),
        "max_gpu_mem_mb_end": max((m for t, m in mem if t >= last - window), default=None),
        "p50_ms": percentile(tally.latencies_ms, 0.5), "p99_ms": percentile(tally.latencies_ms, 0.99),
        "server_alive_after": alive, "alive_error": alive_error, "server_tracebacks": server_log.count("Traceback"),
        "sfi_log": [ln for ln in server_log.splitlines() if "SFI:" in ln][-1:], "sfi_metrics": sfi_metrics,
        "errors": tally.errors,
    }
    # the server's torch allocator (logged with sfi's counters on GPUs): first and last reading
    alloc = ALLOCATOR.findall(server_log)
    if alloc:
        result.update(torch_allocated_mb_first=float(alloc[0][0]), torch_allocated_mb_last=float(alloc[-1][0]),
                      torch_reserved_mb_first=float(alloc[0][1]), torch_reserved_mb_last=float(alloc[-1][1]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
