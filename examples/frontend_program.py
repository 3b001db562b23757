"""A multi-turn SGLang frontend program (``sgl.function`` / ``sgl.gen``) against a running server.

    python -m sglang.launch_server --model-path Qwen/Qwen3-4B --attention-backend sfi --cuda-graph-backend-prefill disabled
    python examples/frontend_program.py --url http://127.0.0.1:30000

The document goes in once, as the shared prefix of every turn; each answer is
generated with ``sgl.gen`` and becomes part of the next turn's prompt.
"""

from __future__ import annotations

import argparse
import time

import sglang as sgl

def document(entries: int) -> str:
    """Sensor log of ``entries`` lines (about 13 tokens each) ending with the fact the questions ask for."""
    lines = [f"Entry {i}: sensor {i % 17} read {(i * 37) % 101} units." for i in range(entries)]
    return " ".join(lines + [f"Entry {entries}: the calibration code is 7319."])


@sgl.function
def review(s, document: str, questions: list[str], max_tokens: int):
    s += sgl.system("Answer questions about the document. Be brief.")
    s += sgl.user("Document:\n" + document)
    s += sgl.assistant("I have read the document.")
    for i, q in enumerate(questions):
        s += sgl.user(q)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=max_tokens, temperature=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--entries", type=int, default=1500, help="document size (1500: about 20K tokens)")
    args = ap.parse_args()
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    questions = ["What is the calibration code?", "What did sensor 3 read in entry 3?",
                 "Repeat the calibration code and add 1 to it."]
    t0 = time.perf_counter()
    state = review.run(document=document(args.entries), questions=questions, max_tokens=args.max_tokens)
    for i, q in enumerate(questions):
        print(f"Q: {q}\nA: {state[f'answer_{i}'].strip()}\n")
    print(f"{time.perf_counter() - t0:.1f} s for {len(questions)} turns")


if __name__ == "__main__":
    main()
