"""When is a decode step slow? Boundary tokens from the tokenizer, and the gap limits.

A row is slow when it has no selection yet, when the fast-step limit is reached,
or when the token it feeds (the previously generated one) ends a sentence or a
line and the last slow step is at least the row's gap ago (``min_refresh_gap``, or
the adaptive gap of ``sfi_sglang.coverage``). Decisions
are made on the GPU from the fed token ids: no host sync.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from sfi_sglang.config import SFIConfig

# Characters that end a sentence or a line (ASCII and CJK full-width forms).
SENTENCE_END_CHARS = frozenset(".!?;:\n\r。！？；：…")


def is_boundary_text(text: str) -> bool:
    """True if a token's text ends a sentence or a line (trailing spaces and tabs ignored)."""
    stripped = text.rstrip(" \t")
    return bool(stripped) and stripped[-1] in SENTENCE_END_CHARS


def boundary_ids_from_vocab(token_texts: Sequence[str]) -> list[int]:
    """Ids whose decoded text ends a sentence or a line."""
    return [i for i, t in enumerate(token_texts) if is_boundary_text(t)]


def boundary_ids_from_tokenizer(tokenizer) -> list[int]:
    """Decode every id once (batched, fast tokenizers do this in Rust) and keep the boundary ones."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    return boundary_ids_from_vocab(texts)


def boundary_table(cfg: SFIConfig, vocab_size: int, derived: Iterable[int], device: torch.device | str) -> torch.Tensor:
    """Lookup table ``is_boundary[token_id]`` (bool, GPU) built from the config and the derived ids."""
    table = torch.zeros(vocab_size, dtype=torch.bool)
    if cfg.boundary:
        ids = list(cfg.boundary_ids) if cfg.boundary_ids is not None else list(derived)
        ids += list(cfg.extra_boundary_ids)
        ids = [i for i in ids if i < vocab_size]
        if ids:
            table[torch.tensor(ids, dtype=torch.long)] = True
    return table.to(device)


def slow_rows(
    fed_tokens: torch.Tensor,
    has_selection: torch.Tensor,
    steps_since_slow: torch.Tensor,
    is_boundary: torch.Tensor,
    gap: torch.Tensor,
    cfg: SFIConfig,
) -> torch.Tensor:
    """Per-row slow/fast decision for one decode step (bool tensor, same device, no sync).

    ``steps_since_slow`` counts decode steps since the last slow step (or since the
    selection was built at prefill), before this step; ``gap`` is each row's boundary gap.
    """
    boundary = is_boundary[fed_tokens.clamp(0, is_boundary.numel() - 1).long()]
    boundary &= steps_since_slow >= gap
    return (~has_selection) | (steps_since_slow >= cfg.max_fast_steps) | boundary
