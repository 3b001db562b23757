"""Span-complete selection: the Selector keeps whole runs of text, not parts of them.

A run is a stretch of tokens with no whitespace between them: a number, an id, a path, a
JSON value, an identifier. When a request copies one out of its context, each generated
token attends to the next token of the run, so a selection that holds only its first
tokens makes the copy go wrong after them (fast steps cannot see the rest). Here every
candidate scores as the best candidate of its run, so runs are kept or dropped whole.
Runs are cut every ``span_tokens`` tokens, so a long line without spaces (minified JSON,
base64) costs no more than its attended pieces.

Which token starts a run is a property of its id (``RUN_START`` in ``sfi_sglang.policy``'s token
classes: its text, read after another token, begins with whitespace). The backend records it per
KV-pool slot as tokens are written (:meth:`Spans.write`), so the Selector reads it for any
candidate, prompt or generated, cached prefix included.
"""

from __future__ import annotations

import torch


def run_ids(starts: torch.Tensor, cap: int) -> torch.Tensor:
    """Run index of each candidate (int64, same shape as ``starts [..., N]``), a run also starting
    after every ``cap`` tokens of a longer one."""
    idx = torch.arange(starts.shape[-1], device=starts.device, dtype=torch.int32)
    start_at = torch.where(starts, idx, 0).cummax(dim=-1).values  # where each candidate's run began
    return (starts | ((idx - start_at) % cap == 0)).cumsum(-1) - 1


def span_max(scores: torch.Tensor, starts: torch.Tensor, cap: int) -> torch.Tensor:
    """``scores [..., Hkv, N]`` (>= 0), ``starts`` (a run begins at the candidate; broadcast to ``scores``,
    e.g. one set for every layer) -> each candidate's score replaced, in place, by the best of its run
    (runs of at most ``cap`` candidates); returns ``scores``."""
    ids = run_ids(starts, cap).expand_as(scores)
    best = torch.zeros_like(scores).scatter_reduce_(-1, ids, scores, "amax")
    return torch.gather(best, -1, ids, out=scores)


class Spans:
    """Which KV-pool slots start a run, kept as tokens are written.

    ``table``: ``starts[token_id]`` (bool, on the device); ``slots``: the KV pool's size."""

    def __init__(self, table: torch.Tensor, slots: int, cap: int):
        self.table, self.cap = table, cap
        self.starts_at = torch.ones(slots, dtype=torch.bool, device=table.device)

    def write(self, input_ids: torch.Tensor, out_cache_loc: torch.Tensor) -> None:
        """Tokens ``input_ids`` are (being) written to the slots ``out_cache_loc``."""
        n = out_cache_loc.shape[0]
        self.starts_at[out_cache_loc] = self.table[input_ids[:n]]

    def starts(self, positions: torch.Tensor, req_slots: torch.Tensor, req_to_token: torch.Tensor) -> torch.Tensor:
        """Candidates ``positions [..., S, 1 or Hkv, N]`` (-1: padding) of the requests in req-pool rows
        ``req_slots [S]`` -> where a run starts: at a run-starting token, at padding, at the first
        candidate and wherever a candidate does not follow the previous one (a cached selection's gaps)."""
        rows = req_slots.view(-1, 1, 1).long()
        slot = req_to_token[rows, positions.clamp(min=0).long()]
        out = self.starts_at[slot] | (positions < 0)
        out[..., 0] = True
        out[..., 1:] |= positions[..., 1:] != positions[..., :-1] + 1
        return out

    def complete(self, scores: torch.Tensor, positions: torch.Tensor, req_slots: torch.Tensor,
                 req_to_token: torch.Tensor) -> torch.Tensor:
        """``scores [..., S, Hkv, N]`` of the candidates ``positions`` (broadcast to them) with each candidate
        scored as the best of its run (:func:`span_max`)."""
        return span_max(scores, self.starts(positions, req_slots, req_to_token), self.cap)
