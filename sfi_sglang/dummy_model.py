"""Weight-less model folders for ``--load-format dummy`` runs, offline.

``python -m sfi_sglang.dummy_model OUT --preset qwen3-4b`` writes config.json with the
preset's shapes and a byte-level tokenizer (a token per byte, then a placeholder word for every
further id, and a ChatML template), enough for sglang to start, for timing, serving benchmarks and
plumbing tests.
``--random-weights`` also saves random weights (small presets) for output checks.
"""

from __future__ import annotations

import argparse
import json
import os

_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
    "rope_theta": 1000000, "rope_scaling": None, "rms_norm_eps": 1e-6, "attention_bias": False,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "use_sliding_window": False,
    "sliding_window": None, "torch_dtype": "bfloat16", "bos_token_id": 256, "eos_token_id": 258,
}
PRESETS = {
    "qwen3-4b": {**_QWEN3, "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936,
                 "max_position_embeddings": 131072, "max_window_layers": 36, "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
                 "max_position_embeddings": 131072, "max_window_layers": 36, "tie_word_embeddings": False},
    # Tiny: CPU tests. GQA 2, 2 layers, fp32.
    "tiny": {**_QWEN3, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 320,
             "max_position_embeddings": 4096, "max_window_layers": 2, "tie_word_embeddings": False,
             "torch_dtype": "float32"},
    # Small: GPU plumbing checks (head_dim 128, as FlashInfer kernels need). GQA 4, 2 layers.
    "small": {**_QWEN3, "hidden_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 1024, "vocab_size": 320,
              "max_position_embeddings": 32768, "max_window_layers": 2, "tie_word_embeddings": False},
}


def _gemma3(layers: int, every: int = 6, **shape) -> dict:
    """A Gemma 3 text config: sliding-window layers with every ``every``-th layer full attention; Gemma 3's
    vocabulary, 1024-token window and 128K context unless ``shape`` says otherwise."""
    return {
        "vocab_size": 262208, "sliding_window": 1024, "max_position_embeddings": 131072,
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6, "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16",
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        "bos_token_id": 256, "eos_token_id": 258, "pad_token_id": 257, "tie_word_embeddings": True,
        "num_hidden_layers": layers,
        "layer_types": ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)],
        "query_pre_attn_scalar": shape["head_dim"], **shape,
    }


PRESETS |= {
    # Sliding-window hybrids: Gemma 3 shapes (window 1024, one full-attention layer in six).
    "gemma3-4b": _gemma3(34, hidden_size=2560, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                         intermediate_size=10240),
    "gemma3-12b": _gemma3(48, hidden_size=3840, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                          intermediate_size=15360),
    # Tiny: CPU tests. 6 layers, full attention at layers 2 and 5, a 32-token window, fp32.
    "tiny-gemma3": {**_gemma3(6, every=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              intermediate_size=128, vocab_size=320, sliding_window=32, max_position_embeddings=4096),
                    "torch_dtype": "float32"},
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (ByteLevel pre-tokenizer)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _placeholder(i: int) -> str:
    """Text of token ``i`` beyond the bytes and specials: a space, then letters (so sfi's token classes
    read it as a word of its own: no boundary, no number, the start of a run)."""
    letters = ""
    while True:
        i, r = divmod(i, 26)
        letters += chr(ord("a") + r)
        if not i:
            return f" <{letters}>"


def tokenizer_json(vocab_size: int) -> dict:
    """Byte-level tokenizer with a token for every id below ``vocab_size``: bytes, specials, then
    placeholders (added tokens, so a decoded placeholder encodes back to its one id: random prompts
    and random outputs round-trip at their length, as serving benchmarks need)."""
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    added = []
    for i, s in enumerate(SPECIALS + [_placeholder(i) for i in range(256 + len(SPECIALS), vocab_size)], start=256):
        vocab[s] = i
        added.append({"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": i < 256 + len(SPECIALS)})
    level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **level}, "post_processor": None,
        "decoder": {"type": "ByteLevel", **level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }


# ChatML, so the OpenAI chat endpoint serves dummy models too (multi-turn serving loads)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_dummy_model(out: str, preset: str = "qwen3-4b", **overrides) -> str:
    """Write config + tokenizer for ``preset`` (with config ``overrides``) into ``out``; returns ``out``."""
    config = {**PRESETS[preset], **overrides}
    os.makedirs(out, exist_ok=True)
    files = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": 256, "eos_token_id": 258},
        "tokenizer.json": tokenizer_json(config["vocab_size"]),
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config["max_position_embeddings"],
            "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
        },
    }
    for name, data in files.items():
        with open(os.path.join(out, name), "w") as f:
            json.dump(data, f, indent=1)
    return out


def write_random_weights(out: str, seed: int = 0) -> None:
    """Save random weights for the config in ``out``, scaled so that attention is peaked and
    outputs depend on the context (sglang's dummy loader gives near-uniform attention)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(out)
    model = AutoModelForCausalLM.from_config(config, dtype=config.dtype or torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0.0, 0.6)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Gemma normalises q and k: scale (1 + w)
                p.fill_(2.0)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                # Gemma scales its (tied) embeddings by sqrt(hidden): smaller ones keep the output from
                # echoing the input token
                p.normal_(0.0, 0.4 * config.hidden_size ** -0.5 if config.model_type.startswith("gemma") else 1.0)
    model.save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-4b")
    p.add_argument("--random-weights", action="store_true", help="also save peaked random weights")
    args = p.parse_args()
    write_dummy_model(args.out, args.preset)
    if args.random_weights:
        write_random_weights(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
