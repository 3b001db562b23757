"""Long-context agent session against an OpenAI-compatible server (sglang with sfi by default).

    python examples/agent_demo.py --url http://127.0.0.1:30000/v1        # a running server
    python examples/agent_demo.py --model-path Qwen/Qwen3-4B              # start sglang --attention-backend sfi

The agent answers several questions over a folder of documents (``--docs``; by
default a generated log with planted facts), reading them with its file tools, in
one growing conversation: every turn re-sends the whole history, which sglang's
radix cache serves from cache. Per model call it prints wall time, time to first
token, prompt / cached / completion tokens, decode tokens/s and the tools called; per
question, the selection-reuse hits and misses of sfi (read from the server's ``/metrics``,
so the server needs ``--enable-metrics``; cached tokens need ``--enable-cache-report``: the
demo passes both to a server it starts).

On a CPU, with the real SmolLM2-135M weights (``python -m sfi_sglang.weights smollm2``; its chat
template has no tools, so each question is one call), from a source checkout:

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=tests/stubs SFI_CONFIG='{"topk": 128, "recent": 64}' \
    python examples/agent_demo.py --model-path ~/.cache/sfi-sglang/smollm2-135m --max-tokens 48 \
        --server-args "--device cpu --cuda-graph-backend-prefill disabled --cuda-graph-backend-decode disabled \
        --enable-metrics --enable-cache-report --max-total-tokens 16384"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile

from openai import OpenAI

from sfi_sglang.agents import Agent, LocalServer, calculator, file_search, metric_totals, read_file

HITS, MISSES = "sglang:sfi_reuse_hits_total", "sglang:sfi_reuse_misses_total"

QUESTIONS = [
    "Which host reported the disk failure? Search the logs.",
    "What is the passkey mentioned in the logs?",
    "How many requests were served in total on the day with the outage? Use the calculator on the counts.",
    "Summarise in one sentence what happened during the outage.",
    "Which host failed first in the outage, and at what time (the line's timestamp)?",
]


def make_docs(folder: str, lines: int = 4000, seed: int = 0) -> None:
    """A service log with a few planted facts the questions ask about."""
    rng = random.Random(seed)
    hosts = [f"web-{i:02d}" for i in range(12)]
    facts = {lines // 5: "ERROR web-07: disk failure on /dev/sdb, host taken out of rotation.",
             lines // 2: "NOTE the maintenance passkey is 58213; keep it private.",
             3 * lines // 4: "OUTAGE web-03 stopped answering; web-05 and web-09 followed three minutes later."}
    with open(os.path.join(folder, "service.log"), "w") as f:
        for i in range(lines):
            t = f"{8 + i * 12 // lines:02d}:{i % 60:02d}"
            f.write(f"{t} {facts[i]}\n" if i in facts else
                    f"{t} INFO {rng.choice(hosts)} served {rng.randint(50, 900)} requests, p99 {rng.randint(20, 400)} ms\n")
    with open(os.path.join(folder, "daily_counts.txt"), "w") as f:
        f.write("Requests served on the outage day, per region: eu 182340, us 240119, asia 99871.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="OpenAI-compatible base URL of a running server")
    ap.add_argument("--model-path", help="start sglang with --attention-backend sfi on this model")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--server-args", default="--cuda-graph-backend-prefill disabled --enable-metrics --enable-cache-report")
    ap.add_argument("--docs", help="folder the tools may read (default: a generated log)")
    ap.add_argument("--max-tokens", type=int, default=400)
    args = ap.parse_args()
    if not (args.url or args.model_path):
        ap.error("give --url or --model-path")

    with contextlib.ExitStack() as stack:
        url = args.url
        if args.model_path:
            print("starting sglang with --attention-backend sfi on", args.model_path, flush=True)
            srv = stack.enter_context(LocalServer(args.model_path, args.server_args.split(), port=args.port))
            url = srv.url
        client = OpenAI(base_url=url, api_key="none", timeout=600)
        model = client.models.list().data[0].id
        docs = args.docs or tempfile.mkdtemp(prefix="sfi-docs-")
        if not args.docs:
            make_docs(docs)
        agent = Agent(client, model, [file_search(docs), read_file(docs), calculator()], max_tokens=args.max_tokens,
                      system="You answer questions about the documents in a folder. Use the tools to read them; "
                             "quote what you found. Be brief.")
        history = None
        print(f"{'turn':>4} {'call':>4} {'s':>6} {'ttft':>6} {'prompt':>7} {'cached':>7} {'out':>5} {'tok/s':>6}  tools")
        before = metric_totals(url)
        for n, question in enumerate(QUESTIONS, 1):
            print(f"\n[{n}] {question}")
            res = agent.run(question, history=history, on_text=lambda t: print(t, end="", flush=True))
            print()
            for i, t in enumerate(res.turns, 1):
                tok_s = f"{t.decode_tok_s:6.1f}" if t.decode_tok_s else "     -"
                print(f"{n:>4} {i:>4} {t.seconds:6.2f} {t.ttft or 0:6.2f} {t.prompt_tokens or 0:>7} "
                      f"{t.cached_tokens or 0:>7} {t.completion_tokens or 0:>5} {tok_s}  {','.join(t.tool_calls)}")
            after = metric_totals(url)
            if after is not None:
                grew = lambda k: after.get(k, 0) - (before or {}).get(k, 0)  # noqa: E731
                print(f"     selection reuse: {grew(HITS):.0f} hits, {grew(MISSES):.0f} misses")
            history, before = res.messages, after


if __name__ == "__main__":
    main()
