"""Local tools for the agent loop: a calculator and file search / read confined to a folder."""

from __future__ import annotations

import ast
import operator
import os
import re
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Tool:
    """A function the model may call: name, description, JSON-schema parameters."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., str]

    def spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(expression: str) -> float | int:
    """Arithmetic on numbers only (+ - * / // % ** and parentheses); anything else raises ValueError."""

    def ev(node: ast.AST):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression element: {type(node).__name__}")

    try:
        return ev(ast.parse(expression, mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from e


def calculator() -> Tool:
    return Tool("calculator", "Evaluate an arithmetic expression, e.g. '(3 + 4) * 2 ** 5'.",
                {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
                lambda expression: str(evaluate(expression)))


def _inside(root: str, path: str) -> str:
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([full, os.path.realpath(root)]) != os.path.realpath(root):
        raise ValueError(f"path outside the allowed folder: {path!r}")
    return full


def file_search(root: str, max_hits: int = 50) -> Tool:
    """Case-insensitive regex search over the text files under ``root``: ``file:line: text``."""

    def search(pattern: str) -> str:
        rx = re.compile(pattern, re.IGNORECASE)
        hits = []
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        for i, line in enumerate(f, 1):
                            if rx.search(line):
                                hits.append(f"{os.path.relpath(path, root)}:{i}: {line.strip()[:200]}")
                                if len(hits) >= max_hits:
                                    return "\n".join(hits + [f"(stopped at {max_hits} hits)"])
                except (UnicodeDecodeError, OSError):
                    continue
        return "\n".join(hits) or "no matches"

    return Tool("file_search", f"Search the documents (regex, case-insensitive); returns up to {max_hits} "
                "matching lines as file:line: text.",
                {"type": "object", "properties": {"pattern": {"type": "string"}}, "required": ["pattern"]}, search)


def read_file(root: str, max_lines: int = 200) -> Tool:
    """Lines ``start..start+count`` of a file under ``root``."""

    def read(path: str, start: int = 1, count: int = max_lines) -> str:
        with open(_inside(root, path), encoding="utf-8") as f:
            lines = f.read().splitlines()
        start = max(1, int(start))
        chunk = lines[start - 1 : start - 1 + min(int(count), max_lines)]
        return "\n".join(f"{start + i}: {line}" for i, line in enumerate(chunk)) or "(no lines there)"

    return Tool("read_file", f"Read up to {max_lines} lines of a document, from line `start` (1-based).",
                {"type": "object", "properties": {"path": {"type": "string"}, "start": {"type": "integer"},
                                                  "count": {"type": "integer"}}, "required": ["path"]}, read)
