import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from sfi_sglang.metrics import SFIStats


def add_decode(stats: SFIStats, slow: torch.Tensor, kept: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """What a decode step's plan adds to the counters (``kernels.plan_step``): slow and fast rows, and
    the kept tokens and context lengths of the fast ones."""
    fast = ~slow  # slices, not an index list: nothing is copied from the host (no stream sync)
    stats.acc[0:2] += torch.stack([slow.sum(), fast.sum()])
    stats.acc[3:5] += torch.stack([(kept * fast).sum(), (seq_lens * fast).sum()])
    stats.decode_steps += 1


def add_coverage(stats: SFIStats, mean: torch.Tensor, worst: torch.Tensor, measured: torch.Tensor) -> None:
    """What a refresh's end adds to the coverage totals (``kernels.finish_coverage``)."""
    m = measured.double()
    stats.cov += torch.stack([(mean.double() * m).sum(), (worst.double() * m).sum(), m.sum()])


def exporting_stats(device: str) -> tuple[SFIStats, CollectorRegistry]:
    registry = CollectorRegistry()
    stats = SFIStats(device, export=True, counter_cls=lambda name, doc: Counter(name, doc, registry=registry),
                     gauge_cls=lambda name, doc, **kw: Gauge(name, doc, registry=registry, **kw))
    return stats, registry


def test_counters_accumulate_and_export_deltas():
    stats, registry = exporting_stats("cpu")
    slow = torch.tensor([True, False, False])
    add_decode(stats, slow, kept=torch.tensor([100, 40, 50]), seq_lens=torch.tensor([100, 400, 500]))
    stats.add_refreshes(2)
    add_coverage(stats, torch.tensor([0.9, 0.7, 0.1]), torch.tensor([0.5, 0.3, 0.0]), torch.tensor([True, True, False]))
    stats.log(host={"reuse_hits": 3, "reuse_misses": 1, "reuse_records": 2, "reuse_bytes": 4096})
    add_decode(stats, ~slow, kept=torch.tensor([30, 400, 500]), seq_lens=torch.tensor([101, 400, 500]))
    add_coverage(stats, torch.tensor([0.5]), torch.tensor([0.2]), torch.tensor([True]))
    stats.log(host={"reuse_hits": 5, "reuse_misses": 1, "reuse_records": 1, "reuse_bytes": 2048})

    s = stats.snapshot()
    assert (s["slow_steps"], s["fast_steps"], s["refreshes"]) == (3, 3, 2)
    assert s["kept_tokens"] == 40 + 50 + 30 and s["context_tokens"] == 400 + 500 + 101
    assert abs(s["slow_step_frac"] - 0.5) < 1e-9 and abs(s["mean_kept_tokens"] - 40) < 1e-9
    get = lambda f: registry.get_sample_value(f"sglang:sfi_{f}_total")  # noqa: E731
    assert (get("slow_steps"), get("fast_steps"), get("refreshes"), get("kept_tokens")) == (3, 3, 2, 120)
    assert abs(s["mean_coverage"] - 0.7) < 1e-6 and abs(s["mean_worst_layer_coverage"] - 1 / 3) < 1e-6
    assert get("coverage_measured") == 3 and abs(get("coverage_sum") - 2.1) < 1e-6
    assert (get("reuse_hits"), get("reuse_misses")) == (5, 1)
    assert registry.get_sample_value("sglang:sfi_reuse_records") == 1
    assert registry.get_sample_value("sglang:sfi_reuse_bytes") == 2048


def step_inputs(stats: SFIStats, slow: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's slow flags, kept tokens (10) and context lengths (100), on the counters' device."""
    dev, n = stats.acc.device, len(slow)
    return torch.tensor(slow, device=dev), torch.full((n,), 10, device=dev), torch.full((n,), 100, device=dev)


def decode_step(stats: SFIStats, slow: list[bool]) -> None:
    add_decode(stats, *step_inputs(stats, slow))


def test_publish_exports_each_step_on_cpu():
    """Counters reach Prometheus at every decode step, not only with the log line; a later
    ``log`` adds nothing twice, and an older total never decrements a counter."""
    stats, registry = exporting_stats("cpu")
    get = lambda f: registry.get_sample_value(f"sglang:sfi_{f}_total")  # noqa: E731
    decode_step(stats, [True, False])
    stats.publish()
    assert (get("slow_steps"), get("fast_steps"), get("kept_tokens")) == (1, 1, 10)
    decode_step(stats, [False, False])
    stats.publish()
    assert (get("slow_steps"), get("fast_steps"), get("kept_tokens")) == (1, 3, 30)
    stats.log()
    assert (get("slow_steps"), get("fast_steps")) == (1, 3)
    stats.export({"slow_steps": 0, "fast_steps": 2})  # as from a copy made before the log
    assert (get("slow_steps"), get("fast_steps")) == (1, 3)


def test_publish_without_metrics_is_a_no_op():
    stats = SFIStats("cpu")
    decode_step(stats, [False])
    stats.publish()
    assert stats.decode_steps == 1


@pytest.mark.gpu
def test_publish_on_cuda_exports_completed_copies_without_waiting():
    """On CUDA, ``publish`` exports the totals of the copy it started at an earlier call once that copy
    has completed, and never waits for it."""
    stats, registry = exporting_stats("cuda")
    get = lambda f: registry.get_sample_value(f"sglang:sfi_{f}_total")  # noqa: E731
    decode_step(stats, [False, False, True])
    stats.publish()  # starts the first copy: nothing to export yet
    assert get("fast_steps") == 0
    torch.cuda.synchronize()
    decode_step(stats, [False])
    stats.publish()  # exports the first copy, starts the next
    assert (get("slow_steps"), get("fast_steps")) == (1, 2)
    torch.cuda.synchronize()
    stats.publish()
    assert (get("slow_steps"), get("fast_steps")) == (1, 3)
    step = step_inputs(stats, [False])  # made first: a copy from the host would wait for the stream
    torch.cuda.synchronize()
    torch.cuda._sleep(10**9)  # keeps the stream busy: the copy started now cannot complete at once
    add_decode(stats, *step)
    stats.publish()
    stats.publish()  # the pending copy has not completed: skipped, not waited for
    assert get("fast_steps") == 3
    torch.cuda.synchronize()
    stats.publish()
    assert get("fast_steps") == 4


def test_selector_timings_reach_the_log_and_the_decode_benchmark(caplog):
    """Refreshes after slow steps are timed apart by source (kept logits or keys), logged on the
    counter line, and read back by ``bench_decode.py`` from the engine's log."""
    import logging

    from bench_decode import refreshes_from_log

    stats = SFIStats("cpu")
    for from_logits in (True, False, False):
        with stats.refresh_selector.time(from_logits):
            pass
    with caplog.at_level(logging.INFO, logger="sfi_sglang"):
        stats.log()
    found = refreshes_from_log(caplog.text)
    assert (found["from_logits"][0], found["from_keys"][0]) == (1, 2) and found["host_ms"] >= 0
    assert "prefill Selector: 0 from records" in caplog.text


def test_trace_summary_splits_a_step():
    """``trace_summary.summarize``: busy/idle over overlapping kernels, categories, host calls, sfi's ranges."""
    from trace_summary import summarize

    def ev(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        ev("kernel", "nvjet_tst_128x64_gemm", 0, 400), ev("kernel", "_sfi_decode", 300, 200),  # overlap 100
        ev("kernel", "_topk_select", 1000, 500), ev("kernel", "vectorized_elementwise_kernel", 1500, 100),
        ev("cuda_runtime", "cudaLaunchKernel", 0, 5), ev("cuda_runtime", "cudaGraphLaunch", 0, 5),
        ev("cuda_runtime", "cudaMalloc", 0, 5), ev("cuda_runtime", "cudaStreamSynchronize", 0, 5),
        ev("user_annotation", "sfi_refresh_selector", 900, 800), ev("gpu_user_annotation", "sfi_refresh_selector", 1000, 600),
        ev("cpu_op", "aten::add", 0, 3), {"ph": "i", "name": "marker", "ts": 0},
    ]}
    s = summarize(trace, steps=2)
    assert s["gpu_span_ms"] == 1.6 and abs(s["gpu_busy_ms"] - 1.1) < 1e-9 and abs(s["gpu_idle_ms"] - 0.5) < 1e-9
    per = s["per_step_ms"]
    assert (per["gemm"], per["sfi_decode"], per["selector"], per["other"]) == (0.2, 0.1, 0.25, 0.05)
    assert s["host_calls"] == {"kernel_launches": 1, "graph_launches": 1, "allocations": 1, "synchronizations": 1}
    assert s["sfi_ranges"] == {"sfi_refresh_selector": {"count": 1, "host_ms": 0.8, "gpu_ms": 0.6}}
    assert s["top_kernels"][0] == ["_topk_select", 1, 0.5]
