"""``benchmarks/bench_kernels.py``'s slow-step rows: a refresh plus the layers' dense decodes, over
FlashInfer's, by the refresh's eager wall time and (when profiled) by its kernel time."""

import pytest

bench_kernels = pytest.importorskip("bench_kernels")


def row(kernel, time_us, **extra):
    return {"kernel": kernel, "batch": 16, "context": 8192, "kept_tokens": None, "time_us": time_us,
            "bytes_moved": 1000, "graph": True, **extra}


def test_slow_step_rows_by_wall_and_kernel_time():
    rows = [row("dense_decode", 100.0), row("sfi_dense_decode_logits", 110.0),
            row("refresh_all_layers", 3000.0, kernel_us=1800.0), row("refresh_all_layers_from_logits", 900.0)]
    out = {r["kernel"]: r for r in bench_kernels.finish(rows, "gpu", 1e12, layers=36)}
    slow, fused = out["slow_step_all_layers"], out["fused_slow_step_all_layers"]
    assert slow["vs_dense"] == pytest.approx((3000 + 3600) / 3600)
    assert slow["vs_dense_kernels"] == pytest.approx((1800 + 3600) / 3600)
    assert slow["kernel_us"] == pytest.approx(1800 + 3600)
    assert fused["vs_dense"] == pytest.approx((900 + 36 * 110) / 3600) and "vs_dense_kernels" not in fused


def test_batch1_refresh_launches_stay_within_budget():
    """The refresh before the step after a slow step, at batch 1 from kept logits, counted on the CPU
    (``benchmarks/count_launches.py``, kernels interpreted): at batch 1 its host time follows its launches
    (70 before the launch cuts, 35 after)."""
    count_launches = pytest.importorskip("count_launches")
    counts = count_launches.count(1, 4608, 2, from_logits=True)
    assert sum(counts.values()) <= 35, counts
    assert counts["triton _finish_coverage"] == 1 and counts["triton _chunk_take"] == 1
