"""Boundary tokens: the ids whose text ends a sentence or a line, as a GPU lookup table.

A decode row is slow when it has no selection yet, when ``max_fast_steps`` fast steps ran,
or when the token it feeds (the previously generated one) is a boundary token and the last
slow step is at least ``min_refresh_gap`` steps ago. The decision is made on the GPU from the
fed token ids, with no host sync (``sfi_sglang.kernels.plan_step``).
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
