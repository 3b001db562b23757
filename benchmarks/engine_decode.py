"""Steady-state decode step time as a server runs it: an sglang Engine (overlap scheduler and
decode CUDA graphs on), one process per backend; run by ``bench_decode.py --runner engine``.

For each batch size: ``batch`` random prompts of ``input_len`` tokens are prefilled once
(``max_new_tokens`` 1, which leaves them in the radix cache), decoded once over the cached
prefixes for up to 128 steps (a warm-up past several slow steps: nothing compiles inside the timed
steps), then sent twice more: with 1 and with ``1 + output_len`` new tokens. The decode step time is the
difference of those two wall times over ``output_len``: prefill, tokenizer and queueing costs
cancel, and the host work of each step overlaps the GPU work of the one before, as in serving
(sglang's one-batch benchmark runs each step synchronously, so its host time adds to every step).
The pair of sends is timed ``REPEATS`` times; ``step_s`` is the median, ``step_s_runs`` all of them:
single pairs at 16 x 8K gave 4.4 to 6.6 ms per step for the same backend in different calls (H200,
``results/decode_logit_*_h200.json``), and a negative step time for FlashInfer once.
Writes one JSON line per batch size: ``batch_size, input_len, output_len, step_s, step_s_runs``.

With ``--profile-steps N``, the largest batch then decodes N more steps under sglang's profiler
(``Engine.start_profile``); its row gets ``profile``: where those steps' time went
(``trace_summary.py``: GPU busy and idle time, kernels by category, host calls, sfi's ranges).

With ``--stagger N``, each row also gets ``staggered_step_s``: the same two sends, but request
``i`` submitted ``i * N`` steps (of the synchronized step time) after the first, as requests
arrive in serving. sfi's forced slow steps then fall on different steps for different requests
(requests sent N steps apart refresh N steps apart, instead of all at once every ``R`` steps), so
the refresh's fixed per-call cost is paid once per request instead of once per batch.

    python benchmarks/engine_decode.py MODEL BACKEND --input-len 8192 --batch-size 1 16 --result-filename F
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_summary import profiled  # noqa: E402


WARM_UP_STEPS = 128  # decode steps before timing: more than sfi's forced refresh interval in bench_decode
REPEATS = 3  # timed (short, long) pairs per measurement


def pool_tokens(batch: int, input_len: int, output_len: int) -> int:
    """KV pool size: the batch's prompts and outputs plus room for the outputs that the radix cache
    keeps from earlier sends (warm-up and timed), so that no send has to evict a cached prompt or
    wait for memory (the pool held exactly the batch's tokens when single timings spread)."""
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
    ap.add_argument("--result-filename", required=True)
    args = ap.parse_args()

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

            def run(new_tokens: int, gap_s: float = 0.0) -> float:
                """Wall time of the batch with ``new_tokens`` each: one call, or request ``i`` sent ``i * gap_s`` late."""
                nonlocal uncached
                sampling = {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}

                async def one(i: int) -> dict:
                    await asyncio.sleep(i * gap_s)
                    return await engine.async_generate(input_ids=prompts[i], sampling_params=sampling)

                async def staggered() -> list[dict]:
                    return await asyncio.gather(*(one(i) for i in range(bs)))

                t0 = time.perf_counter()
                if gap_s:
                    outs = engine.loop.run_until_complete(staggered())
                else:
                    outs = engine.generate(input_ids=prompts, sampling_params=sampling)
                wall = time.perf_counter() - t0
                assert all(len(o["output_ids"]) == new_tokens for o in outs)
                uncached += sum(max(0, args.input_len - 1 - o["meta_info"]["cached_tokens"]) for o in outs)
                return wall

            run(1)  # prefill into the radix cache
            # then decode over the cached prefixes, past a few slow steps, before timing: whatever compiles
            # on first use (FlashInfer's JIT, Triton variants) must not land in the timed steps
            run(1 + min(WARM_UP_STEPS, args.output_len))
            uncached = 0  # from here on: the timed sends, whose prompts must all be cached

            def step_times(gap_s: float = 0.0) -> list[float]:
                """Decode step time from ``REPEATS`` pairs of sends, sorted."""
                times = []
                for _ in range(REPEATS):
                    short = run(1, gap_s)
                    times.append((run(1 + args.output_len, gap_s) - short) / args.output_len)
                return sorted(times)

            runs = step_times()
            row = {"batch_size": bs, "input_len": args.input_len, "output_len": args.output_len,
                   "step_s": runs[REPEATS // 2], "step_s_runs": runs}
            if args.stagger:
                runs = step_times(args.stagger * row["step_s"])
                row["staggered_step_s"], row["staggered_step_s_runs"] = runs[REPEATS // 2], runs
            row["uncached_prompt_tokens"] = uncached
            if args.profile_steps and bs == top:
                row["profile"] = profiled(engine, args.profile_steps, lambda: run(2 + args.profile_steps),
                                          args.profile_dir, args.device == "cuda")
            print(json.dumps(row), flush=True)
            with open(args.result_filename, "a") as f:
                f.write(json.dumps(row) + "\n")
            engine.flush_cache()
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
