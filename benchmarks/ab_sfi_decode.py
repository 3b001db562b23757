"""A/B on one GPU, same run, inside CUDA graphs: ``sfi_decode`` against a previous version of it
(a path, default ``gpurun/sfi_decode_main.py``: ``git show <rev>:kernels/sfi_decode.py``), one Qwen3-4B layer,
fast rows (sparse lists) and slow rows (dense, with and without kept logits). Four columns: the
previous kernel at its own launch, this one at the previous launch (the kernel change alone), this
one at its own ``launch_for``, the previous one again (the run-order control). Outputs checked close.
Each call also saves the queries for the Selector as the backend does: through the kernel's ``q_out``
where it has one, else by a copy before it. ``python benchmarks/ab_sfi_decode.py [PATH]``"""
import inspect
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench_decode import copy_bandwidth  # noqa: E402
from bench_kernels import CFG, HKV, SCALE, decode_case, kv_bytes, load_file, timed  # noqa: E402
from sfi_sglang.kernels import sfi_decode as new  # noqa: E402

SHAPES = [(1, 32768, 2048), (2, 32768, 2048), (8, 32768, 2048), (16, 8192, 2048), (32, 8192, 2048),
          (16, 32768, 4096), (1, 16384, None), (1, 131072, None), (2, 65536, None), (8, 32768, None),
          (16, 32768, None), (32, 8192, None)]


def main() -> None:
    old = load_file("sfi_decode_prev", sys.argv[1] if len(sys.argv) > 1 else "gpurun/sfi_decode_main.py")
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy {bw / 1e12:.2f} TB/s; us per call (% of copy bandwidth):"
          " previous / this kernel at the previous launch / this kernel at its launch / previous again")
    for bs, ctx, kept in SHAPES:
        c, store, flags = decode_case(bs, ctx, kept, dev)
        slow = kept is None
        logits = torch.zeros(bs, HKV, ctx, 4, dtype=torch.float16, device=dev)
        rows = torch.arange(bs, dtype=torch.int32, device=dev)
        nbytes = kv_bytes(bs, ctx if slow else kept)
        prev_launch = old.launch_for(bs)
        for keep in ((False, True) if slow else (False,)):
            x = (logits, rows) if keep else (None, None)
            saved = torch.empty_like(c.q)

            def call(mod, launch):
                fused = "q_out" in inspect.signature(mod.sfi_decode).parameters
                kw = dict(q_out=saved) if fused else {}

                def run():
                    if not fused:
                        saved.copy_(c.q)
                    return mod.sfi_decode(c.q, c.k, c.v, c.req_to_token, c.slots, c.seq_lens, flags, store.hi,
                                          store.count, store.pos[0], CFG.sinks, SCALE, 0.0, *x, launch=launch, **kw)
                return run
            fns = [call(old, prev_launch), call(new, new.Launch(**prev_launch.__dict__)), call(new, new.launch_for(bs)),
                   call(old, prev_launch)]
            ref = fns[0]()
            for fn in fns[1:]:
                torch.testing.assert_close(fn(), ref, atol=2e-2, rtol=2e-2)
            times = [timed(fn, 20, True)[0] for fn in fns]
            label = f"{kept} kept" if kept else "dense" + (" + logits" if keep else "")
            print(f"bs {bs:>2} ctx {ctx:>6} {label:>14}: " + " / ".join(
                f"{t:7.1f} ({100 * nbytes / (t * 1e-6) / bw:3.0f}%)" for t in times), flush=True)


if __name__ == "__main__":
    main()
