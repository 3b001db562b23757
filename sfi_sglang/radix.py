"""Selections kept on radix-tree prefix nodes, so a request that re-sends a cached
prefix (the next turn of an agent loop) starts from the selection made for that
prefix instead of re-scoring all of it. The next chunk of a chunked prefill does
not: it scores its whole context, since a chain of records, each made from one
chunk's last queries, would keep only what those queries attended to, and the
prompt's question, in its last chunk, could not bring back what they dropped.

A :class:`SelectionRecord` made at the end of a prefill of ``n`` tokens holds, per
layer and KV head, the selected positions in ``[sinks, hi)`` with ``hi = n - recent``.
It depends only on tokens ``[0, n)``, and its positions are below ``hi``, so it
can serve any request that shares the first ``hi`` tokens: it is attached to the
shallowest node of the inserted path that contains token ``hi - 1`` (when that
node is split, it moves to the upper half if it still fits there). A new request
takes the deepest record on its matched path; the backend then scores only that
record's positions plus the tokens after ``hi`` (``Refresher.plan_prefill``).

Lifecycle: a node holds at most one record (the one reaching furthest); an
evicted node's record is dropped with it, ``reset`` (cache flush) drops them all,
and at most ``max_records`` are held (least recently used first out). Records
are copies (own GPU tensors), so a dropped record is never read through a stale
slot. :class:`SFIRadixCache` is sglang's ``RadixCache`` with these hooks, installed
through ``register_radix_cache_backend`` (``--radix-cache-backend sfi``, which the
plugin sets by default under ``--attention-backend sfi``).
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

logger = logging.getLogger("sfi_sglang")


@dataclass(frozen=True, eq=False)
class SelectionRecord:
    """Selected positions ``pos [layers, kv_heads, count]`` (int32, ascending) made for a prefix
    whose candidates ended at ``hi``."""

    hi: int
    count: int
    pos: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.pos.numel() * self.pos.element_size()


class _Offer:
    """A record offered to one request (held by the request object, so it dies with it)."""

    __slots__ = ("record", "__weakref__")

    def __init__(self, record: SelectionRecord | None):
        self.record = record


def node_end(node: TreeNode) -> int:
    """Tokens from the root to the end of ``node``."""
    n = 0
    while node.parent is not None:
        n += len(node.key)
        node = node.parent
    return n


class SelectionReuse:
    """Records on tree nodes and the hand-offs between the cache and the backend.

    backend -> cache: ``fresh[rid]``, the record a prefill just made, attached when the
    scheduler inserts the request's tokens into the tree. cache -> backend: the
    record found when a new request's prefix was matched, taken at its prefill.
    """

    def __init__(self, max_records: int):
        self.max_records = max_records
        self.held: OrderedDict[int, TreeNode] = OrderedDict()  # node id -> node holding a record, LRU first
        self.fresh: OrderedDict[str, SelectionRecord] = OrderedDict()
        self._offers: weakref.WeakValueDictionary[str, _Offer] = weakref.WeakValueDictionary()
        self.linked = False  # set once a radix cache uses this object
        self.hits = 0
        self.misses = 0
        self.nbytes = 0

    # ---- records on nodes -------------------------------------------------------------------

    def attach(self, last: TreeNode, rec: SelectionRecord) -> None:
        """Attach ``rec`` on the path ending at ``last``, at the shallowest node containing token ``hi - 1``."""
        node, end = last, node_end(last)
        if end < rec.hi:
            return
        while node.parent is not None and node.parent.parent is not None and end - len(node.key) >= rec.hi:
            end -= len(node.key)
            node = node.parent
        old = getattr(node, "sfi_record", None)
        if old is not None and old.hi > rec.hi:
            return
        self._set(node, rec)
        while len(self.held) > self.max_records:
            self.drop(next(iter(self.held.values())))

    def find(self, node: TreeNode) -> SelectionRecord | None:
        """The deepest record on the path from the root to ``node``."""
        while node is not None:
            rec = getattr(node, "sfi_record", None)
            if rec is not None:
                self.held.move_to_end(node.id)
                return rec
            node = node.parent
        return None

    def on_split(self, upper: TreeNode, lower: TreeNode) -> None:
        """``lower`` was split into ``upper`` + ``lower``: move its record up if it fits there."""
        rec = getattr(lower, "sfi_record", None)
        if rec is not None and node_end(upper) >= rec.hi:
            self.drop(lower)
            self._set(upper, rec)

    def drop(self, node: TreeNode) -> None:
        rec = getattr(node, "sfi_record", None)
        if rec is not None:
            node.sfi_record = None
            del self.held[node.id]
            self.nbytes -= rec.nbytes

    def clear(self) -> None:
        for node in list(self.held.values()):
            self.drop(node)
        self.fresh.clear()

    def _set(self, node: TreeNode, rec: SelectionRecord) -> None:
        self.drop(node)
        node.sfi_record = rec
        self.held[node.id] = node
        self.nbytes += rec.nbytes

    # ---- hand-offs --------------------------------------------------------------------------

    def offer(self, req, rec: SelectionRecord | None) -> None:
        """Cache side: ``rec`` is where ``req`` may start (None: nowhere)."""
        req.sfi_offer = _Offer(rec)
        self._offers[req.rid] = req.sfi_offer

    def take(self, rid: str) -> tuple[bool, SelectionRecord | None]:
        """Backend side, at a prefill: whether request ``rid`` was offered a record (its prefix
        was matched: a new request, not the next chunk of one), and that record (None: none
        found); once."""
        offer = self._offers.pop(rid, None)
        if offer is None:
            return False, None
        rec, offer.record = offer.record, None
        return True, rec

    def made(self, rid: str, rec: SelectionRecord) -> None:
        """Backend side: a prefill of ``rid`` made ``rec`` (kept until the cache inserts it)."""
        self.fresh[rid] = rec
        self.fresh.move_to_end(rid)
        while len(self.fresh) > max(self.max_records, 1):
            self.fresh.popitem(last=False)

    def settle(self, req, last: TreeNode | None) -> None:
        """Cache side, after inserting ``req``'s tokens up to ``last``: attach its fresh
        record, for later requests (not offered to the request's own next chunk)."""
        rec = self.fresh.pop(req.rid, None)
        if rec is not None and last is not None:
            self.attach(last, rec)

    def metrics(self) -> dict[str, float]:
        """Totals and sizes for ``SFIStats.log`` (Prometheus)."""
        return {"reuse_hits": self.hits, "reuse_misses": self.misses, "reuse_records": len(self.held),
                "reuse_bytes": self.nbytes}

    def summary(self) -> str:
        return (f"selection reuse: hits {self.hits}, misses {self.misses}, records {len(self.held)} "
                f"({self.nbytes / 2**20:.1f} MiB)")


class SFIRadixCache(RadixCache):
    """sglang's radix cache whose nodes also carry SFI selection records."""

    reuse: SelectionReuse
    coverage_of: Callable[[int], dict | None] | None

    @classmethod
    def adopt(cls, cache: RadixCache, reuse: SelectionReuse,
              coverage_of: Callable[[int], dict | None] | None = None) -> "SFIRadixCache":
        """Turn a freshly built ``RadixCache`` into this class. Building a second cache instead
        would register sglang's radix-cache Prometheus metrics twice (a startup crash under
        ``--enable-metrics``). ``coverage_of(req-pool slot)``: a finishing request's coverage
        summary, put in its response's ``meta_info["sfi_coverage"]``."""
        assert type(cache) is RadixCache
        cache.__class__ = cls
        cache.reuse, cache.coverage_of = reuse, coverage_of
        reuse.linked = True
        cache.reset()
        return cache

    def reset(self):
        super().reset()
        self.reuse.clear()

    def match_prefix(self, params):
        result = super().match_prefix(params)
        if params.req is not None:
            self.reuse.offer(params.req, self.reuse.find(result.last_device_node))
        return result

    def cache_unfinished_req(self, req, chunked=False):
        super().cache_unfinished_req(req, chunked=chunked)
        self.reuse.settle(req, req.last_node)

    def cache_finished_req(self, req, is_insert: bool = True, **kwargs):
        if self.coverage_of is not None and req.req_pool_idx is not None and req.output_ids:
            # sglang's customized_info is per output token: the summary goes with the last one
            info = req.customized_info if req.customized_info is not None else {}
            info["sfi_coverage"] = [None] * (len(req.output_ids) - 1) + [self.coverage_of(req.req_pool_idx)]
            req.customized_info = info
        super().cache_finished_req(req, is_insert=is_insert, **kwargs)
        self.reuse.fresh.pop(req.rid, None)

    def _split_node(self, key, child, split_len: int):
        upper = super()._split_node(key, child, split_len)
        self.reuse.on_split(upper, child)
        return upper

    def _delete_leaf(self, node):
        super()._delete_leaf(node)
        self.reuse.drop(node)


def create_radix_cache(ctx):
    """``--radix-cache-backend sfi``: sglang's default cache, with selection records when that
    default is the plain ``RadixCache`` and the attention backend is sfi's."""
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    cache = default_radix_cache_factory(ctx)
    backend = getattr(ctx.tp_worker.model_runner, "attn_backend", None)
    if not isinstance(getattr(backend, "reuse", None), SelectionReuse):  # not sfi's backend, or reuse off
        return cache
    if type(cache) is not RadixCache or cache.disable:
        logger.info("SFI: selection reuse is off with %s", type(cache).__name__ + (" (disabled)" if cache.disable else ""))
        return cache
    logger.info("SFI: selection reuse on (up to %d records on radix-tree nodes)", backend.reuse.max_records)
    return SFIRadixCache.adopt(cache, backend.reuse, backend.coverage_summary)
