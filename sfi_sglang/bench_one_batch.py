"""``python -m sfi_sglang.bench_one_batch ARGS``: sglang's one-batch benchmark with sfi registered.

sglang's benchmark CLIs parse arguments before loading plugins, so
``--attention-backend sfi`` is rejected there; this entry loads them first, in this process
and in the tensor-parallel workers the benchmark spawns (they would not load them).
Arguments are those of ``python -m sglang.benchmark.one_batch``.
"""

from sglang.benchmark import one_batch
from sglang.srt.plugins import load_plugins

_sglang_latency_test = one_batch.latency_test


def latency_test(*args) -> None:
    """sglang's ``latency_test`` after loading the plugins (the target of each spawned worker)."""
    load_plugins()
    _sglang_latency_test(*args)


def main() -> None:
    load_plugins()
    one_batch.latency_test = latency_test
    one_batch.cli_main()


if __name__ == "__main__":
    main()
