"""Greedy generation with a dense backend and with sfi on the same model, one process.

Run by tests/test_e2e_cpu.py in a subprocess (sglang spawns its own workers) and on
the GPU machine. Prints one JSON line: the greedy tokens per backend.

usage: python tests/engine_compare.py MODEL_DIR DENSE_BACKEND [--device cpu] [--load-format dummy] [--prompts N] ...
"""

from __future__ import annotations

import argparse
import json
import os
import random


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts with sentence and line ends sprinkled in (byte tokenizer: '.'=46, '\\n'=10)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(97, 123) for _ in range(length + 37 * i)]
        for j in range(20, len(ids), 23):
            ids[j] = rng.choice([46, 10, 63])
        out.append(ids)
    return out


def generate(model: str, backend: str, args, input_ids: list[list[int]]) -> list[list[int]]:
    import sglang as sgl

    kw = dict(
        model_path=model, attention_backend=backend, load_format=args.load_format, device=args.device,
        random_seed=0, mem_fraction_static=args.mem_fraction, max_total_tokens=args.max_total_tokens,
        cuda_graph_backend_prefill="disabled", log_level=args.log_level,
        disable_overlap_schedule=args.disable_overlap,
    )
    if args.device == "cpu":
        kw.update(cuda_graph_backend_decode="disabled")
    else:
        kw.update(cuda_graph_max_bs_decode=8)
    engine = sgl.Engine(**kw)
    try:
        sampling = {"temperature": 0.0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
        outs = engine.generate(input_ids=input_ids, sampling_params=sampling)
        return [o["output_ids"] for o in outs]
    finally:
        engine.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("dense")
    p.add_argument("--device", default="cuda")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--mem-fraction", type=float, default=0.5)
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--disable-overlap", action="store_true")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args()
    ids = prompts(args.prompts, args.prompt_len)
    dense = generate(args.model, args.dense, args, ids)
    sfi = generate(args.model, "sfi", args, ids)
    print("RESULT " + json.dumps({"dense": dense, "sfi": sfi, "sfi_config": os.environ.get("SFI_CONFIG", "")}))


if __name__ == "__main__":
    main()
