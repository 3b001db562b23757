"""The one-launch decode plan (Triton) against its torch composition."""

import pytest
import torch

from sfi_sglang.config import SFIConfig
from sfi_sglang.kernels.plan_step import StepRows, plan_step, plan_step_ref
from sfi_sglang.memory import SelectionStore

CFG = SFIConfig(sinks=3, topk=20, recent=5, max_fast_steps=6, min_refresh_gap=2, slow_logit_rows=2)
SLOTS, VOCAB = 12, 50


def state(seed: int, dev: str):
    g = torch.Generator().manual_seed(seed)
    store = SelectionStore(CFG, 2, SLOTS, 2, dev)
    store.ready.copy_(torch.rand(SLOTS, generator=g) < 0.8)
    store.steps.copy_(torch.randint(0, 8, (SLOTS,), generator=g))
    store.run.copy_(torch.randint(0, 8, (SLOTS,), generator=g))
    hi = torch.randint(0, 30, (SLOTS,), generator=g)
    store.hi.copy_(hi)
    store.count.copy_(torch.minimum(hi, torch.randint(0, 20, (SLOTS,), generator=g)))
    table = torch.randint(0, 8, (VOCAB,), generator=g, dtype=torch.uint8).to(dev)  # token classes: all bit mixes
    return store, torch.zeros(5, dtype=torch.int64, device=dev), table


@pytest.mark.parametrize("bs, real", [(1, 1), (7, 7), (8, 5), (16, 0)])
def test_triton_plan_matches_reference(bs, real):
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on CPU
    g = torch.Generator().manual_seed(bs * 10 + real)
    slots = torch.cat([torch.randperm(SLOTS - 1, generator=g)[:real] + 1, torch.zeros(bs - real, dtype=torch.long)])
    seq_lens = torch.cat([torch.randint(20, 60, (real,), generator=g), torch.ones(bs - real, dtype=torch.long)])
    ids = torch.randint(0, VOCAB + 5, (bs,), generator=g)  # ids past the table are clamped
    outs = []
    for fn in (plan_step_ref, plan_step):
        store, acc, table = state(bs, dev)
        rows = StepRows.zeros(bs + 3, dev)  # longer than the batch: rows past bs stay untouched
        fn(ids.to(dev), slots.to(dev), seq_lens.to(dev), real, bs, table, store.ready, store.steps, store.run,
           store.hi, store.count, rows, acc, sinks=CFG.sinks, recent=CFG.recent, topk=CFG.topk, max_fast=CFG.max_fast_steps,
           min_gap=CFG.min_refresh_gap, logit_rows=CFG.slow_logit_rows)
        outs.append([rows.slow, rows.slots[:real], rows.hi[:real], rows.count[:real], store.hi, store.count,
                     store.steps, store.run, store.ready, acc, rows.logit_row])
    for a, b in zip(*outs):
        assert torch.equal(a.cpu(), b.cpu())
    assert outs[0][0][real:bs].all() and not outs[0][0][bs:].any()  # padding rows are slow
    ready = state(bs, "cpu")[0].ready[slots[:real]]
    assert (outs[0][3].cpu()[~ready] == -1).all()  # rows with no selection before the step
    # kept logits: the first two slow rows whose region (n - sinks - recent) exceeds topk, in batch order
    slow = outs[0][0][:real].cpu()
    scored = (slow & (seq_lens[:real] - 3 - 5 > 20)).nonzero().flatten()[:2].tolist()
    logit_row = outs[0][-1].cpu()
    assert logit_row[:bs].tolist() == [scored.index(i) if i in scored else -1 for i in range(bs)]
    assert (logit_row[bs:] == -1).all()
