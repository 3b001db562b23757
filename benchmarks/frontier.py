"""Quality/speed frontier of SFI's refresh policies (fixed gap vs adaptive): each policy's fidelity on
real text placed at the decode speed measured at its slow-step fraction.

    python benchmarks/frontier.py --fidelity benchmarks/results/adaptive_8k_x3.json \\
        --speed benchmarks/results/decode_throughput_h200.json [MORE.json] --shape 16x8192 [--shape 8x32768] \\
        [--out benchmarks/results/adaptive_frontier.json] [--plot benchmarks/results/adaptive_frontier.png]

``--fidelity``: ``fidelity.py --gaps ... --adaptive-targets ...`` (real weights; per policy point the
mean top-1 agreement, mean KL and slow-step fraction over its texts). ``--speed``: ``bench_decode.py``
rows holding sfi at two or more forced refresh periods R (``--refresh 16,32,64``, the same
memory as the fidelity run) and a dense backend, at each ``--shape``: one run's file, or several files
of one machine's runs (their rows are pooled; e.g. a dense row re-run after its first try failed). A slow step costs the same
whatever triggered it, so a shape's step time is linear in the slow-step fraction f: fitted as
``a + b f`` over its sfi rows (least squares; the largest residual is reported), a policy's step is
``a + b f`` at its own f, its throughput ``batch / step`` and its ratio against the fastest dense row
of that run. A policy whose f lies outside the measured range is extrapolated and flagged. The two
runs use different models (the fidelity model is small enough for a CPU, the speed model is
Qwen3-4B's shapes with dummy weights): the slow-step fractions carry over only as far as the text
and policy, not the model, set them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity import summarize  # noqa: E402


FRAC_ROUNDING = 5e-4  # sfi's counter line (bench_decode's slow_step_frac) has 3 decimals


def fit(rows: list[dict]) -> dict:
    """Least-squares ``step_ms = a + b * slow_step_frac`` over sfi rows of one shape."""
    xs, ys = [r["slow_step_frac"] for r in rows], [r["step_ms"] for r in rows]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        raise SystemExit("the speed file needs sfi at two or more slow-step fractions per shape (--refresh 16,32,...)")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    return {"a_ms": a, "b_ms": b, "max_residual_ms": max(abs(a + b * x - y) for x, y in zip(xs, ys)),
            "slow_frac_range": [min(xs), max(xs)], "points": n}


def frontier(fidelity: dict, speed: dict, shapes: list[tuple[int, int]]) -> list[dict]:
    """One row per (shape, policy point): fidelity and the modeled throughput at its slow-step fraction."""
    points = summarize(fidelity["rows"])
    out = []
    for bs, ctx in shapes:
        rows = [r for r in speed["rows"] if r["batch"] == bs and r["context"] == ctx]
        sfi = [r for r in rows if r.get("refresh_every")]
        dense = [r for r in rows if not r.get("refresh_every")]
        if not sfi or not dense:
            raise SystemExit(f"{bs}x{ctx}: the speed file needs sfi and dense rows of this shape")
        line, best = fit(sfi), min(dense, key=lambda r: r["step_ms"])
        lo, hi = line["slow_frac_range"]
        for p in points:
            step = line["a_ms"] + line["b_ms"] * p["slow_step_frac"]
            out.append({"batch": bs, "context": ctx, **{k: p[k] for k in ("policy", "min_refresh_gap",
                        "coverage_target", "budget", "top1_agreement", "worst_top1", "mean_kl", "slow_step_frac")},
                        "step_ms": round(step, 3), "decode_tok_s": round(1e3 * bs / step, 1),
                        "ratio_vs_dense": round(best["step_ms"] / step, 3), "dense": best["backend"],
                        "extrapolated": not lo - FRAC_ROUNDING <= p["slow_step_frac"] <= hi + FRAC_ROUNDING, "fit": line})
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["batch"], r["context"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, (bs, ctx) in zip(axes[0], shapes):
        for policy, marker in (("fixed", "o"), ("adaptive", "^")):
            pts = sorted((r["decode_tok_s"], r["mean_kl"], r["extrapolated"]) for r in rows
                         if (r["batch"], r["context"], r["policy"]) == (bs, ctx, policy))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=policy)
                ax.scatter([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], s=120, facecolors="none",
                           edgecolors="gray")
        ax.set(title=f"batch {bs} x {ctx // 1024}K (circled: extrapolated)", xlabel="decode tokens/s (modeled)",
               ylabel="mean KL vs dense")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fidelity", required=True)
    ap.add_argument("--speed", required=True, nargs="+", help="bench_decode.py result files (rows pooled)")
    ap.add_argument("--shape", action="append", required=True, type=lambda s: tuple(map(int, s.split("x"))),
                    help="BATCHxCONTEXT of the speed rows (repeat for several)")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args()
    with open(args.fidelity) as f:
        fidelity = json.load(f)
    speed = {"rows": []}
    for path in args.speed:
        with open(path) as f:
            speed["rows"] += json.load(f)["rows"]
    if len({r.get("gpu") for r in speed["rows"]}) > 1:
        raise SystemExit("--speed: the files come from different GPUs")
    rows = frontier(fidelity, speed, args.shape)
    print(f"{'shape':>9} {'policy':>8} {'gap':>4} {'target':>6} {'slow':>6} {'top1':>6} {'KL':>8} "
          f"{'step ms':>8} {'tok/s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>3}x{r['context'] // 1024:>4}K {r['policy']:>8} {r['min_refresh_gap']:>4} "
              f"{r['coverage_target'] or '-':>6} {r['slow_step_frac']:>6.3f} {r['top1_agreement']:>6.3f} "
              f"{r['mean_kl']:>8.5f} {r['step_ms']:>8.2f} {r['decode_tok_s']:>8.0f} {r['ratio_vs_dense']:>5.2f}x"
              + ("  (extrapolated)" if r["extrapolated"] else ""))
    for (bs, ctx), line in {(r["batch"], r["context"]): r["fit"] for r in rows}.items():
        print(f"{bs}x{ctx}: step = {line['a_ms']:.3f} + {line['b_ms']:.2f} x slow fraction ms over {line['points']} "
              f"points (largest residual {line['max_residual_ms']:.3f} ms)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"fidelity": os.path.basename(args.fidelity), "speed": [os.path.basename(p) for p in args.speed],
                       "fidelity_model": fidelity.get("model"), "speed_gpu": speed["rows"][0].get("gpu"),
                       "rows": rows}, f, indent=1)
        print("wrote", args.out)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
