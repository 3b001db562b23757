"""End to end on the CPU: a real sglang Engine with --attention-backend sfi on a tiny
random-weight Qwen3 (and a Gemma 3 layout), against the dense torch_native backend.

sglang has no CPU build of sgl_kernel on PyPI; tests/stubs/sgl_kernel stands in (test only).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import engine_env

pytestmark = pytest.mark.e2e

STATS = re.compile(r"SFI: slow rows (\d+), fast rows (\d+) .*refreshes (\d+), mean kept tokens per fast row and KV head ([\d.]+)")
REUSE = re.compile(r"selection reuse: hits (\d+), misses (\d+), records (\d+)")
PREFILL_SELECTOR = re.compile(r"prefill Selector: (\d+) from records [\d.]+ ms, (\d+) fresh [\d.]+ ms")
REFRESH_SELECTOR = re.compile(r"refresh Selector: (\d+) from logits [\d.]+ ms, (\d+) from keys [\d.]+ ms")
COVERAGE = re.compile(r"coverage ([\d.]+) \(worst layer ([\d.]+)\) over (\d+) slow rows")


def run_compare(model: str, sfi_config: str, *extra: str) -> tuple[dict, list[tuple[int, int, int, float]], str]:
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine_compare.py"), model, "torch_native", "--device", "cpu",
           "--max-total-tokens", "4096", "--log-level", "info", *extra]
    proc = subprocess.run(cmd, env=engine_env(sfi_config), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-4000:]
    stats = [(int(a), int(b), int(c), float(d)) for a, b, c, d in STATS.findall(out)]
    return json.loads(lines[-1][len("RESULT "):]), stats, out


def test_full_budget_equals_dense(tiny_gemma3):
    """Budget >= context: fast steps attend to every token, so greedy tokens equal dense.

    A sliding-window hybrid (Gemma 3's layout: full attention at layers 2 and 5, a 32-token window
    elsewhere), prompts past the window: sfi's full layers and its window layers give dense's tokens and
    log-probs. The saved peaked weights, in float32 (sglang would run Gemma in bf16, where the two
    backends' sums round apart): a window one token too short diverges within two tokens. Five requests
    of different lengths, at most two running at once: requests leave and join a running batch, and
    later ones reuse earlier ones' req-pool slots. (Models without window layers: the mixed-chunk test.)
    """
    # recent 64: a Selector region exists in these short prompts, so refreshes run (and keep it whole)
    cfg = json.dumps({"topk": 4096, "recent": 64, "max_fast_steps": 8, "min_refresh_gap": 4, "log_interval": 10})
    res, stats, out = run_compare(tiny_gemma3, cfg, "--prompts", "5", "--prompt-len", "150", "--new-tokens", "16",
                                  "--max-running-requests", "2", "--load-format", "auto", "--dtype", "float32")
    assert "2 sparse layers (+4 sliding-window layers" in out
    assert res["sfi"] == res["dense"]
    assert res["max_logprob_diff"] < 1e-4
    assert [len(o) for o in res["sfi"]] == [16, 24, 32, 40, 48]
    assert len(set(tuple(o[:16]) for o in res["dense"])) == 5, "outputs should depend on the prompt"
    slow, fast, refreshes, _ = stats[-1]
    assert fast > 0 and slow > 0 and refreshes > 5  # 5 prefills + refreshes after slow steps
    mean, worst, measured = COVERAGE.findall(out)[-1]
    assert int(measured) > 0 and float(mean) == float(worst) == 1.0  # the memory held every token
    # every region fit the budget: kept whole, the Selector never ran
    assert tuple(map(int, PREFILL_SELECTOR.findall(out)[-1])) == (0, 0)


def test_mixed_chunks_keep_dense_tokens_at_full_budget(tiny_model):
    """--enable-mixed-chunk: prefill chunks of queued requests run in one batch with running decodes,
    which then attend densely and rebuild their selection; at a full budget the tokens stay dense's."""
    cfg = json.dumps({"topk": 4096, "recent": 64, "max_fast_steps": 8, "min_refresh_gap": 4, "log_interval": 10})
    res, stats, out = run_compare(tiny_model, cfg, "--prompts", "3", "--prompt-len", "150", "--new-tokens", "16",
                                  "--max-running-requests", "2", "--mixed-chunk")
    assert "shares a batch with running decodes" in out  # mixing happened
    assert res["sfi"] == res["dense"] and [len(o) for o in res["sfi"]] == [16, 24, 32]
    slow, fast, _, _ = stats[-1]
    assert fast > 0 and slow > 0


def test_small_budget_is_sparse(tiny_gemma3):
    """A small budget really drops tokens: fast rows keep far fewer tokens than the context (on a
    sliding-window hybrid: the Selector serves its full-attention layers)."""
    cfg = json.dumps({"topk": 16, "recent": 16, "sinks": 4, "max_fast_steps": 16, "min_refresh_gap": 4,
                      "log_interval": 10})
    res, stats, out = run_compare(tiny_gemma3, cfg, "--prompts", "2", "--prompt-len", "300", "--new-tokens", "24",
                                  "--load-format", "auto", "--sfi-only")
    assert [len(o) for o in res["sfi"]] == [24, 32]
    slow, fast, _, kept = stats[-1]
    assert fast > slow > 0
    assert 36 <= kept <= 4 + 16 + 16 + 16
    mean, worst, measured = map(float, COVERAGE.findall(out)[-1])
    assert measured > 0 and 0 < worst <= mean < 1  # tokens were dropped that slow steps attend to
    # each response carries its own summary (meta_info["sfi_coverage"], last token)
    per_request = res["sfi_coverage"]
    assert all(c is not None and c["slow_steps"] >= 1 and 0 < c["worst_layer"] <= c["mean"] < 1 for c in per_request)
    # the server's count may also hold one step per request run after its last token (the overlap
    # scheduler launches the next step before it reads that a request finished)
    assert measured - len(per_request) <= sum(c["slow_steps"] for c in per_request) <= measured


def test_selection_reuse_across_turns(tiny_model):
    """Agent-style turns re-send a growing prefix (the first two the same prompt), one after
    another: every later turn starts from the selection record of the cached prefix, and the
    repeated prompt gives the same tokens, so the reused selection equals the one computed
    from scratch (one prefill query: both prefills score with the same query)."""
    cfg = json.dumps({"topk": 16, "recent": 16, "prefill_queries": 1, "max_fast_steps": 16, "min_refresh_gap": 4,
                      "log_interval": 1})
    res, _, out = run_compare(tiny_model, cfg, "--prompts", "4", "--prompt-len", "200", "--new-tokens", "16",
                              "--shared-prefix", "--sequential")
    hits, misses, records = map(int, REUSE.findall(out)[-1])
    assert (hits, misses) == (3, 0) and records >= 1
    assert tuple(map(int, PREFILL_SELECTOR.findall(out)[-1])) == (3, 1)  # timed apart: reused vs fresh
    assert res["dense"][0][:16] == res["dense"][1][:16]
    assert res["sfi"][0][:16] == res["sfi"][1][:16]


def test_same_request_alone_and_in_a_busy_batch(tiny_model):
    """Determinism: a sparse greedy request gives the same tokens alone and again inside a
    batch of other requests (the second time over its cached prefix and selection record).
    Two slow rows per step keep their logits for the refresh (``slow_logit_rows``), so alone and
    in the batch the request's refresh reads them from different rows, or from the keys."""
    cfg = json.dumps({"topk": 16, "recent": 16, "max_fast_steps": 16, "min_refresh_gap": 4, "log_interval": 10,
                      "slow_logit_rows": 2})
    res, stats, out = run_compare(tiny_model, cfg, "--prompts", "4", "--prompt-len", "300", "--new-tokens", "24",
                                  "--repeat-in-batch")
    assert len(res["alone"]) == 24 and len(res["busy"]) == 4
    assert res["busy"][0] == res["alone"]
    assert stats[-1][1] > stats[-1][0] > 0  # fast rows outnumber slow ones: the memory was sparse
    from_logits, from_keys = map(int, REFRESH_SELECTOR.findall(out)[-1])
    assert from_keys > 0 and from_logits > 0
