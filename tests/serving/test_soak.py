"""The soak script at tiny size on the CPU (so it cannot rot): concurrent sessions, client
aborts and restarts against a real sfi server, no failed request, the server still up."""

import json
import os
import subprocess
import sys

import pytest

from conftest import BENCHMARKS, script_env

pytestmark = pytest.mark.e2e


def test_short_soak_on_cpu(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "soak.py"), "--tiny", "--minutes", "0.5",
           "--sessions", "4", "--abort-frac", "0.3", "--max-new", "16", "--out", str(out)]
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["failed"] == 0, res["errors"]
    assert res["requests"] > 4 and res["aborted"] > 0
    assert res["server_alive_after"], res["alive_error"]
    assert res["server_tracebacks"] == 0
    assert res["memory"] in ("rss", "gpu") and res["max_gpu_mem_mb_end"] > 0
    m = res["sfi_metrics"]  # sessions re-send their history: selections were reused, records stay bounded
    assert m["sglang:sfi_reuse_hits_total"] > 0 and 0 < m["sglang:sfi_reuse_records"] <= 64
