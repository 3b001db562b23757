"""A local sglang server (``--attention-backend sfi`` unless told otherwise) for examples, benchmarks and tests:
started in its own process group on 127.0.0.1, ready once it lists its model, and stopped
through its launcher (which shuts down the scheduler and detokenizer processes it spawned),
then the whole group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import IO, Sequence

from openai import OpenAI


def metric_totals(url: str, prefix: str = "sglang:sfi_") -> dict[str, float] | None:
    """Prometheus values under ``prefix`` from the ``/metrics`` endpoint of the server at ``url``
    (its OpenAI base URL), summed over label sets; None if it exports none (no ``--enable-metrics``)."""
    root = url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]
            out[name] = out.get(name, 0.0) + float(value)
    return out or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``with LocalServer(model_path, extra_args) as srv: OpenAI(base_url=srv.url, ...)``; ``backend``: the
    ``--attention-backend`` (a dense one such as ``flashinfer`` or ``torch_native`` for baselines)."""

    def __init__(self, model_path: str, extra: Sequence[str] = (), port: int | None = None,
                 env: dict | None = None, log: IO | None = None, ready_timeout: float = 900, backend: str = "sfi"):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
                    "--attention-backend", backend, "--host", "127.0.0.1", "--port", str(self.port), *extra]
        self.env, self.log, self.ready_timeout = env, log, ready_timeout
        self.proc: subprocess.Popen | None = None
        self.model = ""

    def __enter__(self) -> "LocalServer":
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT if self.log else None,
                                     start_new_session=True)
        client = OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=30)
        deadline = time.time() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                self.model = client.models.list().data[0].id
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"the server did not come up in {self.ready_timeout:.0f} s") from None
                time.sleep(2)

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # the launcher alone: on SIGTERM it drains requests, stops its child watchdog and shuts the
            # scheduler down (a SIGTERM to its children too would read as their crash)
            self.proc.send_signal(signal.SIGTERM)
            try:  # it polls for the signal every 5 s, then waits up to 15 s for its schedulers
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever outlived the launcher, or the launcher itself if it did not stop
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
