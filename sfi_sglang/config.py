"""SFI configuration: one frozen dataclass, parsed from JSON and validated up front.

The JSON comes from the ``SFI_CONFIG`` environment variable: either a JSON object
or a path to a file holding one. It is read in the launching process (to fail
before anything starts) and again in every scheduler process (the environment is
inherited by sglang's spawned workers).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

ENV_VAR = "SFI_CONFIG"
DENSE_BACKENDS = ("auto", "flashinfer", "triton", "torch_native")


class SFIConfigError(ValueError):
    """A bad SFI configuration value; the message names the field."""


@dataclass(frozen=True)
class SFIConfig:
    """Knobs of Slow-Fast Inference. Defaults follow the reference implementation except where
    measured otherwise (``topk``, ``recent``, ``neighbor_window``) and the additions for exact copies
    (``value_refresh``, ``span_tokens``): benchmarks/RESULTS.md."""

    sinks: int = 4
    """First tokens of every request that fast steps always attend to."""
    topk: int = 3072
    """Tokens the Selector keeps per (layer, request, KV head)."""
    recent: int = 1024
    """Trailing tokens fast steps always attend to (the window grows until the next slow step)."""
    max_fast_steps: int = 96
    """A slow step is forced once this many fast steps ran since the last one."""
    min_refresh_gap: int = 24
    """Boundary tokens do not trigger a slow step within this many steps of the last one."""
    boundary: bool = True
    """Trigger slow steps after boundary tokens (sentence / line ends)."""
    boundary_ids: tuple[int, ...] | None = None
    """Replace the boundary token ids derived from the tokenizer."""
    extra_boundary_ids: tuple[int, ...] = ()
    """Add these ids to the derived boundary set."""
    value_refresh: bool = True
    """Make a step slow when the token it feeds holds a digit or a symbol of paths and code names
    (``/ \\ _``: ``sfi_sglang.policy.VALUE_SYMBOLS``) and no slow step fed the token before its run of
    text: a value being copied (a number, an id, a path, a snake_case name) is read densely as it
    starts, and the refresh after that step holds it whole (with ``span_tokens``;
    benchmarks/RESULTS.md, "Exact retrieval")."""
    prefill_queries: int = 16
    """Last prompt queries that build the first selection at the end of a prefill (0: the first decode
    step is slow). They span the question and the chat template's tail, so the first fast steps hold
    what the question points at, not only what the template's last tokens attend to."""
    alpha: float = 0.5
    """Power-mean order used to aggregate attention over a KV head's query group."""
    neighbor_window: int = 2
    """Let a token's score be the best within +-this many positions, so selections keep
    whole neighbourhoods (spans) of strongly attended tokens (0: off, as the reference)."""
    span_tokens: int = 32
    """Selections keep whole runs of text (tokens with no whitespace between them: numbers, ids,
    paths, identifiers), cut every this many tokens: a run scores as its best token, so a copied
    value is held whole or not at all (``sfi_sglang.spans``; 0: off)."""
    dense_layers: int = 0
    """The first this many full-attention layers attend to the whole context at every step (no
    Selector there), as Quest leaves its first layers dense. Each costs a dense layer's attention per
    step. Sliding-window layers are not counted: they always attend over their window."""
    slow_logit_rows: int = 4
    """Slow rows per decode step whose dense attention also keeps its logits (fp16) for the
    Selector, which then reads them instead of the keys: the slow step reads K once, not twice.
    Further slow rows of the same step are scored from the keys. Takes layers x rows x query heads
    x context length x 2 bytes of GPU memory (360 MiB for Qwen3-4B at 4 rows and 40K context; 0: off)."""
    reuse_records: int = 64
    """Selections kept on radix-tree prefix nodes, so requests re-sending a cached prefix start
    from its selection and score only their new tokens (0: off). Each record takes up to
    layers x KV heads x topk x 4 bytes of GPU memory (3.4 MiB for Qwen3-4B at topk 3072)."""
    dense_backend: str = "auto"
    """SGLang backend for prefill/extend: auto = flashinfer on CUDA, torch_native on CPU."""
    log_interval: int = 1000
    """Log counters every this many decode steps (0: never)."""

    _positive = ("topk", "max_fast_steps")
    _non_negative = ("sinks", "recent", "min_refresh_gap", "prefill_queries", "neighbor_window", "log_interval",
                     "reuse_records", "slow_logit_rows", "dense_layers", "span_tokens")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        for name in self._positive:
            if getattr(self, name) <= 0:
                raise SFIConfigError(f"SFI config field '{name}' must be > 0, got {getattr(self, name)}")
        for name in self._non_negative:
            if getattr(self, name) < 0:
                raise SFIConfigError(f"SFI config field '{name}' must be >= 0, got {getattr(self, name)}")
        if self.prefill_queries > 16:
            raise SFIConfigError(f"SFI config field 'prefill_queries' must be <= 16, got {self.prefill_queries}")
        if self.min_refresh_gap > self.max_fast_steps:
            raise SFIConfigError(
                f"SFI config field 'min_refresh_gap' ({self.min_refresh_gap}) must be <= "
                f"'max_fast_steps' ({self.max_fast_steps})"
            )
        if not 0.0 < self.alpha <= 1.0:
            raise SFIConfigError(f"SFI config field 'alpha' must be in (0, 1], got {self.alpha}")
        if self.dense_backend not in DENSE_BACKENDS:
            raise SFIConfigError(
                f"SFI config field 'dense_backend' must be one of {DENSE_BACKENDS}, got {self.dense_backend!r}"
            )
        for name in ("boundary_ids", "extra_boundary_ids"):
            ids = getattr(self, name) or ()
            if any(i < 0 for i in ids):
                raise SFIConfigError(f"SFI config field '{name}' holds a negative token id")

    @property
    def max_kept(self) -> int:
        """Upper bound of tokens a fast step attends to per (request, KV head)."""
        return self.sinks + self.topk + self.recent + self.max_fast_steps

    def resolve_dense_backend(self, device: str) -> str:
        if self.dense_backend != "auto":
            return self.dense_backend
        return "flashinfer" if device == "cuda" else "torch_native"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SFIConfig":
        if not isinstance(data, dict):
            raise SFIConfigError(f"SFI config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SFIConfigError(f"unknown SFI config field(s) {unknown}; known fields: {sorted(known)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "SFIConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SFIConfigError(f"{ENV_VAR} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_env(cls) -> "SFIConfig":
        """Read ``SFI_CONFIG`` (inline JSON or a path to a JSON file); defaults if unset."""
        raw = os.environ.get(ENV_VAR, "").strip()
        if not raw:
            return cls()
        if not raw.startswith("{"):
            try:
                with open(raw) as f:
                    raw = f.read()
            except OSError as e:
                raise SFIConfigError(f"{ENV_VAR}={raw!r} is neither a JSON object nor a readable file: {e}") from None
        return cls.from_json(raw)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check_type(name: str, value: Any, annotation: str) -> None:
    """Check a field against its (string) annotation; bool is not accepted as int."""
    ok: bool
    if annotation == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation == "bool":
        ok = isinstance(value, bool)
    elif annotation == "str":
        ok = isinstance(value, str)
    elif annotation.startswith("tuple[int, ...]"):
        ok = (value is None and "None" in annotation) or (
            isinstance(value, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        )
    else:  # pragma: no cover - a new field with an unhandled annotation
        raise TypeError(f"unhandled annotation {annotation!r} for field {name}")
    if not ok:
        raise SFIConfigError(f"SFI config field '{name}' must be {annotation}, got {value!r}")
