"""Launch-shape sweep of ``sfi_decode`` on one GPU (inside CUDA graphs, one Qwen3-4B layer).

    python benchmarks/tune_sfi_decode.py [--out PATH]

Times every :class:`Launch` (tokens per loop step, tokens per split, warps, pipeline stages) on
fast rows (sparse lists of ``kept`` tokens) and slow rows (dense) at the shapes the decode
benchmark runs, then prints, per batch size, the launch with the lowest total time over that
batch's shapes next to the current :func:`launch_for` choice. The chosen rule goes into
``launch_for`` by hand, with the numbers that justify it.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from out_path import default_out  # noqa: E402
from bench_kernels import CFG, SCALE, Case, decode_case, kv_bytes, timed  # noqa: E402
from bench_decode import copy_bandwidth  # noqa: E402
from sfi_sglang.kernels.sfi_decode import Launch, launch_for, sfi_decode  # noqa: E402
from sfi_sglang.memory import SelectionStore  # noqa: E402

# (batch, context, kept per KV head or None for dense slow rows)
SHAPES = [(1, 32768, 2048), (1, 131072, None), (8, 32768, 2048), (8, 32768, 4096), (16, 8192, 2048),
          (16, 16384, 256), (16, 32768, None), (32, 8192, 2048), (32, 32768, 4096)]
LAUNCHES = [Launch(b, c, w, s) for b, c, w, s in itertools.product(
    (32, 64, 128), (64, 128, 256, 512), (4, 8), (2, 3, 4)) if c >= b]


def decode_call(c: Case, store: SelectionStore, slow: torch.Tensor, launch: Launch):
    return lambda: sfi_decode(c.q, c.k, c.v, c.req_to_token, c.slots, c.seq_lens, slow, store.hi, store.count,
                              store.pos[0], CFG.sinks, SCALE, launch=launch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", default=20, type=int)
    ap.add_argument("--out", default=None, help="result JSON (default: a new file in the temporary folder, printed)")
    args = ap.parse_args()
    if args.out is None:
        args.out = default_out("tune-sfi-decode")
    print("results go to", args.out, flush=True)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s, {len(LAUNCHES)} launches")
    rows = []
    for bs, ctx, kept in SHAPES:
        c, store, flags = decode_case(bs, ctx, kept, dev)
        slow = kept is None
        nbytes = kv_bytes(bs, ctx if slow else kept)
        for launch in LAUNCHES:
            try:
                t, _ = timed(decode_call(c, store, flags, launch), args.iters, True)
            except Exception as e:  # a launch the compiler rejects (e.g. out of shared memory)
                print(f"  {launch}: {type(e).__name__}")
                continue
            rows.append({"batch": bs, "context": ctx, "kept": kept, **launch.__dict__, "time_us": t,
                         "hbm_frac": nbytes / (t * 1e-6) / bw})
        best = min((r for r in rows if (r["batch"], r["context"], r["kept"]) == (bs, ctx, kept)),
                   key=lambda r: r["time_us"])
        print(f"bs {bs:>2} ctx {ctx:>6} kept {kept or 'dense':>5}: best {best['time_us']:8.1f} us "
              f"({100 * best['hbm_frac']:.0f}% BW) {Launch(*(best[k] for k in Launch.__dataclass_fields__))}",
              flush=True)

    print("\nper batch: launch with the lowest summed time over the batch's shapes vs launch_for")
    for bs in sorted({s[0] for s in SHAPES}):
        mine = [r for r in rows if r["batch"] == bs]
        n_shapes = len({(r["context"], r["kept"]) for r in mine})
        total: dict[Launch, list[float]] = {}
        for r in mine:
            total.setdefault(Launch(*(r[k] for k in Launch.__dataclass_fields__)), []).append(r["time_us"])
        complete = {launch: sum(ts) for launch, ts in total.items() if len(ts) == n_shapes}
        best = min(complete, key=complete.get)
        cur = complete.get(launch_for(bs))
        print(f"bs {bs:>2}: best {best} {complete[best]:.1f} us; launch_for {launch_for(bs)} "
              + (f"{cur:.1f} us ({cur / complete[best]:.2f}x)" if cur else "not timed"))
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                   "copy_bw_gbs": bw / 1e9, "rows": rows}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
