"""SFI counters: slow steps, fast steps, refreshes, kept tokens and coverage, accumulated on the device.

Accumulating on the device costs no host sync per step; ``snapshot`` syncs once.
When the server runs with ``--enable-metrics`` the counters are added to Prometheus counters
``sglang:sfi_<field>_total`` as decode steps run (``publish``, from asynchronous host copies),
selection-reuse counts at every prefill that consults them, and all of them again with the log
line every ``log_interval`` decode steps. sglang's ``/metrics`` endpoint exports them (it
collects scheduler processes' metrics in multiprocess mode).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

import torch

logger = logging.getLogger("sfi_sglang")

FIELDS = ("slow_steps", "fast_steps", "refreshes", "kept_tokens", "context_tokens")
COVERAGE_FIELDS = ("coverage_sum", "coverage_min_sum", "coverage_measured")
HOST_FIELDS = ("reuse_hits", "reuse_misses")  # cumulative counts kept on the host (sfi_sglang.radix)
GAUGES = ("reuse_records", "reuse_bytes")

HELP = {
    "slow_steps": "Decode rows that ran a slow (dense) SFI step.",
    "fast_steps": "Decode rows that ran a fast (sparse) SFI step.",
    "refreshes": "SFI selections built (slow steps and prefill bootstraps).",
    "kept_tokens": "Tokens attended per KV head, summed over fast rows.",
    "context_tokens": "Context length, summed over fast rows.",
    "coverage_sum": "Coverage (slow-step attention mass the previous memory held; mean over layers and KV heads), "
                    "summed over measured slow rows.",
    "coverage_min_sum": "Coverage of each measured slow row's worst layer, summed.",
    "coverage_measured": "Slow rows whose coverage was measured.",
    "reuse_hits": "Requests over a cached prefix whose prefill started from its selection record.",
    "reuse_misses": "Requests over a cached prefix with no usable selection record.",
    "reuse_records": "Selection records held on radix-tree nodes.",
    "reuse_bytes": "GPU bytes held by selection records.",
}


class SelectorTimer:
    """Device time of Selector calls of one kind (``name``), split in two by a flag (``labels``: for
    True, for False): prefills that started from a selection record or not (reuse: its cost should
    not grow with the cached prefix), refreshes after slow steps from kept logits or from the keys.
    Device time from CUDA events, read once they have completed (no sync; it includes time the
    GPU waited for the host to launch the call's kernels), and the host time to issue the calls
    over both kinds: a device time close to it means the calls are launch-bound. On CPU both are
    wall time."""

    def __init__(self, cuda: bool, name: str, labels: tuple[str, str]):
        self.cuda, self.name, self.labels = cuda, name, labels
        self.pending: list[tuple[bool, torch.cuda.Event, torch.cuda.Event]] = []
        self.ms = {True: 0.0, False: 0.0}
        self.count = {True: 0, False: 0}
        self.host_ms, self.host_count = 0.0, 0

    @contextmanager
    def time(self, flag: bool) -> Iterator[None]:
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"sfi_{self.name}_selector"):  # a named range in profiler traces
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self.pending.append((flag, start, end))
                if len(self.pending) > 64:  # bounded without a log line (e.g. prefill-only traffic)
                    self._collect()
            else:
                yield
                self._add(flag, 1e3 * (time.perf_counter() - t0))
        self.host_ms += 1e3 * (time.perf_counter() - t0)
        self.host_count += 1

    def _add(self, flag: bool, ms: float) -> None:
        self.ms[flag] += ms
        self.count[flag] += 1

    def _collect(self) -> None:
        """Adds the timed calls that have completed on the device."""
        still = []
        for flag, start, end in self.pending:
            if end.query():
                self._add(flag, start.elapsed_time(end))
            else:
                still.append((flag, start, end))
        self.pending = still

    def summary(self) -> str:
        """Calls and mean milliseconds per call, of those completed so far."""
        self._collect()
        mean = lambda k: self.ms[k] / self.count[k] if self.count[k] else 0.0  # noqa: E731
        host = self.host_ms / self.host_count if self.host_count else 0.0
        return (f"{self.name} Selector: {self.count[True]} {self.labels[0]} {mean(True):.2f} ms, "
                f"{self.count[False]} {self.labels[1]} {mean(False):.2f} ms, host {host:.2f} ms")


class SFIStats:
    def __init__(self, device: torch.device | str, export: bool = False, counter_cls=None, gauge_cls=None):
        self.acc = torch.zeros(len(FIELDS), dtype=torch.int64, device=device)
        self.prefill_selector = SelectorTimer(self.acc.is_cuda, "prefill", ("from records", "fresh"))
        self.refresh_selector = SelectorTimer(self.acc.is_cuda, "refresh", ("from logits", "from keys"))
        self.cov = torch.zeros(len(COVERAGE_FIELDS), dtype=torch.float64, device=device)
        counted = FIELDS + COVERAGE_FIELDS + HOST_FIELDS
        self._exported = dict.fromkeys(counted, 0)
        self._counters = self._gauges = None
        if export:
            from prometheus_client import Counter, Gauge

            counter_cls, gauge_cls = counter_cls or Counter, gauge_cls or Gauge
            self._counters = {f: counter_cls(f"sglang:sfi_{f}", HELP[f]) for f in counted}
            # sglang collects scheduler metrics in multiprocess mode: sum the live schedulers' gauges
            self._gauges = {f: gauge_cls(f"sglang:sfi_{f}", HELP[f], multiprocess_mode="livesum") for f in GAUGES}
        self.decode_steps = 0
        if self._counters is not None and self.acc.is_cuda:  # publish's copies: pinned, one in flight
            self._acc_host = torch.zeros_like(self.acc, device="cpu", pin_memory=True)
            self._cov_host = torch.zeros_like(self.cov, device="cpu", pin_memory=True)
            self._copied, self._in_flight = torch.cuda.Event(), False

    def add_refreshes(self, n: int) -> None:
        """Selections built (after a slow step, or at the end of a prefill)."""
        self.acc[2:3].add_(n)  # in place: `acc[2] += n` adds, then copies back

    def publish(self) -> None:
        """Export the device counters to Prometheus without waiting for the device: on CUDA, the
        totals of the previous copy to the host once it has completed, then a new copy of the
        current ones (so a step's counts reach ``/metrics`` a step or so later); on CPU the current
        totals. Called once per decode step, outside CUDA graphs; nothing without ``--enable-metrics``."""
        if self._counters is None:
            return
        if not self.acc.is_cuda:
            self.export(self._totals(self.acc, self.cov))
            return
        if self._in_flight:
            if not self._copied.query():
                return
            self.export(self._totals(self._acc_host, self._cov_host))
        self._acc_host.copy_(self.acc, non_blocking=True)
        self._cov_host.copy_(self.cov, non_blocking=True)
        self._copied.record()
        self._in_flight = True

    @staticmethod
    def _totals(acc: torch.Tensor, cov: torch.Tensor) -> dict[str, float]:
        return dict(zip(FIELDS, acc.tolist())) | dict(zip(COVERAGE_FIELDS, cov.tolist()))

    def snapshot(self) -> dict[str, float]:
        vals = self._totals(self.acc, self.cov)
        rows = vals["slow_steps"] + vals["fast_steps"]
        vals["slow_step_frac"] = vals["slow_steps"] / rows if rows else 0.0
        fast = vals["fast_steps"]
        vals["mean_kept_tokens"] = vals["kept_tokens"] / fast if fast else 0.0
        vals["mean_kept_frac"] = vals["kept_tokens"] / vals["context_tokens"] if vals["context_tokens"] else 0.0
        m = vals["coverage_measured"]
        vals["mean_coverage"] = vals["coverage_sum"] / m if m else float("nan")
        vals["mean_worst_layer_coverage"] = vals["coverage_min_sum"] / m if m else float("nan")
        return vals

    def log(self, extra: str = "", host: dict[str, float] | None = None) -> None:
        """Log the totals (and ``extra``) and export what was added since the last call, with
        ``host`` values (``HOST_FIELDS`` totals and ``GAUGES``) kept elsewhere."""
        s = self.snapshot() | (host or {})
        self.export(s)
        extra = "; ".join(filter(None, [extra, self.prefill_selector.summary(), self.refresh_selector.summary()]))
        if self.acc.is_cuda:  # the caching allocator's view: a leak grows "allocated", a new peak "reserved"
            extra += (f"; torch allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB, "
                      f"reserved {torch.cuda.memory_reserved() / 2**20:.0f} MiB")
        logger.info(
            "SFI: slow rows %d, fast rows %d (slow frac %.3f), refreshes %d, "
            "mean kept tokens per fast row and KV head %.1f (%.1f%% of context), "
            "coverage %.3f (worst layer %.3f) over %d slow rows%s",
            s["slow_steps"], s["fast_steps"], s["slow_step_frac"], s["refreshes"],
            s["mean_kept_tokens"], 100 * s["mean_kept_frac"], s["mean_coverage"], s["mean_worst_layer_coverage"],
            s["coverage_measured"], f"; {extra}" if extra else "",
        )

    def export(self, totals: dict[str, float]) -> None:
        """Prometheus (with ``--enable-metrics``): add to each counter what its total in ``totals``
        grew by since the last export, set the gauges. Host values only: no device sync. A total
        below the exported one is an older copy (``publish``'s, after ``log``'s): left out."""
        if self._counters is None:
            return
        for f in (f for f in self._counters if f in totals and totals[f] > self._exported[f]):
            self._counters[f].inc(totals[f] - self._exported[f])
            self._exported[f] = totals[f]
        for f in (f for f in self._gauges if f in totals):
            self._gauges[f].set(totals[f])
