"""Token classes (boundaries, runs of text, value tokens) and the per-row slow/fast decision, against a
plain-Python simulation."""

import random

import pytest
import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.kernels.plan_step import BOUNDARY, VALUE, RUN_START, slow_rows
from sfi_sglang.policy import (SENTENCE_END_CHARS, boundary_ids_from_vocab, boundary_table, is_boundary_text,
                               token_classes)


@pytest.mark.parametrize("text", [".", " end.", "x\n", "!", "?", ";", ":", "\r", "…", "ok. \t ", "。", "中文！", "？", "；"])
def test_boundary_text(text):
    assert is_boundary_text(text)


@pytest.mark.parametrize("text", ["", " ", "\t", "end", ".x", '?"', ".)", "3.5", "、", ",", "a "])
def test_not_boundary_text(text):
    # Only the last char after stripping spaces/tabs counts: '?"' ends in a quote.
    assert not is_boundary_text(text)


def test_trailing_space_and_tab_only_are_stripped():
    assert is_boundary_text(".  \t")
    assert is_boundary_text(" \n ")  # the newline itself is a boundary char, spaces after it are stripped
    assert SENTENCE_END_CHARS >= set(".!?;:\n\r")


def test_boundary_ids_from_vocab():
    vocab = ["a", ".", " the", "!\n", '."', "。", "x ", "?  "]
    assert boundary_ids_from_vocab(vocab) == [1, 3, 5, 7]


def table_ids(table: torch.Tensor) -> list[int]:
    return table.nonzero().flatten().tolist()


def test_boundary_table():
    derived = [1, 5, 9]
    assert table_ids(boundary_table(SFIConfig(), 10, derived, "cpu")) == [1, 5, 9]
    t = boundary_table(SFIConfig(), 10, derived, "cpu")
    assert t.dtype == torch.bool and t.shape == (10,)
    # boundary=False: nothing is a boundary, not even extra ids.
    assert table_ids(boundary_table(SFIConfig(boundary=False, extra_boundary_ids=(2,)), 10, derived, "cpu")) == []
    # boundary_ids replace the derived ids; extra ids are added; ids >= vocab are ignored.
    cfg = SFIConfig(boundary_ids=(0, 4, 12), extra_boundary_ids=(7, 10))
    assert table_ids(boundary_table(cfg, 10, derived, "cpu")) == [0, 4, 7]
    assert table_ids(boundary_table(SFIConfig(extra_boundary_ids=(2, 99)), 10, derived, "cpu")) == [1, 2, 5, 9]
    # an explicit empty override disables the derived ids
    assert table_ids(boundary_table(SFIConfig(boundary_ids=()), 10, derived, "cpu")) == []


def test_token_classes():
    texts = ["a", " b", "7", " 12", "x.", "", "\n", " v2\n", " /", "_id", "\\", " well-known", "(x),"]
    got = token_classes(SFIConfig(), 15, texts, "cpu").tolist()
    assert got == [0, RUN_START, VALUE, RUN_START | VALUE, BOUNDARY, RUN_START, RUN_START | BOUNDARY,
                   RUN_START | VALUE | BOUNDARY, RUN_START | VALUE, VALUE, VALUE, RUN_START, 0,
                   RUN_START, RUN_START]  # ids 13, 14: past the tokenizer's
    assert token_classes(SFIConfig(value_refresh=False), 10, texts, "cpu")[3] == RUN_START
    assert token_classes(SFIConfig(boundary=False), 10, texts, "cpu")[4] == 0
    assert token_classes(SFIConfig(), 4, None, "cpu").tolist() == [RUN_START] * 4  # no tokenizer


def slow_plain(cfg: SFIConfig, stream: list[int], classes: list[int]) -> set[int]:
    """Steps that are slow, by the rule as the docs state it: a request decoding ``stream`` after a prefill."""
    slow, last_slow, run_began = set(), -1, 0  # last_slow: the step of the last slow one (-1: the prefill)
    for t, tok in enumerate(stream):
        c = classes[tok]
        if c & RUN_START:
            run_began = t
        steps = t - last_slow - 1  # fast steps since the last slow one
        if (steps >= cfg.max_fast_steps or (c & BOUNDARY and steps >= cfg.min_refresh_gap)
                or (c & VALUE and last_slow < run_began - 1)):  # no slow step fed the token before the run
            slow.add(t)
            last_slow = t
    return slow


@pytest.mark.parametrize("seed", range(4))
def test_value_tokens_make_a_run_slow_once(seed):
    cfg = SFIConfig(max_fast_steps=40, min_refresh_gap=12)
    rng = random.Random(seed)
    classes = [rng.choice([0, RUN_START, RUN_START, BOUNDARY, VALUE, RUN_START | VALUE]) for _ in range(30)]
    stream = [rng.randrange(30) for _ in range(300)]
    table = torch.tensor(classes, dtype=torch.uint8)
    ready, steps, run = torch.tensor([True]), torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    got = set()
    for t, tok in enumerate(stream):
        slow, run = slow_rows(torch.tensor([tok]), ready, steps, run, table, cfg.max_fast_steps, cfg.min_refresh_gap)
        if slow[0]:
            got.add(t)
        steps = torch.where(slow, torch.zeros_like(steps), steps + 1)
    assert got == slow_plain(cfg, stream, classes)
    runs_with_values = sum(1 for t, tok in enumerate(stream) if classes[tok] & VALUE and classes[tok] & RUN_START)
    assert len(got) >= min(runs_with_values, 10)


def expected_slow(cfg: SFIConfig, ready: bool, steps: int, token: int, boundaries: set[int]) -> bool:
    return (not ready) or steps >= cfg.max_fast_steps or (token in boundaries and steps >= cfg.min_refresh_gap)


@pytest.mark.parametrize("max_fast, gap", [(8, 3), (5, 0), (6, 6), (1, 1)])
def test_single_request_simulation(max_fast, gap):
    cfg = SFIConfig(max_fast_steps=max_fast, min_refresh_gap=gap)
    vocab, boundaries = 50, {3, 17, 42}
    table = boundary_table(cfg, vocab, sorted(boundaries), "cpu").to(torch.uint8)  # BOUNDARY bits only
    rng = random.Random(max_fast * 100 + gap)
    stream = [rng.randrange(vocab) for _ in range(200)]
    for p in (5, 6, 7, 30, 31, 60, 99, 100, 150, 151, 152, 199):  # boundaries at known positions
        stream[p] = rng.choice(sorted(boundaries))

    # The backend: ready after prefill, steps starts at 0, steps = 0 if slow else steps + 1.
    ready, steps, run = torch.tensor([True]), torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    got = set()
    for t, tok in enumerate(stream):
        slow, run = slow_rows(torch.tensor([tok]), ready, steps, run, table, max_fast, gap)
        assert slow.dtype == torch.bool and slow.shape == (1,)
        if slow[0]:
            got.add(t)
        steps = torch.where(slow, torch.zeros_like(steps), steps + 1)

    want, s = set(), 0
    for t, tok in enumerate(stream):
        if expected_slow(cfg, True, s, tok, boundaries):
            want.add(t)
            s = 0
        else:
            s += 1
    assert got == want
    # sanity of the simulation itself: never more than max_fast fast steps in a row
    gaps = [b - a for a, b in zip([-1, *sorted(want)], sorted(want))]
    assert max(gaps) <= max_fast + 1


def test_not_ready_is_slow_and_no_prefill_selection():
    cfg = SFIConfig(max_fast_steps=4, min_refresh_gap=2)
    table = token_classes(cfg, 8, None, "cpu")
    slow, _ = slow_rows(torch.tensor([1]), torch.tensor([False]), torch.tensor([0]), torch.tensor([0]), table, 4, 2)
    assert slow.tolist() == [True]


def test_batched_rows_decide_per_row():
    cfg = SFIConfig(max_fast_steps=10, min_refresh_gap=4)
    boundaries = {2, 5}
    table = boundary_table(cfg, 8, sorted(boundaries), "cpu").to(torch.uint8)
    rows = [  # (fed token, ready, steps)
        (1, True, 0),
        (1, False, 3),
        (1, True, 9),
        (1, True, 10),
        (2, True, 3),
        (2, True, 4),
        (5, True, 12),
        (7, True, 0),
        (1000, True, 5),  # out-of-vocab id: clamped into the table (id 7 is not a boundary)
    ]
    fed = torch.tensor([r[0] for r in rows])
    ready = torch.tensor([r[1] for r in rows])
    steps = torch.tensor([r[2] for r in rows], dtype=torch.int32)
    got = slow_rows(fed, ready, steps, torch.zeros_like(steps), table, cfg.max_fast_steps, cfg.min_refresh_gap)[0].tolist()
    want = [expected_slow(cfg, r, s, min(t, 7), boundaries) for t, r, s in rows]
    assert got == want == [False, True, False, True, False, True, True, False, False]
    # the lookup table is not modified by the in-place masking
    assert table_ids(table) == [2, 5]
