"""Steady-state decode step time as a server runs it: an sglang Engine (overlap scheduler and
decode CUDA graphs on), one process per backend; run by ``bench_decode.py --runner engine``.

For each batch size: ``batch`` random prompts of ``input_len`` tokens are prefilled once
(``max_new_tokens`` 1, which leaves them in the radix cache), decoded once over the cached
prefixes for up to 128 steps (a warm-up past several slow steps: nothing compiles inside the timed
steps), then sent ``REPEATS`` more times with ``1 + output_len`` new tokens each, streamed. A
request's decode step time is the time from its first streamed chunk (the token its prefill made)
to its last, over the tokens generated in between (:func:`decode_step_time`): both ends are clock
readings inside one send, so prefill, tokenizer and queueing stay outside the interval, and the
host work of each step overlaps the GPU work of the one before, as in serving (sglang's one-batch
benchmark runs each step synchronously, so its host time adds to every step). A send's step time
is the median over its requests; ``step_s`` is the median over the sends, ``step_s_runs`` all of
them. The step time is not taken as the difference of two sends' wall times (a long send minus a
short one): a stall in the shorter send (a compile, a prefill that missed the cache) would be
subtracted from the decode time, and the result could come out low or negative.

:func:`check_step_times` refuses a non-positive step time (the batch size's row is not written;
the process exits non-zero) and lists sends more than ``SPREAD`` from their median in the row's
``timing_warnings``.

Writes one JSON line per batch size: ``batch_size, input_len, output_len, step_s, step_s_runs,
uncached_prompt_tokens, timing_warnings`` (``uncached_prompt_tokens``: prompt tokens the timed sends
prefilled again, expected 0).

With ``--profile-steps N``, the largest batch then decodes N more steps under sglang's profiler
(``Engine.start_profile``); its row gets ``profile``: where those steps' time went
(``trace_summary.py``: GPU busy and idle time, kernels by category, host calls, sfi's ranges).

With ``--stagger N``, each row also gets ``staggered_step_s`` (and ``_runs``): the same sends, but
request ``i`` submitted ``i * N`` steps (of the synchronized step time) after the first, as requests
arrive in serving. sfi's forced slow steps then fall on different steps for different requests
(requests sent N steps apart refresh N steps apart, instead of all at once every ``R`` steps).

    python benchmarks/engine_decode.py MODEL BACKEND --input-len 8192 --batch-size 1 16 --result-filename F
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_summary import profiled  # noqa: E402


WARM_UP_STEPS = 128  # decode steps before timing: more than sfi's forced refresh interval in bench_decode
REPEATS = 3  # timed sends per measurement
STREAM_INTERVAL = 64  # tokens per streamed chunk: only the first and the last chunk are needed
SPREAD = 0.1  # a send further than this from the median of its measurement is flagged


class TimingError(ValueError):
    """A step time that cannot be right (not positive, or no tokens timed)."""


def decode_step_time(chunks: list[tuple[float, int]]) -> float:
    """Seconds per decode step of one streamed request, from its chunks' ``(arrival time, tokens so
    far)``: the time from the first chunk to the last over the tokens generated in between."""
    if len(chunks) < 2:
        raise TimingError(f"{len(chunks)} streamed chunk(s): need the first and the last")
    (t0, n0), (t1, n1) = chunks[0], chunks[-1]
    if n1 <= n0:
        raise TimingError(f"no tokens between the first and the last chunk ({n0} -> {n1})")
    if not t1 > t0:
        raise TimingError(f"{t1 - t0:.6f} s from the first chunk to the last, over {n1 - n0} tokens")
    return (t1 - t0) / (n1 - n0)


def check_step_times(runs: list[float], floor_s: float | None = None, spread: float | None = SPREAD) -> list[str]:
    """Check the step times of one measurement's sends (seconds). Raises :class:`TimingError` if any is
    not positive; returns warnings for sends further than ``spread`` (a fraction; None: not checked)
    from the median, and for sends faster than ``floor_s`` (the time the step's bytes take at copy
    bandwidth), which no step can beat."""
    if not runs:
        raise TimingError("no timed sends")
    bad = [t for t in runs if not t > 0]  # `not >` also catches NaN
    if bad:
        raise TimingError(f"non-positive step time(s) {bad} among {runs}")
    med = statistics.median(runs)
    warnings = [f"send {i}: {1e3 * t:.3f} ms per step, {100 * (t / med - 1):+.1f}% from the median "
                f"{1e3 * med:.3f} ms" for i, t in enumerate(runs) if spread is not None and abs(t / med - 1) > spread]
    if floor_s is not None:
        warnings += [f"send {i}: {1e3 * t:.3f} ms per step, under the {1e3 * floor_s:.3f} ms its bytes take "
                     "at copy bandwidth" for i, t in enumerate(runs) if t < floor_s]
    return warnings


def pool_tokens(batch: int, input_len: int, output_len: int) -> int:
    """KV pool size: the batch's prompts and outputs plus room for the outputs that the radix cache
    keeps from earlier sends (warm-up and timed), so that no send has to evict a cached prompt or
    wait for memory."""
    return batch * (input_len + 2 * (output_len + WARM_UP_STEPS + 64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("backend")
    ap.add_argument("--input-len", type=int, required=True)
    ap.add_argument("--batch-size", type=int, nargs="+", required=True)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--mem-fraction-static", type=float, default=None)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stagger", type=int, default=0, help="also measure with request i sent i*N steps late")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="then profile this many steps of the largest batch (sglang's profiler); summary in its row")
    ap.add_argument("--profile-dir", default=None, help="where the trace goes (default: a temporary folder)")
    ap.add_argument("--result-filename", required=True, help="JSON lines are appended to this file")
    args = ap.parse_args()
    if args.output_len < 1:
        ap.error("--output-len must be at least 1")

    import asyncio

    import sglang as sgl

    with open(os.path.join(args.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    top = max(args.batch_size)
    kw = dict(model_path=args.model, attention_backend=args.backend, load_format=args.load_format,
              tp_size=args.tp_size, device=args.device, mem_fraction_static=args.mem_fraction_static,
              context_length=args.input_len + args.output_len + 64, max_running_requests=top,
              max_total_tokens=pool_tokens(top, args.input_len, args.output_len),
              cuda_graph_backend_prefill="disabled", random_seed=0, log_level="info")  # info: sfi counters
    if args.device == "cuda":
        kw["cuda_graph_max_bs_decode"] = top
    else:
        kw["cuda_graph_backend_decode"] = "disabled"
    engine = sgl.Engine(**kw)
    rng = random.Random(0)
    failed = False
    try:
        info = engine.get_server_info()  # the whole batch must run at once, or the step time is not its
        need = top * (args.input_len + args.output_len + 1)
        if info["max_total_num_tokens"] < need or info["max_running_requests"] < top:
            raise SystemExit(f"{args.backend}: the KV pool holds {info['max_total_num_tokens']} tokens and "
                             f"{info['max_running_requests']} requests; batch {top} needs {need} and {top}: "
                             "raise --mem-fraction-static")
        for bs in args.batch_size:
            prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(bs)]
            uncached = 0  # prompt tokens the sends prefilled again (beyond the last one, always recomputed)

            def send(new_tokens: int, gap_s: float = 0.0, timed: bool = True) -> float | None:
                """One send of the batch with ``new_tokens`` each, streamed (request ``i`` sent ``i * gap_s``
                late); if ``timed``, returns its decode step time, the median over its requests."""
                nonlocal uncached
                sampling = {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True,
                            "stream_interval": STREAM_INTERVAL}

                async def streamed(ids: list[list[int]], delay: float = 0.0) -> list[tuple[list, dict]]:
                    """``(chunks, last meta_info)`` per prompt of one request (a batch request when
                    several: they enter the scheduler together)."""
                    await asyncio.sleep(delay)
                    chunks, metas = [[] for _ in ids], [{} for _ in ids]
                    stream = await engine.async_generate(input_ids=ids, sampling_params=sampling, stream=True)
                    async for out in stream:
                        i, meta = out.get("index", 0), out["meta_info"]
                        chunks[i].append((time.perf_counter(), meta["completion_tokens"]))
                        metas[i] = meta
                    return list(zip(chunks, metas))

                async def staggered() -> list[tuple[list, dict]]:
                    parts = await asyncio.gather(*(streamed([prompts[i]], i * gap_s) for i in range(bs)))
                    return [part[0] for part in parts]

                outs = engine.loop.run_until_complete(staggered() if gap_s else streamed(prompts))
                assert all(meta["completion_tokens"] == new_tokens for _, meta in outs)
                uncached += sum(max(0, args.input_len - 1 - meta["cached_tokens"]) for _, meta in outs)
                return statistics.median(decode_step_time(chunks) for chunks, _ in outs) if timed else None

            send(1, timed=False)  # prefill into the radix cache
            # then decode over the cached prefixes, past a few slow steps, before timing: whatever compiles
            # on first use (FlashInfer's JIT, Triton variants) must not land in the timed steps
            send(1 + min(WARM_UP_STEPS, args.output_len), timed=False)
            uncached = 0  # from here on: the timed sends, whose prompts must all be cached

            def measure(key: str, gap_s: float = 0.0) -> None:
                """``REPEATS`` timed sends: their median step time into ``row[key]``, all of them into
                ``row[key + "_runs"]``, warnings into ``row["timing_warnings"]``."""
                runs = sorted(send(1 + args.output_len, gap_s) for _ in range(REPEATS))
                warnings = check_step_times(runs)  # raises on a non-positive step time
                row[key], row[key + "_runs"] = statistics.median(runs), runs
                row["timing_warnings"] += [f"{key} {w}" for w in warnings]
                for w in warnings:
                    print(f"timing warning, batch {bs}: {key} {w}", file=sys.stderr, flush=True)

            row = {"batch_size": bs, "input_len": args.input_len, "output_len": args.output_len,
                   "timing_warnings": []}
            try:
                measure("step_s")
                if args.stagger:
                    measure("staggered_step_s", args.stagger * row["step_s"])
            except TimingError as e:
                print(f"batch {bs}: timing refused: {e}", file=sys.stderr, flush=True)
                failed = True
                engine.flush_cache()
                continue
            row["uncached_prompt_tokens"] = uncached
            if args.profile_steps and bs == top:
                row["profile"] = profiled(engine, args.profile_steps, lambda: send(2 + args.profile_steps, timed=False),
                                          args.profile_dir, args.device == "cuda")
            print(json.dumps(row), flush=True)
            with open(args.result_filename, "a") as f:
                f.write(json.dumps(row) + "\n")
            engine.flush_cache()
    finally:
        engine.shutdown()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
