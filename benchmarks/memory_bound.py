"""How large must a model's memory be? The best any selection of a given size can do, against sfi's.

Teacher-forced on the CPU with the model's HF implementation (fp32), on ``fidelity.py``'s texts: in
the full-attention layers, each query of the last ``--steps`` positions attends to a memory of
``sinks + topk + recent`` tokens (the tail grows until the next slow step), chosen one of two ways:

- ``slow_step``: as sfi chooses, by the Selector's scoring (``sfi_sglang.kernels``' torch references:
  the power mean of the KV head's query group, neighbourhoods) from the query of the last slow step
  (every ``--refresh`` steps; the first from the last two prompt rows), slow steps dense;
- ``oracle``: the same scoring from the current query itself, at every step: no Selector of that
  size, however it predicts, can hold more of each step's attention.

Each step's next-token distribution is compared with dense decoding: top-1 agreement and mean KL. If
the oracle misses too, the model's attention is too spread for that memory, and only a larger one
(or dense attention in those layers) keeps it faithful. No span completion, no value triggers: this
bounds the memory size, not those.

    python benchmarks/memory_bound.py --model gemma3 --contexts 32000 16000 8000 8000 --texts 2 1 \
        --steps 256 --budgets 3072 8192 --recent 1024 --refresh 32 --out F
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity import corpus_text  # noqa: E402

from sfi_sglang.config import SFIConfig  # noqa: E402
from sfi_sglang.kernels.group_scores import group_scores_ref  # noqa: E402
from sfi_sglang.kernels.topk_select import topk_select_ref  # noqa: E402
from sfi_sglang.weights import MODELS  # noqa: E402


class Memory:
    """The full-attention layers' decode rows (the last ``steps`` positions) over a memory of ``cfg``'s size."""

    def __init__(self, cfg: SFIConfig, steps: int, refresh: int, oracle: bool):
        self.cfg, self.steps, self.refresh, self.oracle = cfg, steps, refresh, oracle

    def select(self, q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        """Memory mask over ``[0, n)`` chosen by queries ``q [R, Hq, D]`` (scaled) from keys ``k [n, Hkv, D]``."""
        c = self.cfg
        hi = max(c.sinks, n - c.recent)
        keep = torch.zeros(n, k.shape[1], dtype=torch.bool)
        keep[: c.sinks], keep[hi:] = True, True
        if hi - c.sinks > c.topk:
            r, hkv = q.shape[0], k.shape[1]
            logits = torch.einsum("rkgd,nkd->kgrn", q.view(r, hkv, -1, q.shape[-1]), k)  # query head = k * group + g
            logits = logits.flatten(1, 2).unsqueeze(0)  # [1, Hkv, group x R, n]: the group's queries
            pos = torch.arange(n, dtype=torch.int32).view(1, 1, -1)
            lo_hi = torch.tensor([c.sinks], dtype=torch.int32), torch.tensor([hi], dtype=torch.int32)
            f, total, _ = group_scores_ref(logits, pos, *lo_hi, c.alpha)
            sel = topk_select_ref(f, pos, c.topk, c.neighbor_window, total, lo_hi)[0]  # [Hkv, topk]
            keep.scatter_(0, sel.T.long(), True)
        else:
            keep[c.sinks:hi] = True
        return keep

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Outputs ``[steps, Hq, D]`` of the last ``steps`` queries (``q [L, Hq, D]``, ``k, v [L, Hkv, D]``)."""
        L, group = q.shape[0], q.shape[1] // k.shape[1]
        first = L - self.steps
        q = q * scale
        out, keep, last = [], self.select(q[first - 2:first], k[:first], first), first - 1
        for t in range(first, L):
            slow = t - last >= self.refresh
            if self.oracle and not slow:
                keep = self.select(q[t:t + 1], k[:t + 1], t + 1)
            kk, vv = k[: t + 1].repeat_interleave(group, 1), v[: t + 1].repeat_interleave(group, 1)
            logits = torch.einsum("hd,nhd->hn", q[t], kk)
            if not slow:
                held = torch.ones(t + 1, k.shape[1], dtype=torch.bool)
                held[: keep.shape[0]] = keep
                logits = logits.masked_fill(~held.repeat_interleave(group, 1).T, float("-inf"))
            out.append(torch.einsum("hn,nhd->hd", logits.softmax(-1), vv))
            if slow:
                keep, last = self.select(q[t:t + 1], k[:t + 1], t + 1), t
        return torch.stack(out)


def run(model, ids: list[int], steps: int, memory: Memory | None) -> torch.Tensor:
    """Log-probs ``[steps, vocab]`` of the last ``steps`` positions, the full layers served by ``memory``."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, mask, scaling=None, sliding_window=None, **kw):
        out, w = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling,
                                        sliding_window=sliding_window, **kw)
        if memory is not None and sliding_window is None:
            q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [L, heads, D]
            out = out.clone()
            out[0, -steps:] = memory.attend(q, k, v, scaling)
        return out, w

    AttentionInterface.register("sfi_memory_bound", attention)
    model.config._attn_implementation = "sfi_memory_bound"
    with torch.no_grad():
        logits = model(torch.tensor([ids]), logits_to_keep=steps + 1).logits[0, :-1]
    return logits.float().log_softmax(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--contexts", type=int, nargs="+", default=[8000], help="fidelity.py's text windows")
    p.add_argument("--texts", type=int, nargs="+", default=None, help="which windows to run (default: all)")
    p.add_argument("--corpus-offset", type=int, default=0)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--budgets", type=int, nargs="+", default=[3072], help="topk values")
    p.add_argument("--recent", type=int, default=SFIConfig.recent)
    p.add_argument("--refresh", type=int, default=32, help="steps between slow steps")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    convert, folder, name = MODELS[a.model]
    path = os.path.expanduser(folder)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path).encode(corpus_text())[a.corpus_offset:]
    result = {"model": name, "device": "cpu", "dtype": "float32", "steps": a.steps, "recent": a.recent,
              "refresh_every": a.refresh, "corpus_offset": a.corpus_offset, "command": " ".join(sys.argv), "rows": []}
    for text in a.texts if a.texts is not None else range(len(a.contexts)):
        start = sum(a.contexts[:text]) + text * a.steps
        window = ids[start:start + a.contexts[text] + a.steps]
        dense = run(model, window, a.steps, None)
        for topk in a.budgets:
            cfg = SFIConfig(topk=topk, recent=a.recent)
            for oracle in (False, True):
                lp = run(model, window, a.steps, Memory(cfg, a.steps, a.refresh, oracle))
                kl = (dense.exp() * (dense - lp)).sum(-1)
                row = {"context": a.contexts[text], "text": text, "topk": topk,
                       "memory": "oracle" if oracle else "slow_step",
                       "top1_agreement": round((lp.argmax(-1) == dense.argmax(-1)).float().mean().item(), 4),
                       "mean_kl": round(kl.mean().item(), 5), "p99_kl": round(kl.quantile(0.99).item(), 4)}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                with open(a.out, "w") as f:
                    json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
