"""The node registry: live node records in the `qvm_nodes` JetStream KV bucket, cached in memory.

Every write is a compare-and-set on the key's revision (`Kv.update`), so two scheduler
replicas can never both take the same GPU: the loser's write fails, it re-reads and decides again.
Inside one replica, decisions are synchronous against a view that includes claims still being written
(tentative claims), so a burst of jobs spreads over nodes instead of queueing on the best one; writes
to one node are serialised by a per-node lock. A KV watch keeps the cache current with other replicas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from services.scheduler.placement import Claim, NodeRecord, with_claims
from shared.kv import Kv, Stale
from shared.telemetry import get_logger

__all__ = ["Conflict", "Registry"]

log = get_logger("qvm.scheduler.registry")
MIN_JOB_RAM_MIB = 64  # the smallest job a profile allows (shared.models.HardwareProfile)
Mutation = Callable[[NodeRecord | None], NodeRecord | None]


class Conflict(Exception):
    """A mutation found the node's current record no longer allows the change."""


class Registry:
    def __init__(self, kv: Kv) -> None:
        self.kv = kv
        self._confirmed: dict[str, tuple[NodeRecord, int]] = {}
        self._tentative: dict[str, dict[str, Claim]] = {}
        self._views: dict[str, NodeRecord] = {}
        self._buckets: dict[int, dict[str, None]] = {}
        self._bucket_of: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._job_nodes: dict[str, set[str]] = {}  # job id -> nodes holding a confirmed claim for it
        self.capacity_changed = asyncio.Event()

    # ------------------------------------------------------------ reading
    def get(self, node_id: str) -> NodeRecord | None:
        return self._views.get(node_id)

    def nodes(self) -> list[NodeRecord]:
        return list(self._views.values())

    def candidates(self, min_free_gpus: int) -> Iterator[NodeRecord]:
        """Views in ascending order of free GPUs, starting at `min_free_gpus`."""
        for k in sorted(b for b in self._buckets if b >= min_free_gpus):
            for node_id in list(self._buckets[k]):
                yield self._views[node_id]

    def node_of_job(self, job_id: str) -> list[str]:
        return sorted(self._job_nodes.get(job_id, ()))

    # ------------------------------------------------------------ cache upkeep
    def _refresh_view(self, node_id: str) -> None:
        conf = self._confirmed.get(node_id)
        old = self._views.get(node_id)
        if conf is None:
            self._views.pop(node_id, None)
            self._unbucket(node_id)
            return
        rec = conf[0]
        tent = self._tentative.get(node_id)
        view = with_claims(rec, {**rec.claims, **tent}) if tent else rec
        self._views[node_id] = view
        self._unbucket(node_id)
        if view.free_cpu() >= 1 and view.free_ram() >= MIN_JOB_RAM_MIB:  # a saturated node is no candidate
            k = len(view.free_gpus())
            self._buckets.setdefault(k, {})[node_id] = None
            self._bucket_of[node_id] = k
        if old is None or len(view.free_gpus()) > len(old.free_gpus()) or view.free_cpu() > old.free_cpu() \
                or view.status != old.status or view.draining != old.draining:  # an undrained node takes work
            self.capacity_changed.set()

    def _unbucket(self, node_id: str) -> None:
        k = self._bucket_of.pop(node_id, None)
        if k is not None:
            self._buckets[k].pop(node_id, None)
            if not self._buckets[k]:
                del self._buckets[k]

    def _store(self, node_id: str, rec: NodeRecord | None, rev: int) -> None:
        cur = self._confirmed.get(node_id)
        if cur is not None and cur[1] >= rev:
            return  # our own write, seen again through the watch, or an older one
        self._index_claims(node_id, cur[0] if cur else None, rec)
        if rec is None:
            self._confirmed.pop(node_id, None)
        else:
            self._confirmed[node_id] = (rec, rev)
        self._refresh_view(node_id)

    def _index_claims(self, node_id: str, old: NodeRecord | None, new: NodeRecord | None) -> None:
        before = set(old.claims) if old else set()
        after = set(new.claims) if new else set()
        for job in before - after:
            nodes = self._job_nodes.get(job)
            if nodes is not None:
                nodes.discard(node_id)
                if not nodes:
                    del self._job_nodes[job]
        for job in after - before:
            self._job_nodes.setdefault(job, set()).add(node_id)

    async def load_and_watch(self, stop: asyncio.Event, ready: asyncio.Event) -> None:
        """Load every record, then follow changes until `stop`."""
        async for entry in self.kv.watch(NodeRecord, stop):
            if entry is None:
                ready.set()
                continue
            cur = self._confirmed.get(entry.key)
            if cur is not None and cur[1] >= entry.revision:
                continue  # our own write coming back: already applied, skip decoding it
            rec = entry.value()
            if rec is None and not entry.deleted and entry.raw:
                log.warning("unreadable registry record skipped", extra={"node_id": entry.key})
                continue
            self._store(entry.key, rec, entry.revision)

    # ------------------------------------------------------------ tentative claims
    def hold(self, node_id: str, job_id: str, claim: Claim) -> None:
        self._tentative.setdefault(node_id, {})[job_id] = claim
        self._refresh_view(node_id)

    def unhold(self, node_id: str, job_id: str) -> None:
        tent = self._tentative.get(node_id)
        if tent and tent.pop(job_id, None) is not None:
            if not tent:
                del self._tentative[node_id]
            self._refresh_view(node_id)

    # ------------------------------------------------------------ writing
    async def update(self, node_id: str, mutate: Mutation) -> NodeRecord | None:
        """Apply `mutate` to the current record with compare-and-set, re-reading on conflict.

        `mutate` gets the confirmed record (None if absent) and returns the new one, None to delete,
        or raises `Conflict` to give up. Returns the record now stored.
        """
        lock = self._locks.setdefault(node_id, asyncio.Lock())
        async with lock:
            for _ in range(50):
                cur = self._confirmed.get(node_id)
                rec, rev = cur if cur else (None, 0)
                new = mutate(rec)
                if new is rec:
                    return rec
                try:
                    if new is None:
                        await self.kv.delete(node_id, rev)
                    else:
                        new_rev = await self.kv.update(node_id, new, rev)
                except Stale:  # another writer got there first: re-read, decide again
                    await self._reload(node_id)
                    continue
                if new is None:
                    self._store(node_id, None, rev + 1)
                    return None
                self._store(node_id, new, new_rev)
                return new
            raise Conflict(f"node {node_id}: too many concurrent writers")

    async def _reload(self, node_id: str) -> None:
        rec, rev, _ = await self.kv.get(node_id, NodeRecord)
        cur = self._confirmed.pop(node_id, None)
        self._index_claims(node_id, cur[0] if cur else None, rec)
        if rec is not None:
            self._confirmed[node_id] = (rec, rev)
        self._refresh_view(node_id)
