"""SFI counters: slow steps, fast steps, refreshes and kept tokens, accumulated on the device.

Accumulating on the device costs no host sync per step; ``snapshot`` syncs once.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("sfi_sglang")

FIELDS = ("slow_steps", "fast_steps", "refreshes", "kept_tokens", "context_tokens")


class SFIStats:
    def __init__(self, device: torch.device | str):
        self._acc = torch.zeros(len(FIELDS), dtype=torch.int64, device=device)
        self.decode_steps = 0

    def add_decode(self, slow: torch.Tensor, kept: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """One decode step: per-row slow flags, tokens kept per KV head, context lengths."""
        fast = ~slow
        self._acc += torch.stack(
            [slow.sum(), fast.sum(), slow.sum(), (kept * fast).sum(), (seq_lens.long() * fast).sum()]
        )
        self.decode_steps += 1

    def add_refreshes(self, n: int) -> None:
        """Selections built outside decode slow steps (prefill bootstrap)."""
        self._acc[2] += n

    def snapshot(self) -> dict[str, float]:
        vals = dict(zip(FIELDS, self._acc.tolist()))
        rows = vals["slow_steps"] + vals["fast_steps"]
        vals["slow_step_frac"] = vals["slow_steps"] / rows if rows else 0.0
        fast = vals["fast_steps"]
        vals["mean_kept_tokens"] = vals["kept_tokens"] / fast if fast else 0.0
        vals["mean_kept_frac"] = vals["kept_tokens"] / vals["context_tokens"] if vals["context_tokens"] else 0.0
        return vals

    def log(self) -> None:
        s = self.snapshot()
        logger.info(
            "SFI: slow rows %d, fast rows %d (slow frac %.3f), refreshes %d, "
            "mean kept tokens per fast row and KV head %.1f (%.1f%% of context)",
            s["slow_steps"], s["fast_steps"], s["slow_step_frac"], s["refreshes"],
            s["mean_kept_tokens"], 100 * s["mean_kept_frac"],
        )
