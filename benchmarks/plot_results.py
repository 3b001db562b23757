"""PNG plots of the JSON results in benchmarks/results/ (needs matplotlib: pip install -e ".[plot]").

    python benchmarks/plot_results.py [--results benchmarks/results] [--decode A.json B.json --decode-png NAME]

- decode_throughput*.json (or the ``--decode`` files) -> decode_speedup.png (``--decode-png``): sfi / best
  dense decode tok/s vs context, one line per (setup, batch, refresh), with the ideal (byte-floor)
  ratio dashed; a setup is (GPU, model, tp, runner), and a ratio pairs rows of one setup only;
- fidelity.json -> fidelity.png: top-1 agreement and mean KL vs budget, one line per context;
- adaptive.json -> adaptive.png: mean KL vs slow-step fraction, fixed and adaptive policies.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def decode_speedup(rows: list[dict], ax) -> None:
    """Ratios within one setup (GPU, model, tp, runner): the dense and sfi rows of the same runs."""
    setup = lambda r: (r["gpu"], r["model"], r.get("tp", 1), r.get("runner", "one_batch"))  # noqa: E731
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["refresh_every"] is None:
            k = (setup(r), r["batch"], r["context"])
            if k not in best or r["decode_tok_s"] > best[k]["decode_tok_s"]:
                best[k] = r
    lines: dict[tuple, list[tuple[int, float, float]]] = {}
    for r in rows:
        d = best.get((setup(r), r["batch"], r["context"]))
        if r["refresh_every"] is not None and d is not None:
            lines.setdefault((setup(r), r["batch"], r["refresh_every"]), []).append(
                (r["context"], r["decode_tok_s"] / d["decode_tok_s"], d["bytes_moved"] / r["bytes_moved"]))
    several = len({k[0] for k in lines}) > 1
    for ((gpu, model, tp, runner), bs, refresh), pts in sorted(lines.items()):
        pts.sort()
        x = [p[0] // 1024 for p in pts]
        where = f", {gpu.removeprefix('NVIDIA ')} {model} tp{tp} {runner}" if several else ""
        line, = ax.plot(x, [p[1] for p in pts], marker="o", label=f"batch {bs}, R={refresh}{where}")
        ax.plot(x, [p[2] for p in pts], ls="--", marker="x", color=line.get_color(), alpha=0.5)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context (K tokens)", ylabel="sfi / best dense decode tok/s (dashed: ideal)",
           title="decode speedup" + ("" if several else f", {rows[0]['model']}"))
    ax.legend(fontsize=7)


def fidelity(rows: list[dict], ax_top1, ax_kl) -> None:
    for ctx in sorted({r["context"] for r in rows}):
        pts = sorted((r["budget"], r["top1_agreement"], r["mean_kl"]) for r in rows if r["context"] == ctx)
        ax_top1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{ctx} tokens")
        ax_kl.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"{ctx} tokens")
    for ax, label in ((ax_top1, "top-1 agreement with dense"), (ax_kl, "mean KL(dense || sfi)")):
        ax.set_xscale("log", base=2)
        ax.set(xlabel="budget (topk per KV head)", ylabel=label)
        ax.legend(fontsize=7)


def adaptive(rows: list[dict], ax) -> None:
    for ctx in sorted({r["context"] for r in rows}):
        for policy, marker in (("fixed", "o"), ("adaptive", "^")):
            pts = sorted((r["slow_step_frac"], r["mean_kl"]) for r in rows if r["context"] == ctx and r["policy"] == policy)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls="-" if policy == "fixed" else ":",
                        label=f"{policy}, {ctx} tokens")
    ax.set(xlabel="slow-step fraction", ylabel="mean KL(dense || sfi)", title="refresh policy: quality vs slow steps")
    ax.legend(fontsize=7)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--decode", nargs="+", help="decode JSON files to plot (default: results/decode_throughput*.json)")
    p.add_argument("--decode-png", default="decode_speedup.png", help="its PNG's name, in --results")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def load(name: str) -> list[dict]:
        path = os.path.join(args.results, name)
        return json.load(open(path))["rows"] if os.path.exists(path) else []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(os.path.join(args.results, name), dpi=120)
        print("wrote", os.path.join(args.results, name))

    files = args.decode or sorted(glob.glob(os.path.join(args.results, "decode_throughput*.json")))
    decode = [r for f in files for r in json.load(open(f))["rows"]]
    if decode:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        decode_speedup(decode, ax)
        save(fig, args.decode_png)
    if rows := load("fidelity.json"):
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        fidelity(rows, a, b)
        save(fig, "fidelity.png")
    if rows := load("adaptive.json"):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        adaptive(rows, ax)
        save(fig, "adaptive.png")


if __name__ == "__main__":
    main()
