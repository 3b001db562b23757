"""Token classes: what a fed token tells the slow/fast rule and the Selector, as a GPU lookup table.

A decode row is slow when it has no selection yet, when ``max_fast_steps`` fast steps ran since
the last slow step, when the token it feeds (the previously generated one) is a boundary token
and the last slow step is at least ``min_refresh_gap`` steps ago, or (``value_refresh``) when
the token it feeds holds a value character (a digit or one of ``VALUE_SYMBOLS``) and no slow step
fed the token before its run of text: a number, an id, a path or a code name is then read densely
as the model starts copying it, and the refresh after that step selects it whole
(``sfi_sglang.spans``). The decision is made on the GPU from the fed token ids,
with no host sync (``sfi_sglang.kernels.plan_step``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.kernels.plan_step import BOUNDARY, RUN_START, VALUE

# Characters that end a sentence or a line (ASCII and CJK full-width forms).
SENTENCE_END_CHARS = frozenset(".!?;:\n\r。！？；：…")
# Symbols of paths, URLs and code names (snake_case), which prose rarely holds. A token holding one (or a
# digit) is a value token: the model may be copying an exact value out of its context. Hyphens, brackets
# and operators are left out: most lines of code and many of prose hold them, and each would make a step slow.
VALUE_SYMBOLS = frozenset("/\\_")


def is_boundary_text(text: str) -> bool:
    """True if a token's text ends a sentence or a line (trailing spaces and tabs ignored)."""
    stripped = text.rstrip(" \t")
    return bool(stripped) and stripped[-1] in SENTENCE_END_CHARS


def boundary_ids_from_vocab(token_texts: Sequence[str]) -> list[int]:
    """Ids whose decoded text ends a sentence or a line."""
    return [i for i, t in enumerate(token_texts) if is_boundary_text(t)]


def token_texts(tokenizer) -> list[str]:
    """Every id's text as it reads after another token (batched; fast tokenizers decode in Rust).
    Decoding after an anchor token keeps the leading space that SentencePiece tokenizers drop
    when a token is decoded alone; special tokens read as empty."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
    head = tokenizer.decode(anchor)
    texts = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))], skip_special_tokens=True)
    return [t[len(head):] if t.startswith(head) else " " + t for t in texts]


def boundary_table(cfg: SFIConfig, vocab_size: int, derived: Iterable[int], device: torch.device | str) -> torch.Tensor:
    """Lookup table ``is_boundary[token_id]`` (bool) built from the config and the derived ids."""
    table = torch.zeros(vocab_size, dtype=torch.bool)
    if cfg.boundary:
        ids = list(cfg.boundary_ids) if cfg.boundary_ids is not None else list(derived)
        ids += list(cfg.extra_boundary_ids)
        ids = [i for i in ids if i < vocab_size]
        if ids:
            table[torch.tensor(ids, dtype=torch.long)] = True
    return table.to(device)


def is_value_text(text: str) -> bool:
    """True if a token's text holds a digit or one of ``VALUE_SYMBOLS``."""
    return any(c.isdigit() or c in VALUE_SYMBOLS for c in text)


def token_classes(cfg: SFIConfig, vocab_size: int, texts: Sequence[str] | None,
                  device: torch.device | str) -> torch.Tensor:
    """``token_class[token_id]`` (uint8 bits ``BOUNDARY | RUN_START | VALUE``) from the config and the
    tokenizer's ``texts`` (:func:`token_texts`; None: no tokenizer, so no derived boundaries, every
    token its own run and no value token). Ids past the tokenizer's start runs and are nothing else."""
    table = boundary_table(cfg, vocab_size, boundary_ids_from_vocab(texts or ()), "cpu").to(torch.uint8) * BOUNDARY
    run_start = torch.ones(vocab_size, dtype=torch.bool)
    value = torch.zeros(vocab_size, dtype=torch.bool)
    if texts is not None:
        n = min(len(texts), vocab_size)
        run_start[:n] = torch.tensor([not t or t[0].isspace() for t in texts[:n]])
        if cfg.value_refresh:
            value[:n] = torch.tensor([is_value_text(t) for t in texts[:n]])
    return (table | run_start.to(torch.uint8) * RUN_START | value.to(torch.uint8) * VALUE).to(device)
