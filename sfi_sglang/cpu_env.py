"""Environment for running sglang engines and servers offline; on a CPU, from a source checkout
(tests, CPU benchmarks, demos).

PyPI has no CPU build of sgl-kernel; the checkout's ``tests/stubs/sgl_kernel`` stands in
(test-only: enough for the small models the tests and CPU benchmarks use).
"""

from __future__ import annotations

import os

STUBS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "stubs")


def cpu_engine_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's) plus what sglang's CPU engine needs here, offline."""
    if not os.path.isdir(STUBS):
        raise RuntimeError(f"CPU runs need the source checkout's tests/stubs (not found at {STUBS})")
    out = dict(os.environ if env is None else env)
    out.pop("TRITON_INTERPRET", None)  # sglang's own Triton kernels are not used on CPU; ours pick their path
    out.update(SGLANG_USE_CPU_ENGINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [STUBS, out.get("PYTHONPATH")])))
    return out


def engine_env(device: str) -> dict:
    """This process's environment for an sglang engine or server on ``device`` ("cpu" or "cuda"),
    offline: :func:`cpu_engine_env` on a CPU."""
    return cpu_engine_env() if device == "cpu" else dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
