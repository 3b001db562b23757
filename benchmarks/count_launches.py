"""Device launches of the backend's refresh after a decode step whose rows were all slow, counted on the CPU.

    TRITON_INTERPRET=1 python benchmarks/count_launches.py [--batch 1] [--context 2048] [--layers 36] [--from-keys]

Runs ``Refresher.refresh_slow_rows`` (what the backend does before the next step: rows and
bounds to the device, the Selector over every layer, the coverage) on its GPU code path, with the Triton
kernels interpreted, and counts what would be launches on a GPU: Triton kernels, host-to-device
copies and torch ops that run a kernel (views, allocations and the profiler's ranges excluded). At
batch 1 the refresh is host-bound on a GPU, so this count is its cost there; it does not depend on the
context, only on the passes the Selector makes (``memory.selector_pass_bytes``)."""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

# aten ops that launch nothing on a GPU
NO_LAUNCH = {"view", "_unsafe_view", "expand", "slice", "select", "transpose", "t", "unsqueeze", "squeeze",
             "as_strided", "permute", "alias", "detach", "unflatten", "_reshape_alias", "lift_fresh", "empty",
             "empty_strided", "split", "unbind", "_record_function_enter_new", "_record_function_exit"}


class _Count(TorchDispatchMode):
    """Counts torch ops on device tensors; ops whose inputs are all ``host`` tensors (the backend's host
    copies: the slow mask, the sequence lengths) run on the host, and their outputs are host tensors."""

    def __init__(self, counts: collections.Counter, host: list[torch.Tensor]):
        super().__init__()
        self.counts, self.paused = counts, False
        self.host: dict[int, torch.Tensor] = {}  # by identity (kept alive, so ids stay unique)
        self.add_host(host)

    def add_host(self, tensors) -> None:
        self.host.update((id(t), t) for t in tensors if isinstance(t, torch.Tensor))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if inputs and all(id(t) in self.host for t in inputs):
            self.add_host(tree_leaves(out))
        elif not self.paused and func.overloadpacket.__name__ not in NO_LAUNCH:
            self.counts["torch " + func.overloadpacket.__name__] += 1
        return out


def _backend(bs: int, ctx: int, layers: int, from_logits: bool):
    """The backend's Selector runs (``Refresher``) with the Triton kernels (interpreted) over one layer's
    case, and the case."""
    import bench_kernels as bk

    c = bk.Case.make(bs, ctx, torch.device("cpu"), torch.float16)
    return bk.selector_backend(c, layers, from_logits), c


def _counted(b, host: list[torch.Tensor], body) -> collections.Counter:
    """Launches of ``body()`` on refresher ``b`` (``host``: its host tensors)."""
    import triton.runtime.interpreter as interp

    counts: collections.Counter = collections.Counter()
    mode = _Count(counts, host)

    def unpaused(fn, key):
        def call(*args, **kwargs):
            counts[key(*args)] += 1
            mode.paused = True  # what it runs on the CPU is not counted
            try:
                return fn(*args, **kwargs)
            finally:
                mode.paused = False
        return call

    def to_device(t: torch.Tensor) -> torch.Tensor:
        d = t.clone()
        mode.host.pop(id(d), None)
        return d

    b._to_device = unpaused(to_device, lambda t: "host-to-device copy")
    run = unpaused(interp.InterpretedFunction.run, lambda fn, *_: "triton " + fn.fn.__name__)
    saved = interp.InterpretedFunction.run
    interp.InterpretedFunction.run = run
    try:
        with mode:
            body()
    finally:
        interp.InterpretedFunction.run = saved
    return counts


def count(bs: int, ctx: int, layers: int, from_logits: bool) -> collections.Counter:
    """Launches of the refresh after a decode step of ``bs`` slow rows of ``ctx`` tokens, ``layers`` layers."""
    from sfi_sglang.kernels.plan_step import StepRows

    b, c = _backend(bs, ctx, layers, from_logits)
    # the state after a decode step in which every row was slow (what the step plan leaves)
    b.q_hist = c.q.expand(layers, -1, -1, -1)
    rows = StepRows.zeros(bs, "cpu")
    _, hi, cnt = b.store.bounds(c.seq_lens)
    rows.slow[:], rows.slots[:], rows.hi[:], rows.count[:] = True, c.slots, hi, cnt
    rows.logit_row[:] = torch.arange(bs) if from_logits else -1
    b.note_step(rows, bs, c.seq_lens)
    return _counted(b, [b.slow_host, b.pending[1]], b.refresh_slow_rows)


def count_reuse(ctx: int, layers: int, new: int = 256) -> collections.Counter:
    """Launches of a prefill's Selector from a cached prefix's selection record (one request of ``ctx``
    tokens, the last ``new`` of them new): the record's positions and the tokens after it are scored."""
    import bench_kernels as bk
    from sfi_sglang.radix import SelectionRecord
    from sfi_sglang.refresher import reuse_refresh

    b, c = _backend(1, ctx, layers, False)
    lo, hi, _ = b.store.bounds(c.seq_lens)
    start = ctx - new - bk.CFG.recent  # where the record's candidates ended
    kept = (torch.randperm(start - bk.CFG.sinks)[:bk.CFG.topk].sort().values + bk.CFG.sinks).int()
    record = SelectionRecord(start, kept.numel(), kept.expand(layers, bk.HKV, -1).contiguous())
    q = c.q.expand(layers, bk.CFG.prefill_queries, -1, -1)  # the last prompt query rows
    rows = torch.arange(bk.CFG.prefill_queries).view(1, -1)
    return _counted(b, [lo, hi, rows], lambda: b.select(range(layers), q, reuse_refresh(
        c.slots, rows, lo.int(), hi.int(), [record], b._to_device)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--from-keys", action="store_true", help="score from the keys, not the kept logits")
    p.add_argument("--reuse", action="store_true", help="a prefill's Selector from a cached selection record instead")
    p.add_argument("--out", help="append the count to this JSON list")
    a = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the kernels run interpreted on the CPU)")
    if a.reuse:
        counts = count_reuse(a.context, a.layers)
        what = f"a prefill's Selector from a selection record, {a.context} tokens (256 new), {a.layers} layers"
    else:
        counts = count(a.batch, a.context, a.layers, not a.from_keys)
        what = (f"refresh of {a.batch} x {a.context} over {a.layers} layers from the "
                f"{'keys' if a.from_keys else 'kept logits'}")
    for name, n in counts.most_common():
        print(f"{n:4d}  {name}")
    print(f"{sum(counts.values())} launches: {what}")
    if a.out:
        rows = json.load(open(a.out)) if os.path.exists(a.out) else []
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
        rows.append({"date": datetime.date.today().isoformat(), "device": "cpu (Triton interpreter; launches counted)",
                     "commit": commit.stdout.strip(), "what": what, "launches": sum(counts.values()),
                     "counts": dict(counts.most_common())})
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)

if __name__ == "__main__":
    main()
