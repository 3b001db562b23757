"""GPU benchmarks at tiny size on the CPU, so they cannot rot between GPU runs: the overlap-scheduler
decode runner (``benchmarks/engine_decode.py``, used by ``bench_decode.py --runner engine``) and the
agent-turn selection-reuse benchmark (``benchmarks/bench_agent_reuse.py``)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import BENCHMARKS, engine_env

pytestmark = pytest.mark.e2e


def test_engine_decode_on_cpu(tiny_model, tmp_path):
    out = tmp_path / "rows.jsonl"
    env = engine_env('{"topk": 32, "recent": 8, "max_fast_steps": 7, "min_refresh_gap": 2, "boundary": false, "log_interval": 8}')
    cmd = [sys.executable, os.path.join(BENCHMARKS, "engine_decode.py"), tiny_model, "sfi",
           "--input-len", "200", "--batch-size", "1", "3", "--output-len", "16", "--device", "cpu",
           "--load-format", "auto", "--stagger", "2", "--profile-steps", "10", "--profile-dir", str(tmp_path),
           "--result-filename", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [1, 3]
    assert all(r["input_len"] == 200 and r["output_len"] == 16 and r["step_s"] > 0 for r in rows)
    assert all(r["staggered_step_s"] > 0 for r in rows)  # requests sent 2 steps apart
    for key in "step_s", "staggered_step_s":  # the median of the timed sends, and each of them
        assert all(len(r[key + "_runs"]) == 3 and r[key] == sorted(r[key + "_runs"])[1] for r in rows)
        assert all(min(r[key + "_runs"]) > 0 for r in rows)
    assert all(isinstance(r["timing_warnings"], list) for r in rows)
    assert all(r["uncached_prompt_tokens"] == 0 for r in rows)  # every timed send found its prompt cached
    # the largest batch profiled (sglang's profiler): a slow step every 8 steps, so a refresh in 10
    assert "profile" not in rows[0] and os.path.exists(rows[1]["profile"]["trace"]), rows[1].get("profile")
    assert rows[1]["profile"]["sfi_ranges"]["sfi_refresh_selector"]["count"] >= 1
    slow = re.findall(r"slow frac ([0-9.]+)", proc.stdout + proc.stderr)  # sfi's counters, as bench_decode reads them
    assert slow and float(slow[-1]) > 0


def test_agent_reuse_bench_on_cpu(tiny_model, tmp_path):
    out = tmp_path / "agent.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "bench_agent_reuse.py"), "--device", "cpu",
           "--model", tiny_model, "--dense", "torch_native", "--prefix", "300", "--turns", "2", "--user", "24",
           "--output", "16", "--config", '{"topk": 64, "recent": 16, "log_interval": 4}', "--profile-turn", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=engine_env("{}"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (run,) = json.loads(out.read_text())["runs"]
    v = run["variants"]
    assert set(v) == {"sfi_reuse", "sfi_no_reuse", "torch_native"}, proc.stderr[-4000:]
    assert all(len(x["turns"]) == 2 and x["turns"][1]["cached_tokens"] > 0 for x in v.values())
    assert v["sfi_reuse"]["reuse_hits"] > 0 and v["sfi_reuse"]["selector_record_ms"] > 0  # later turns reused
    assert v["sfi_no_reuse"]["reuse_hits"] is None and v["sfi_no_reuse"]["selector_fresh_ms"] > 0
    # turn 2 alone: with reuse its prefill starts from the record, without it scores afresh
    later = v["sfi_reuse"]["later_turns_selector"], v["sfi_no_reuse"]["later_turns_selector"]
    assert later[0]["from_records"][0] > 0 and later[0]["fresh"][0] == 0, later
    assert later[1]["from_records"][0] == 0 and later[1]["fresh"][0] > 0, later
    # turn 2's prefill profiled: the Selector's range is in it (sfi), and the turn's row is whole
    prof = v["sfi_reuse"]["turns"][1]["profile"]
    assert prof["sfi_ranges"]["sfi_prefill_selector"]["count"] >= 1, prof
    assert "profile" not in v["sfi_reuse"]["turns"][0] and v["sfi_reuse"]["turns"][1]["ttft_ms"] > 0
