"""A multi-turn tool-calling agent over any OpenAI-compatible endpoint, with per-turn timing.

Each turn streams one chat completion; text deltas go to ``on_text`` as they come,
tool-call deltas are assembled, the tools run locally and their results go back as
``tool`` messages for the next turn. The loop stops when the model answers without
calling a tool, when a completion is cut by ``max_tokens``, or after ``max_turns``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sfi_sglang.agents.tools import Tool


@dataclass
class TurnStats:
    """One model call: wall time, time to the first streamed token, token counts, tools called."""

    seconds: float
    ttft: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    finish_reason: str | None
    tool_calls: list[str] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float | None:
        """Completion tokens per second after the first token."""
        if not self.completion_tokens or self.ttft is None or self.seconds <= self.ttft:
            return None
        return (self.completion_tokens - 1) / (self.seconds - self.ttft)


@dataclass
class AgentResult:
    answer: str
    stop: str  # "answer", "length" or "max_turns"
    messages: list[dict[str, Any]]
    turns: list[TurnStats]


class Agent:
    def __init__(self, client, model: str, tools: list[Tool], system: str | None = None, max_turns: int = 8,
                 max_tokens: int = 512, temperature: float = 0.0):
        self.client, self.model, self.system = client, model, system
        self.tools = {t.name: t for t in tools}
        self.max_turns, self.max_tokens, self.temperature = max_turns, max_tokens, temperature

    def run(self, user: str, history: list[dict[str, Any]] | None = None,
            on_text: Callable[[str], None] | None = None) -> AgentResult:
        """Answer ``user``, continuing ``history`` (earlier messages, e.g. previous turns of a session)."""
        messages = list(history) if history else ([{"role": "system", "content": self.system}] if self.system else [])
        messages.append({"role": "user", "content": user})
        turns: list[TurnStats] = []
        for _ in range(self.max_turns):
            text, calls, stats = self._complete(messages, on_text)
            turns.append(stats)
            msg: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
            messages.append(msg)
            if not calls:
                stop = "length" if stats.finish_reason == "length" else "answer"
                return AgentResult(text, stop, messages, turns)
            for c in calls:
                messages.append({"role": "tool", "tool_call_id": c["id"], "content": self._call(c)})
        return AgentResult("", "max_turns", messages, turns)

    def _call(self, call: dict[str, str]) -> str:
        """Run one tool; failures go back to the model as text, so it can recover."""
        tool = self.tools.get(call["name"])
        if tool is None:
            return f"error: no tool named {call['name']!r}"
        try:
            args = json.loads(call["arguments"] or "{}")
            return tool.fn(**args)
        except Exception as e:  # noqa: BLE001 - any tool failure is reported to the model
            return f"error: {type(e).__name__}: {e}"

    def _complete(self, messages, on_text) -> tuple[str, list[dict[str, str]], TurnStats]:
        t0 = time.perf_counter()
        extra = {"tools": [t.spec() for t in self.tools.values()]} if self.tools else {}
        stream = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=self.temperature,
            stream=True, stream_options={"include_usage": True}, **extra,
        )
        text, calls, ttft, finish, usage = [], {}, None, None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta
                if ttft is None and (delta.content or delta.tool_calls):
                    ttft = time.perf_counter() - t0
                if delta.content:
                    text.append(delta.content)
                    if on_text:
                        on_text(delta.content)
                for tc in delta.tool_calls or []:
                    c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    c["id"] = tc.id or c["id"] or f"call_{tc.index}"
                    if tc.function is not None:
                        c["name"] += tc.function.name or ""
                        c["arguments"] += tc.function.arguments or ""
                finish = choice.finish_reason or finish
        details = getattr(usage, "prompt_tokens_details", None)
        stats = TurnStats(
            seconds=time.perf_counter() - t0, ttft=ttft,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            cached_tokens=getattr(details, "cached_tokens", None), finish_reason=finish,
            tool_calls=[c["name"] for c in calls.values()],
        )
        return "".join(text), [calls[i] for i in sorted(calls)], stats
