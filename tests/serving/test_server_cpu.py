"""The README's run: `sglang.launch_server --attention-backend sfi`, then OpenAI client calls, plain
and structured (CPU, tiny random-weight model, localhost only)."""

import json
import re

import pytest

from conftest import engine_env

pytestmark = pytest.mark.e2e


def test_launch_server_and_openai_call(tiny_model, tmp_path):
    from openai import OpenAI

    from sfi_sglang.agents import LocalServer, metric_totals

    env = engine_env('{"topk": 64, "recent": 16, "log_interval": 0}')  # no log line: counters reach /metrics anyway
    extra = ["--cuda-graph-backend-prefill", "disabled", "--device", "cpu", "--max-total-tokens", "4096",
             "--enable-metrics", "--grammar-backend", "outlines"]  # sglang's default, xgrammar, needs CUDA
    with open(tmp_path / "server.log", "w") as log:
        try:
            with LocalServer(tiny_model, extra, env=env, log=log, ready_timeout=400) as srv:
                client = OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=60)
                prompt = "The pass key is 123. " * 30
                reply = client.completions.create(model=srv.model, prompt=prompt, max_tokens=12, temperature=0)
                assert reply.choices[0].text and reply.usage.completion_tokens == 12
                # a second turn over the cached prompt starts from its selection record, counted in /metrics
                # (deltas: sglang's startup warm-up request may share a few first tokens, a miss)
                before = metric_totals(srv.url)
                client.completions.create(model=srv.model, prompt=prompt + reply.choices[0].text + " And?",
                                          max_tokens=4, temperature=0)
                after = metric_totals(srv.url)
                # structured output: the constraint holds over sfi's decode steps
                phone = r"\(\d{3}\) \d{3}-\d{4}"
                reply = client.completions.create(model=srv.model, prompt=prompt + " Call ", max_tokens=24,
                                                  temperature=0, extra_body={"regex": phone})
                assert re.fullmatch(phone, reply.choices[0].text), reply.choices[0].text
                schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                          "required": ["n"], "additionalProperties": False}
                reply = client.completions.create(
                    model=srv.model, prompt=prompt + " As JSON: ", max_tokens=48, temperature=0,
                    extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
                assert set(json.loads(reply.choices[0].text)) == {"n"}, reply.choices[0].text
        except RuntimeError as e:
            pytest.fail(f"{e}\n{(tmp_path / 'server.log').read_text()[-3000:]}")
    text = (tmp_path / "server.log").read_text()
    assert "SFI backend: dense=TorchNativeAttnBackend" in text
    # sparse steps reach Prometheus as they run (no log_interval export here)
    assert after["sglang:sfi_fast_steps_total"] > 0
    # a normal stop: the launcher drains and shuts its children down, none reported as crashed
    assert "Gracefully exiting" in text and "crashed" not in text and "SIGQUIT" not in text
    # the KV-cache budget was cut by at least what the backend then allocated
    reserved = float(re.search(r"SFI: ([0-9.]+) MiB of the KV-cache budget reserved", text).group(1))
    held = float(re.search(r"GPU state ([0-9.]+) MiB", text).group(1))
    assert held > 0 and reserved >= held
    grew = {k: after[k] - (before or {}).get(k, 0) for k in ("sglang:sfi_reuse_hits_total", "sglang:sfi_reuse_misses_total")}
    assert grew == {"sglang:sfi_reuse_hits_total": 1, "sglang:sfi_reuse_misses_total": 0}
