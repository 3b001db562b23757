"""The README's run: `sglang.launch_server --attention-backend sfi`, then one OpenAI client call
(CPU, tiny random-weight model, localhost only)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import engine_env

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launch_server_and_openai_call(tiny_model, tmp_path):
    from openai import OpenAI

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", tiny_model, "--attention-backend", "sfi",
           "--cuda-graph-backend-prefill", "disabled", "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--max-total-tokens", "4096"]
    env = engine_env('{"topk": 64, "recent": 16, "log_interval": 4}')
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.time() + 400
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                client.models.list()
                break
            except Exception:
                assert time.time() < deadline, "server did not come up"
                time.sleep(2)
        reply = client.completions.create(model=tiny_model, prompt="The pass key is 123. " * 30, max_tokens=12,
                                          temperature=0)
        assert reply.choices[0].text and reply.usage.completion_tokens == 12
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "SFI backend: dense=TorchNativeAttnBackend" in text and "SFI: slow rows" in text
