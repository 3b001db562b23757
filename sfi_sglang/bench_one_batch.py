"""``python -m sfi_sglang.bench_one_batch ARGS``: sglang's one-batch benchmark with sfi registered.

sglang's benchmark CLIs parse arguments before loading plugins, so
``--attention-backend sfi`` is rejected there; this entry loads them first.
Arguments are those of ``python -m sglang.benchmark.one_batch``.
"""

from sglang.srt.plugins import load_plugins


def main() -> None:
    load_plugins()
    from sglang.benchmark.one_batch import cli_main

    cli_main()


if __name__ == "__main__":
    main()
