"""A small agent library for OpenAI-compatible servers (sglang with ``--attention-backend sfi`` or any other)."""

from sfi_sglang.agents.loop import Agent, AgentResult, TurnStats
from sfi_sglang.agents.server import LocalServer, metric_totals
from sfi_sglang.agents.tools import Tool, calculator, evaluate, file_search, read_file

__all__ = ["Agent", "AgentResult", "LocalServer", "Tool", "TurnStats", "calculator", "evaluate", "file_search",
           "metric_totals", "read_file"]
