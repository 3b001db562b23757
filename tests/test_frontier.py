"""The refresh-policy frontier (``benchmarks/frontier.py``): fit of step time against slow-step fraction."""

import os
import sys

import pytest

from conftest import HERE

sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
from frontier import frontier  # noqa: E402


def fidelity_row(policy: str, gap: int, frac: float, kl: float, text: int) -> dict:
    return {"budget": 3072, "refresh_every": 96, "policy": policy, "min_refresh_gap": gap,
            "coverage_target": 0.99 if policy == "adaptive" else None, "context": 7900, "text": text,
            "top1_agreement": 0.98, "mean_kl": kl, "slow_step_frac": frac}


def test_policies_are_placed_on_the_measured_step_line():
    fidelity = {"rows": [fidelity_row("fixed", 24, 0.04, 0.003, t) for t in range(2)]
                + [fidelity_row("adaptive", 24, f, 0.004, t) for t, f in enumerate((0.01, 0.02))]}
    # step = 4 + 50 f ms at 8 x 32K, measured at f = 1/32 and 1/16; dense 12 ms
    speed = {"rows": [{"backend": "sfi_R32", "batch": 8, "context": 32768, "refresh_every": 32, "slow_step_frac": 1 / 32,
                       "step_ms": 4 + 50 / 32},
                      {"backend": "sfi_R16", "batch": 8, "context": 32768, "refresh_every": 16, "slow_step_frac": 1 / 16,
                       "step_ms": 4 + 50 / 16},
                      {"backend": "flashinfer", "batch": 8, "context": 32768, "refresh_every": None, "step_ms": 12.0}]}
    fixed, adaptive = frontier(fidelity, speed, [(8, 32768)])
    assert fixed["fit"]["a_ms"] == pytest.approx(4) and fixed["fit"]["b_ms"] == pytest.approx(50)
    assert fixed["step_ms"] == pytest.approx(6.0) and fixed["ratio_vs_dense"] == pytest.approx(2.0)
    assert not fixed["extrapolated"]
    # the adaptive point: mean over its texts (f 0.015, below the measured range)
    assert adaptive["slow_step_frac"] == pytest.approx(0.015) and adaptive["extrapolated"]
    assert adaptive["decode_tok_s"] == pytest.approx(8e3 / 4.75, abs=0.1) and adaptive["mean_kl"] == pytest.approx(0.004)


def test_one_measured_rate_is_refused():
    speed = {"rows": [{"backend": "sfi_R32", "batch": 1, "context": 8192, "refresh_every": 32, "slow_step_frac": 0.03,
                       "step_ms": 5.0},
                      {"backend": "flashinfer", "batch": 1, "context": 8192, "refresh_every": None, "step_ms": 6.0}]}
    with pytest.raises(SystemExit, match="two or more"):
        frontier({"rows": [fidelity_row("fixed", 24, 0.03, 0.003, 0)]}, speed, [(1, 8192)])


def test_a_fraction_within_the_logs_rounding_is_measured_not_extrapolated():
    # sfi's log prints 1/64 as 0.016; the fidelity run's 1/64 is 0.0156
    speed = {"rows": [{"backend": f"sfi_R{r}", "batch": 1, "context": 8192, "refresh_every": r,
                       "slow_step_frac": round(1 / r, 3), "step_ms": 5.0 + 10 / r} for r in (16, 64)]
             + [{"backend": "flashinfer", "batch": 1, "context": 8192, "refresh_every": None, "step_ms": 6.0}]}
    (row,) = frontier({"rows": [fidelity_row("fixed", 48, 1 / 64, 0.003, 0)]}, speed, [(1, 8192)])
    assert not row["extrapolated"]
    (row,) = frontier({"rows": [fidelity_row("fixed", 96, 1 / 128, 0.003, 0)]}, speed, [(1, 8192)])
    assert row["extrapolated"]
