"""Slow-step policy and the Selector, against plain-Python references."""

import random

import pytest
import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.policy import boundary_ids_from_vocab, boundary_table, is_boundary_text, slow_rows
from sfi_sglang.selector import group_scores, mix_prior, topk_positions


@pytest.mark.parametrize("text, want", [
    (".", True), (" end.", True), ("x\n", True), ("?", True), ("。", True), ("！", True), ("ok;", True),
    ("a. ", True), ("hello", False), (",", False), ("", False), (" ", False), ('."', False),
])
def test_boundary_text(text, want):
    assert is_boundary_text(text) is want


def test_boundary_table_sources():
    vocab = ["a", ".", "b\n", "c", "!"]
    assert boundary_ids_from_vocab(vocab) == [1, 2, 4]
    derived = boundary_ids_from_vocab(vocab)
    table = lambda **kw: boundary_table(SFIConfig(**kw), 5, derived, "cpu").nonzero().flatten().tolist()  # noqa: E731
    assert table() == [1, 2, 4]
    assert table(boundary=False) == []
    assert table(boundary_ids=(3,)) == [3]
    assert table(extra_boundary_ids=(0, 99)) == [0, 1, 2, 4]  # 99 is outside the vocab


def simulate(tokens, cfg, boundary_ids):
    """Run the policy step by step as the backend does; return the steps that were slow."""
    table = torch.zeros(50, dtype=torch.bool)
    table[list(boundary_ids)] = True
    ready, steps, slow_at = torch.tensor([True]), torch.tensor([0]), []
    for t, tok in enumerate(tokens):
        slow = slow_rows(torch.tensor([tok]), ready, steps, table, cfg)
        if slow.item():
            slow_at.append(t)
        steps = torch.where(slow, torch.zeros_like(steps), steps + 1)
    return slow_at


def expected(tokens, cfg, boundary_ids):
    out, steps = [], 0
    for t, tok in enumerate(tokens):
        slow = steps >= cfg.max_fast_steps or (tok in boundary_ids and steps >= cfg.min_refresh_gap)
        out.append(t) if slow else None
        steps = 0 if slow else steps + 1
    return out


def test_slow_exactly_at_boundaries_and_limit():
    rng = random.Random(0)
    tokens = [rng.choice([7] * 12 + [1]) for _ in range(400)]
    for cfg in (SFIConfig(max_fast_steps=16, min_refresh_gap=4), SFIConfig(max_fast_steps=96, min_refresh_gap=24),
                SFIConfig(max_fast_steps=10, min_refresh_gap=0), SFIConfig(boundary=False, max_fast_steps=12, min_refresh_gap=4)):
        ids = {1} if cfg.boundary else set()
        got = simulate(tokens, cfg, ids)
        assert got == expected(tokens, cfg, ids)
        assert got, "some slow steps must happen"


def test_rows_decide_independently():
    cfg = SFIConfig(max_fast_steps=8, min_refresh_gap=2)
    table = torch.zeros(10, dtype=torch.bool)
    table[3] = True
    fed = torch.tensor([3, 3, 5, 5, 3])
    ready = torch.tensor([True, True, True, False, True])
    steps = torch.tensor([5, 1, 8, 0, 2])
    assert slow_rows(fed, ready, steps, table, cfg).tolist() == [True, False, True, True, True]


def test_topk_positions():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    pos = topk_positions(scores, 3, lo=10)
    assert pos.dtype == torch.int32
    assert pos.tolist() == [[11, 12, 13], [10, 11, 12]]  # ties go to the earlier position
    assert topk_positions(scores, 9, lo=0).shape == (2, 5)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("rows", [1, 2])
def test_group_scores_is_mean_of_group_softmax(group, rows):
    torch.manual_seed(group * 10 + rows)
    hkv, d, n = 2, 8, 13
    q = torch.randn(rows, hkv * group, d)
    keys = torch.randn(n, hkv, d)
    got = group_scores(q, keys, 0.5, alpha=1.0, lambda_max=0.0)
    for h in range(hkv):
        probs = [torch.softmax(keys[:, h] @ q[w, h * group + j] * 0.5, 0) for w in range(rows) for j in range(group)]
        torch.testing.assert_close(got[h], torch.stack(probs).mean(0), atol=1e-6, rtol=1e-5)


def test_group_scores_with_prior_and_alpha():
    torch.manual_seed(0)
    q, keys = torch.randn(2, 8, 16), torch.randn(40, 2, 16)
    s = group_scores(q, keys, 0.25, alpha=0.5, lambda_max=0.25)
    assert s.shape == (2, 40) and torch.allclose(s.sum(-1), torch.ones(2))
    f = torch.softmax(torch.randn(3, 40), -1)
    r = torch.softmax(torch.randn(3, 40), -1)
    mixed = mix_prior(f, r, 0.25)
    lam = ((mixed - f) / (r - f)).median(dim=-1).values
    assert ((lam >= -1e-5) & (lam <= 0.25 + 1e-5)).all()
    assert torch.allclose(mixed.sum(-1), torch.ones(3))
