"""Greedy generation with a dense backend and with sfi on the same model, one process.

Run by tests/serving/test_e2e_cpu.py in a subprocess (sglang spawns its own workers) and on
the GPU machine. Prints one JSON line: the greedy tokens per backend, where they diverge, and the largest
logprob difference of the sampled tokens over the common prefix. ``--across-tp N`` instead
compares each backend with itself at tp 1 and tp N (the dense backend's gap is the tolerance).

usage: python tests/serving/engine_compare.py MODEL_DIR DENSE_BACKEND [--device cpu] [--load-format dummy] [--dtype auto] [--prompts N] ...
"""

from __future__ import annotations

import argparse
import json
import os
import random


def prompts(n: int, length: int, seed: int = 0, shared: bool = False) -> list[list[int]]:
    """Token-id prompts with sentence and line ends sprinkled in (byte tokenizer: '.'=46, '\\n'=10).

    ``shared``: prefixes of one text, as the turns of an agent loop re-send a growing
    history: the first two are the same, each later one extends the one before.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(97, 123) for _ in range(length + 37 * i)]
        for j in range(20, len(ids), 23):
            ids[j] = rng.choice([46, 10, 63])
        out.append(ids)
    if shared:
        out = [out[-1][: length + 37 * max(i - 1, 0)] for i in range(n)]
    return out


def generate(model: str, backend: str, args, input_ids: list[list[int]], *more: list[list[int]],
             tp: int = 1) -> list[dict]:
    """Greedy outputs of ``input_ids`` (then of each of ``more``, on the same engine, appended),
    tensor parallel over ``tp`` GPUs."""
    import sglang as sgl

    kw = dict(
        model_path=model, attention_backend=backend, load_format=args.load_format, device=args.device,
        random_seed=0, mem_fraction_static=args.mem_fraction, max_total_tokens=args.max_total_tokens,
        cuda_graph_backend_prefill="disabled", log_level=args.log_level,
        disable_overlap_schedule=args.disable_overlap, max_running_requests=args.max_running_requests,
        tp_size=tp, dtype=args.dtype,
    )
    if args.mixed_chunk:  # prefill chunks share batches with running decodes (sglang skips it with logprobs)
        kw.update(enable_mixed_chunk=True, chunked_prefill_size=64)
    if args.device == "cpu":
        kw.update(cuda_graph_backend_decode="disabled")
    else:
        kw.update(cuda_graph_max_bs_decode=8)
    engine = sgl.Engine(**kw)
    try:
        outs = []
        logprob = not args.mixed_chunk
        for batch in (input_ids, *more):
            # Different lengths: requests leave at different steps and, with a small
            # --max-running-requests, queued ones join a running batch and reuse req-pool slots.
            sampling = [
                {"temperature": 0.0, "max_new_tokens": args.new_tokens + 8 * i, "ignore_eos": True}
                for i in range(len(batch))
            ]
            if args.sequential:  # one request at a time, each after the previous one finished
                outs += [engine.generate(input_ids=i, sampling_params=s, return_logprob=logprob)
                         for i, s in zip(batch, sampling)]
            else:
                outs += engine.generate(input_ids=batch, sampling_params=sampling, return_logprob=logprob)
        return [
            {"ids": o["output_ids"], "logprobs": [t[0] for t in o["meta_info"].get("output_token_logprobs", [])],
             "coverage": (o["meta_info"].get("sfi_coverage") or [None])[-1]}
            for o in outs
        ]
    finally:
        engine.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("dense")
    p.add_argument("--device", default="cuda")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--mem-fraction", type=float, default=0.5)
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--disable-overlap", action="store_true")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--shared-prefix", action="store_true", help="prompts re-send a growing shared prefix")
    p.add_argument("--sequential", action="store_true", help="send the prompts one after another")
    p.add_argument("--mixed-chunk", action="store_true",
                   help="--enable-mixed-chunk, 64-token prefill chunks (no logprobs: sglang does not mix with them)")
    p.add_argument("--repeat-in-batch", action="store_true",
                   help="sfi only: the first prompt alone, then all prompts in one batch (the first one again)")
    p.add_argument("--sfi-only", action="store_true", help="no dense run (for checks on sfi's own counters)")
    p.add_argument("--across-tp", type=int, default=None,
                   help="each backend at tp 1 and at this tp: how far the greedy tokens agree")
    args = p.parse_args()
    ids = prompts(args.prompts, args.prompt_len, shared=args.shared_prefix)
    if args.across_tp:
        out = {}
        for backend in (args.dense, "sfi"):
            one, many = generate(args.model, backend, args, ids), generate(args.model, backend, args, ids, tp=args.across_tp)
            out[backend] = {"first_divergence": [first_divergence(a["ids"], b["ids"]) for a, b in zip(one, many)],
                            "max_logprob_diff": max_logprob_diff(one, many), "new_tokens": [len(a["ids"]) for a in one]}
        print("RESULT " + json.dumps({"tp": args.across_tp, **out, "sfi_config": os.environ.get("SFI_CONFIG", "")}))
        return
    if args.repeat_in_batch:
        outs = generate(args.model, "sfi", args, ids[:1], ids)
        print("RESULT " + json.dumps({"alone": outs[0]["ids"], "busy": [o["ids"] for o in outs[1:]]}))
        return
    dense = None if args.sfi_only else generate(args.model, args.dense, args, ids)
    sfi = generate(args.model, "sfi", args, ids)
    out = {"sfi": [s["ids"] for s in sfi], "sfi_coverage": [s["coverage"] for s in sfi],
           "sfi_config": os.environ.get("SFI_CONFIG", "")}
    if dense is not None:
        out.update(dense=[d["ids"] for d in dense],
                   first_divergence=[first_divergence(d["ids"], s["ids"]) for d, s in zip(dense, sfi)],
                   max_logprob_diff=max_logprob_diff(dense, sfi))
    print("RESULT " + json.dumps(out))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def max_logprob_diff(a: list[dict], b: list[dict]) -> float | None:
    """Largest |logprob difference| of the sampled token, over each pair's common prefix (None: no logprobs)."""
    if not any(d["logprobs"] for d in a):
        return None
    diffs = [0.0]
    for d, s in zip(a, b):
        n = first_divergence(d["ids"], s["ids"])
        n = len(d["ids"]) if n is None else n + 1
        diffs += [abs(x - y) for x, y in zip(d["logprobs"][:n], s["logprobs"][:n])]
    return max(diffs)


if __name__ == "__main__":
    main()
