"""How real Selector scores fall into the top-k kernel's radix bins (SmolLM2-135M on the CPU, default
config): for each (row, KV head) the Selector ranks, the share of its candidates whose key shares the
k-th key's high digit, over the whole row and per chunk of ``BLOCK_N`` candidates (the kernel's
smallest chunk). Pass 2 of ``kernels/topk_select.py`` counts those keys by atomic adds when a chunk
holds few (at most 1/``ATOMIC_SHARE``), by ``tl.histogram`` otherwise, and skips chunks holding none:
this says which path real scores take (the benchmarks' random keys give flat attention). Also the
same share for a high digit one bit wider (the whole exponent: bins one octave wide).

    python benchmarks/topk_bin_share.py [--contexts 7900] [--steps 64] [--corpus-offset 48936] [--out F]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import fidelity  # noqa: E402
from sfi_sglang import selector  # noqa: E402
from sfi_sglang.kernels.topk_select import ATOMIC_SHARE, BLOCK_N, LOW_BITS, SHIFT  # noqa: E402


def bin_shares(scores: torch.Tensor, positions: torch.Tensor, k: int, low_bits: int) -> dict:
    """Shares of candidates in the k-th key's high bin (high digit = key >> ``low_bits``) for each
    (row, head) of ``scores [S, H, N]`` (invalid candidates: positions < 0), whole rows and per
    chunk of ``BLOCK_N``."""
    keys = torch.where(positions >= 0, (scores.float().contiguous().view(torch.int32) >> SHIFT.value) + 1, 0)
    keys = keys.expand(scores.shape).reshape(-1, scores.shape[-1])
    kth = keys.topk(min(k, keys.shape[-1]), -1).values[:, -1:]
    in_bin = ((keys >> low_bits) == (kth >> low_bits)) & (kth > 0)
    n = keys.shape[-1]
    pad = -n % BLOCK_N
    chunks = torch.nn.functional.pad(in_bin.float(), (0, pad)).view(in_bin.shape[0], -1, BLOCK_N).sum(-1)
    lens = torch.full_like(chunks, BLOCK_N)
    lens[:, -1] = BLOCK_N - pad
    share = chunks / lens
    return {"row_share": in_bin.float().mean(-1), "chunk_share": share.flatten()}


def worker(spec_path: str) -> None:
    """The sfi half of ``fidelity.worker`` with the Selector's top-k observed."""
    rows: dict[str, list[torch.Tensor]] = {"7": [], "8": []}
    chunks: dict[str, list[torch.Tensor]] = {"7": [], "8": []}
    topk_positions = selector.topk_positions

    def observed(scores, positions, k):
        for name, low in (("7", LOW_BITS.value), ("8", LOW_BITS.value - 1)):
            s = bin_shares(scores, positions, k, low)
            rows[name].append(s["row_share"])
            chunks[name].append(s["chunk_share"])
        return topk_positions(scores, positions, k)

    selector.topk_positions = observed
    with open(spec_path) as f:
        fidelity.worker(json.load(f))
    out = {}
    for name in rows:
        r, c = torch.cat(rows[name]), torch.cat(chunks[name])
        out[f"high digit {name} bits"] = {
            "rows": r.numel(), "row_share_median": r.median().item(), "row_share_p90": r.quantile(0.9).item(),
            "row_share_max": r.max().item(), "chunks": c.numel(),
            "chunks_none": (c == 0).float().mean().item(),
            "chunks_atomic": ((c > 0) & (c * ATOMIC_SHARE.value <= 1)).float().mean().item(),
            "chunks_histogram": (c * ATOMIC_SHARE.value > 1).float().mean().item()}
    print("SHARES " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--contexts", type=int, nargs="+", default=[7900])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--corpus-offset", type=int, default=48936)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    from transformers import AutoTokenizer

    from sfi_sglang.cpu_env import cpu_engine_env

    model = fidelity.prepare_model(fidelity.MODEL_DIR)
    ids = AutoTokenizer.from_pretrained(model).encode(fidelity.corpus_text())
    need = args.corpus_offset + sum(args.contexts) + len(args.contexts) * args.steps
    env = cpu_engine_env()
    dense_logp = os.path.join(tempfile.gettempdir(), f"sfi_bin_share_dense_{os.getpid()}.pt")
    spec = {"model": model, "device": "cpu", "contexts": args.contexts, "steps": args.steps,
            "corpus_ids": ids[args.corpus_offset:need], "passkey_prompts": [], "dense_logp": dense_logp}
    fidelity.run_worker({**spec, "backend": "torch_native"}, env)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**spec, "backend": "sfi"}, f)
    proc = subprocess.run([sys.executable, __file__, "--worker", f.name], capture_output=True, text=True,
                          env={**env, "SFI_CONFIG": json.dumps({"log_interval": 0})})
    os.unlink(f.name)
    os.unlink(dense_logp)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SHARES ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"sfi worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = {"model": fidelity.MODEL_NAME, "contexts": args.contexts, "steps": args.steps,
              "corpus_offset": args.corpus_offset, "chunk": BLOCK_N, "atomic_share": ATOMIC_SHARE.value,
              **json.loads(lines[-1][len("SHARES "):])}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
