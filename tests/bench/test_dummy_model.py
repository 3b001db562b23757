"""Dummy models' tokenizer (``sfi_sglang.dummy_model``): serving benchmarks send random ids and time the
text they get back, so every id must decode to text that encodes back to that id, and the chat endpoint
must have a template; sfi must read random output as plain words (no boundary, no value token)."""

import random

import pytest

from sfi_sglang.config import SFIConfig
from sfi_sglang.dummy_model import write_dummy_model
from sfi_sglang.policy import BOUNDARY, VALUE, RUN_START, token_classes, token_texts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(write_dummy_model(str(tmp_path_factory.mktemp("dummy")), "tiny"))


def test_every_id_decodes_and_round_trips(tokenizer):
    vocab = 320  # the "tiny" preset's
    assert len(tokenizer) == vocab
    ids = random.Random(0).choices(range(259, vocab), k=200)  # past the bytes and specials
    text = tokenizer.decode(ids)
    assert tokenizer.encode(text, add_special_tokens=False) == ids


def test_random_output_reads_as_words(tokenizer):
    classes = token_classes(SFIConfig(), 320, token_texts(tokenizer), "cpu")[259:]
    assert (classes == RUN_START).all() and not (classes & (BOUNDARY | VALUE)).any()


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
