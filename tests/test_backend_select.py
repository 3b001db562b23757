"""The backend's Selector refresh (``SFIBackend._select``) does not depend on how it batches
requests and layers within its scratch budget."""

import torch

import sfi_sglang.backend as backend
from sfi_sglang.backend import SFIBackend, _slow_step_refresh
from sfi_sglang.config import SFIConfig
from sfi_sglang.model_check import AttentionShape

LAYERS, HQ, HKV, D = 5, 4, 2, 16


def refresh(scratch: int, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Selections and coverage sums after a slow-step refresh of three requests of different lengths."""
    monkeypatch.setattr(backend, "SELECTOR_SCRATCH", scratch)
    g = torch.Generator().manual_seed(0)
    cfg = SFIConfig(topk=24, sinks=2, recent=8)
    lens = torch.tensor([90, 61, 40], dtype=torch.int32)
    req_to_token = torch.randperm(3 * 96, generator=g).int().view(3, 96)
    keys = [torch.randn(3 * 96, HKV, D, generator=g) for _ in range(LAYERS)]
    q = [torch.randn(3, HQ, D, generator=g) for _ in range(LAYERS)]
    b = SFIBackend.selector_only(cfg, AttentionShape(LAYERS, HQ, HKV, D, D, D ** -0.5, 0.0), keys.__getitem__,
                                 req_to_token, torch.device("cpu"))
    slots = torch.arange(3)
    lo, hi, count = b.store.bounds(lens)
    b.store.pos.copy_(torch.randint(0, 90, b.store.pos.shape, generator=g).sort(-1).values)  # previous selection
    r = _slow_step_refresh(slots, slots.view(-1, 1), lo.int(), hi.int(), lens, int(lens.max()),
                           (hi.int(), count.int()))
    b._select(range(LAYERS), q.__getitem__, r)
    return b.store.pos.clone(), b.store.cov_stats.clone()


def test_batching_does_not_change_the_selection(monkeypatch):
    whole = refresh(2**30, monkeypatch)
    for scratch in (1, 1500):  # one request and one layer per call; a few layers per call
        part = refresh(scratch, monkeypatch)
        assert torch.equal(part[0], whole[0])
        torch.testing.assert_close(part[1], whole[1])
