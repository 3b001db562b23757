"""Selection records on radix-tree nodes: random insert / match / split / lock / evict / reset
sequences against sglang's real RadixCache (through SFIRadixCache), checked after every step."""

import random

import pytest
import torch

from sfi_sglang.radix import SelectionRecord, SelectionReuse, node_end

radix = pytest.importorskip("sglang.srt.mem_cache.radix_cache")
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache  # noqa: E402

from sfi_sglang.radix import SFIRadixCache  # noqa: E402


class Allocator:
    device = "cpu"

    def __init__(self):
        self.freed = 0

    def free_segment(self, value, start_pos=0):
        self.freed += len(value)


class Req:
    def __init__(self, rid: str):
        self.rid = rid


def path_tokens(node) -> tuple[int, ...]:
    parts = []
    while node.parent is not None:
        parts.append(tuple(node.key))
        node = node.parent
    return tuple(t for p in reversed(parts) for t in p)


def live_nodes(root) -> list:
    out, stack = [], [root]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children.values())
    return out


def make_record(tokens: tuple[int, ...], hi: int, made_for: dict) -> SelectionRecord:
    """A record whose positions encode the tokens it was made for (checked on reuse)."""
    count = min(hi, 3)
    pos = torch.tensor(sorted(random.Random(hash(tokens[:hi])).sample(range(hi), count)), dtype=torch.int32)
    rec = SelectionRecord(hi, count, pos.view(1, 1, -1).expand(2, 2, -1).clone())
    made_for[id(rec)] = tokens[:hi]
    return rec


def check(cache: SFIRadixCache, reuse: SelectionReuse, made_for: dict) -> None:
    nodes = live_nodes(cache.root_node)
    holders = [n for n in nodes if getattr(n, "sfi_record", None) is not None]
    assert {n.id for n in holders} == set(reuse.held)  # every held record is on a live node, and only those
    assert all(reuse.held[n.id] is n for n in holders)
    assert len(holders) <= reuse.max_records
    assert reuse.nbytes == sum(n.sfi_record.nbytes for n in holders)
    for n in holders:
        rec = n.sfi_record
        assert node_end(n.parent) < rec.hi <= node_end(n)  # on the shallowest node that covers it
        assert path_tokens(n)[: rec.hi] == made_for[id(rec)]  # made for the tokens it sits on


def new_cache(reuse: SelectionReuse) -> SFIRadixCache:
    return SFIRadixCache.adopt(RadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                                          token_to_kv_pool_allocator=Allocator(), page_size=1)), reuse)


@pytest.mark.parametrize("seed", range(6))
def test_record_lifecycle_fuzz(seed):
    rng = random.Random(seed)
    reuse = SelectionReuse(max_records=4)
    cache = new_cache(reuse)
    made_for: dict[int, tuple[int, ...]] = {}
    locked, next_slot, hits = [], 0, 0
    base = [rng.randrange(4) for _ in range(40)]
    for step in range(300):
        op = rng.random()
        # sequences share prefixes of `base` and then diverge, so nodes split often
        seq = tuple(base[: rng.randrange(1, 40)] + [rng.randrange(4) for _ in range(rng.randrange(0, 8))])
        if op < 0.35:  # a request's tokens are inserted; its prefill made a record
            value = torch.arange(next_slot, next_slot + len(seq), dtype=torch.int64)
            next_slot += len(seq)
            cache.insert(InsertParams(key=radix.RadixKey(list(seq)), value=value))
            last = cache.match_prefix(MatchPrefixParams(key=radix.RadixKey(list(seq)))).last_device_node
            reuse.made(f"r{step}", make_record(seq, rng.randrange(1, len(seq) + 1), made_for))
            reuse.settle(Req(f"r{step}"), last)
        elif op < 0.7:  # a new request matches its prefix and takes the offered record
            req = Req(f"m{step}")
            res = cache.match_prefix(MatchPrefixParams(key=radix.RadixKey(list(seq)), req=req))
            offered, rec = reuse.take(req.rid)
            assert offered and reuse.take(req.rid) == (False, None)  # offered once
            matched = len(res.device_indices)
            if rec is not None:
                hits += 1
                assert rec.hi <= matched
                assert seq[: rec.hi] == made_for[id(rec)]  # a record made for exactly these tokens
            # it is the deepest record on the matched path
            deepest = max((getattr(n, "sfi_record", None) for n in [res.last_device_node, *ancestors(res.last_device_node)]
                           if getattr(n, "sfi_record", None) is not None), key=lambda r: r.hi, default=None)
            assert rec is deepest
            if rng.random() < 0.5 and res.last_device_node is not cache.root_node:
                cache.inc_lock_ref(res.last_device_node)
                locked.append(res.last_device_node)
        elif op < 0.85 and locked:
            cache.dec_lock_ref(locked.pop(rng.randrange(len(locked))))
        elif op < 0.98:
            cache.evict(EvictParams(num_tokens=rng.randrange(1, 30)))
        else:
            for node in locked:
                cache.dec_lock_ref(node)
            locked = []
            cache.reset()
            assert not reuse.held and reuse.nbytes == 0
        check(cache, reuse, made_for)
    assert hits > 10


def ancestors(node):
    while node.parent is not None:
        node = node.parent
        yield node


def test_offer_dies_with_its_request():
    """An offer not taken (the request was aborted while queued) does not outlive the request."""
    reuse = SelectionReuse(max_records=2)
    req = Req("a")
    reuse.offer(req, SelectionRecord(5, 1, torch.zeros(1, 1, 1, dtype=torch.int32)))
    del req
    assert reuse.take("a") == (False, None)


def test_fresh_records_are_bounded():
    reuse = SelectionReuse(max_records=2)
    for i in range(5):
        reuse.made(str(i), SelectionRecord(5, 1, torch.zeros(1, 1, 1, dtype=torch.int32)))
    assert list(reuse.fresh) == ["3", "4"]


def test_next_chunk_is_offered_no_record():
    """A chunk's record serves later requests that match its prefix; the request's own next chunk
    scores its whole context (the prompt's last queries choose from all of it)."""
    reuse = SelectionReuse(max_records=2)
    cache = new_cache(reuse)
    seq, req = list(range(20)), Req("a")
    cache.insert(InsertParams(key=radix.RadixKey(seq), value=torch.arange(20)))
    rec = make_record(tuple(seq), 12, {})
    reuse.made("a", rec)
    reuse.settle(req, cache.match_prefix(MatchPrefixParams(key=radix.RadixKey(seq))).last_device_node)
    assert reuse.take("a") == (False, None)
    later = Req("b")
    cache.match_prefix(MatchPrefixParams(key=radix.RadixKey(seq + [99]), req=later))
    assert reuse.take("b") == (True, rec)
