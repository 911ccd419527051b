"""The key-broker: envelope encryption of job volume keys, released only to attested instances.

consume  job.submitted, instance.provisioning, instance.attested, and every event that ends a job or its
         instance (instance.destroyed / instance.attestation_failed, job.failed / cancelled / done)
         through one work queue shared by all replicas; attest.revoked
decide   `release_policy.decide_release` on the job's stored record, the verified result and the clock
act      make a job's data-encryption key (DEK) and store it only wrapped under the current KEK; unwrap it
         in RAM, seal it with HPKE to the attested instance's ephemeral key, overwrite the plaintext; mark
         the key destroyed (compare-and-set to a tombstone, then every earlier revision erased: the store
         overwrites its bytes); a rewrap under a rotated KEK erases the old copies at once (`store`)
emit     key.released (sealed, one instance at a time), key.release_refused (reason code),
         key.destroyed (evidence: digests and counts, never key material)

KEKs live only in this process's memory (`KekRing`, loaded at start from the configured source); a DEK is
in the clear only for the moment it is generated or sealed, in a buffer that is then overwritten. Nothing
secret is logged. Event ids derive from their cause, so a redelivery or a second replica publishes once.

The per-key crypto (AES-256-GCM wrap or unwrap under the KEK: microseconds; an HPKE seal: one X25519 key
pair and agreement, tens of microseconds) runs on the event loop, as the bus's signature checks do: a
hop to a worker thread and back cost more than the work (a thread-pool future, a wake-up of the loop, the
GIL handed over twice each way; `make bench` section 6 profiled it at a fifth of the broker's time per
release). Only loading the KEK ring (scrypt, or a KMS call) goes to a thread.

Each replica remembers the job records it last wrote or read (`RecordCache`), so a result that follows
its instance's announcement through the same replica is decided without reading the record again. The
remembered copy is only ever a starting point: a release is a compare-and-set on the revision it was
decided on (a copy another replica has since superseded fails it, and the record is read again), and a
decision that ends without a compare-and-set (a refusal, the re-publication of a release) is always taken
on a record read from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import TypeVar

from services.key_broker.release_policy import Decision, decide_release
from services.key_broker.settings import KeyBrokerSettings
from services.key_broker.store import BUCKET, MAX_SPENT, JobKeys, NodeRevocation, job_key, node_key
from shared.bus import Bus
from shared.codec import Event
from shared.consumers import consumer_spec
from shared.crypto import hpke
from shared.crypto.kek import KekRing, WrappedKey, load_ring
from shared.crypto.secret import random_secret, zeroize
from shared.errors import ConfigError, NotYet
from shared.events import (
    InstanceAttestationFailed,
    InstanceAttested,
    InstanceDestroyed,
    InstanceProvisioning,
    JobCancelled,
    JobDone,
    JobFailed,
    JobSubmitted,
    KeyDestruction,
    KeyReleased,
    KeyReleaseRefused,
    KeysDestroyed,
    NodeRevoked,
)
from shared.identity import Role
from shared.ids import derive_event_id
from shared.kv import Kv, Stale
from shared.runtime import run_together
from shared.telemetry import get_logger

__all__ = ["DEK_BYTES", "KeyBroker", "dek_aad"]

Record = TypeVar("Record", JobKeys, NodeRevocation)

log = get_logger("qvm.key_broker")
DEK_BYTES = 32
CAS_TRIES = 8
WAIT_FOR_SUBMISSION = 4
"""Deliveries of an instance's announcement or verdict the broker waits (the consumer's back-off: about 4 s)
for the job's record, when the submission may still be in another replica's hands."""
ANNOUNCE_WAIT_S = 2.0  # an attestation result may overtake its instance's announcement between replicas
RECORDS_REMEMBERED = 4096


class RecordCache:
    """The job records this replica last wrote or read, with their store revisions (most recent last)."""

    def __init__(self, size: int = RECORDS_REMEMBERED) -> None:
        self.size = size
        self._records: OrderedDict[str, tuple[JobKeys, int]] = OrderedDict()

    def get(self, job_id: str) -> tuple[JobKeys, int] | None:
        return self._records.get(job_id)

    def put(self, job_id: str, record: JobKeys, revision: int) -> None:
        self._records[job_id] = (record, revision)
        self._records.move_to_end(job_id)
        while len(self._records) > self.size:
            self._records.popitem(last=False)

    def forget(self, job_id: str) -> None:
        self._records.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._records)


def dek_aad(job_id: str) -> bytes:
    """What a wrapped DEK is bound to: a copy moved to another job's record does not unwrap."""
    return b"qvm-volume-dek\x00" + job_id.encode()


class KeyBroker:
    def __init__(self, bus: Bus, settings: KeyBrokerSettings, ring: KekRing, kv: Kv) -> None:
        self.bus = bus
        self.settings = settings
        self.ring = ring
        self.kv = kv
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.released = 0
        self.refused = 0
        self.revocations: dict[str, NodeRevocation] = {}
        self.revocations_loaded = asyncio.Event()
        self.records = RecordCache()

    @classmethod
    async def create(cls, bus: Bus, settings: KeyBrokerSettings) -> KeyBroker:
        ring = await asyncio.to_thread(load_ring, settings)
        kv = await bus.kv(BUCKET)
        if not await kv.erasable():  # a destroyed key must not stay in the store's files
            raise ConfigError(f"the key store {BUCKET} cannot erase what it removes (made before erasure, or by "
                              f"hand): run `qvm provision`")
        log.info("key-broker ready", extra={"kek_versions": len(ring.versions), "kek_current": ring.current})
        return cls(bus, settings, ring, kv)

    async def run(self, stop: asyncio.Event) -> None:
        follower = asyncio.create_task(self._follow_revocations(stop))
        try:
            await asyncio.wait_for(self.revocations_loaded.wait(), 30)  # no release decided without them
            await run_together(
                self.bus.consume(consumer_spec(Role.KEY_BROKER, "jobs"), self.on_job_event, stop,
                                 max_inflight=self.settings.max_inflight),
                self.bus.consume(consumer_spec(Role.KEY_BROKER, "revocations"), self.on_revoked, stop),
            )
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await follower
            self.ring.close()  # KEKs overwritten when the broker stops

    # ================================================================ consume
    async def on_job_event(self, event: Event) -> None:
        job_id = event.job_id or ""
        seen: tuple[JobKeys | None, int, bool] = (None, 0, False)
        if isinstance(event.payload, InstanceAttested):
            seen = await self._announced(job_id, event.payload.instance_id or "")
        async with self._locks[job_id]:  # one decision per job at a time in this replica (CAS across replicas)
            match event.payload:
                case JobSubmitted() as spec:
                    await self.on_submitted(job_id, spec, event)
                case InstanceProvisioning() as p:
                    await self.on_announced(job_id, p, event)
                case InstanceAttested() as result:
                    await self.on_attested(job_id, result, event, seen)
                case InstanceDestroyed():
                    await self.destroy(job_id, "instance_destroyed")
                case InstanceAttestationFailed():
                    await self.destroy(job_id, "attestation_failed")
                case JobFailed():
                    await self.destroy(job_id, "job_failed")
                case JobCancelled():
                    await self.destroy(job_id, "job_cancelled")
                case JobDone():
                    await self.destroy(job_id, "job_done")
        lock = self._locks.get(job_id)
        if lock is not None and not lock.locked():
            # Only to bound memory: the compare-and-set on the record is what keeps decisions apart.
            self._locks.pop(job_id, None)

    async def on_revoked(self, event: Event) -> None:
        """A node that lost its trust gets nothing more, and the keys of its jobs are destroyed."""
        p = event.payload
        assert isinstance(p, NodeRevoked)
        node = event.node_id or ""
        revoked = NodeRevocation(node_id=node, revoked_ns=event.envelope.time_ns, reason=p.reason)

        def later(cur: NodeRevocation | None) -> NodeRevocation | None:
            return revoked if cur is None or cur.revoked_ns < revoked.revoked_ns else None

        self._remember(revoked)  # at once here; the other replicas see it through their watch
        await self._cas(node_key(node), NodeRevocation, later)
        for key in await self.kv.keys():
            if not key.startswith("job."):
                continue
            record, _, _ = await self.kv.get(key, JobKeys)
            if isinstance(record, JobKeys) and record.node_id == node and not record.destruction_reported:
                async with self._locks[record.job_id]:
                    await self.destroy(record.job_id, "node_revoked")

    # ================================================================ act: make
    async def on_submitted(self, job_id: str, spec: JobSubmitted, event: Event) -> None:
        if spec.volume_mib == 0:
            return  # nothing of this job's passes through the broker
        existing, _, _ = await self.kv.get(job_key(job_id), JobKeys)
        if existing is not None:
            return  # a redelivery: the key exists already
        dek = random_secret(DEK_BYTES)
        try:
            wrapped = self.ring.wrap(dek, dek_aad(job_id))
        finally:
            zeroize(dek)
        blob = wrapped.to_bytes()
        record = JobKeys(job_id=job_id, submitted_id=event.id, policy=spec.key_release, security=spec.security,
                         wrapped=blob.hex(), kek_version=wrapped.kek_version,
                         wrapped_sha256=hashlib.sha256(blob).hexdigest(), plaintext_buffers_zeroed=1)
        if revision := await self.kv.create(job_key(job_id), record):
            self.records.put(job_id, record, revision)
            log.info("volume key made", extra={"kek_version": wrapped.kek_version})

    async def _await_submission(self, job_id: str, event: Event) -> bool:
        """Whether the job's record exists; if not, and the job's submission may still be in another
        replica's hands (this event overtook it in the shared work queue), hand the event back for a while
        (`NotYet`) before taking the job as one without a volume key."""
        got, _, _ = await self.kv.get(job_key(job_id), JobKeys)
        if got is not None:
            return True
        if event.deliveries < WAIT_FOR_SUBMISSION:
            raise NotYet(f"no record of job {job_id} yet")
        return False

    async def on_announced(self, job_id: str, p: InstanceProvisioning, event: Event) -> None:
        node = event.node_id or ""
        if not await self._await_submission(job_id, event):
            return  # a job without a volume key: nothing to announce to

        def add(cur: JobKeys | None) -> JobKeys | None:
            if cur is None or cur.destroyed or cur.instance_keys.get(p.instance_id) == p.public_key:
                return None
            if p.instance_id in cur.instance_keys:
                return None  # an instance's key is fixed by its first announcement
            return cur.model_copy(update={"node_id": cur.node_id or node,
                                          "instance_keys": {**cur.instance_keys, p.instance_id: p.public_key}})

        # The superseded revision holds the same wrapped copy: it is erased with all the others at destruction
        # (an erase costs the store a synchronous overwrite; not on every announcement's path).
        stored = await self._cas(job_key(job_id), JobKeys, add)
        if stored is not None:
            self.records.put(job_id, *stored)

    # ================================================================ decide + act: release
    async def on_attested(self, job_id: str, result: InstanceAttested, event: Event,
                          seen: tuple[JobKeys | None, int, bool] = (None, 0, False)) -> None:
        """`seen`: the record as last read or remembered (its revision; whether it was remembered rather than
        read now). A release on a stale copy fails its compare-and-set and reads again; a refusal or a
        re-publication is decided only on a record read now."""
        node = event.node_id or ""
        instance = result.instance_id or ""
        for _ in range(CAS_TRIES):
            record, revision, remembered = seen
            seen = (None, 0, False)
            if record is None:
                record, revision = await self._read(job_id)
            if record is None:
                if await self._await_submission(job_id, event):
                    continue  # its record appeared meanwhile: read it again
                return  # a job without a volume key (or one the broker never saw): nothing to release
            decision = decide_release(record, result, job_id=job_id, node_id=node, result_id=event.id,
                                      stream_seq=event.stream_seq, now_ns=time.time_ns(),
                                      revocation=self.revocations.get(node))
            if remembered and (not decision.release or decision.redelivery):
                continue  # no compare-and-set would check this copy: decide again on the stored record
            if not decision.release:
                await self._refuse(job_id, node, instance, decision, event)
                return
            if not decision.redelivery:
                spent = {**record.spent_results, event.id: event.stream_seq}
                changes: dict[str, object] = {
                    "holder": instance,
                    "spent_results": dict(list(spent.items())[-MAX_SPENT:]),
                    "spent_challenges": (*record.spent_challenges, result.challenge_id)[-MAX_SPENT:],
                    "plaintext_buffers_zeroed": record.plaintext_buffers_zeroed + 1,
                }
                rewrap = record.kek_version != self.ring.current
                if rewrap:  # KEK rotated since: store it under the current one
                    changes.update(await self._rewrapped(job_id, record))
                updated = record.model_copy(update=changes)
                try:
                    new_revision = await self.kv.update(job_key(job_id), updated, revision)
                except Stale:
                    continue  # another replica decided first (or the copy was stale): decide again on the store
                self.records.put(job_id, updated, new_revision)
                if rewrap:  # every copy under the old KEK is erased at once; copies of this one at destruction
                    await self.kv.erase_before(job_key(job_id), new_revision)
                record = updated
            await self._release(job_id, node, record, result, event)
            return
        raise Stale(job_key(job_id))  # still contended: the message is redelivered and decided again

    async def _rewrapped(self, job_id: str, record: JobKeys) -> dict[str, object]:
        old = WrappedKey.from_bytes(bytes.fromhex(record.wrapped))
        new = self.ring.rewrap(old, dek_aad(job_id))
        blob = new.to_bytes()
        log.info("volume key rewrapped", extra={"kek_from": old.kek_version, "kek_to": new.kek_version})
        return {"wrapped": blob.hex(), "kek_version": new.kek_version,
                "wrapped_sha256": hashlib.sha256(blob).hexdigest(),
                "plaintext_buffers_zeroed": record.plaintext_buffers_zeroed + 2}

    async def _release(self, job_id: str, node: str, record: JobKeys, result: InstanceAttested, event: Event) -> None:
        instance = result.instance_id or ""
        wrapped = WrappedKey.from_bytes(bytes.fromhex(record.wrapped))
        info = hpke.release_info("dek", job_id, instance)
        recipient = bytes.fromhex(result.public_key)

        dek = self.ring.unwrap(wrapped, dek_aad(job_id))
        try:
            sealed = hpke.seal(dek, recipient, info)
        finally:
            zeroize(dek)
        await self.bus.publish(KeyReleased(
            instance_id=instance, result_id=event.id, suite=hpke.SUITE_NAME, sealed=sealed.hex(),
            kek_version=record.kek_version, released_ns=time.time_ns(), lease_expires_ns=result.expires_ns),
            job_id=job_id, node_id=node, event_id=derive_event_id(event.id, "KeyReleased"))
        self.released += 1
        log.debug("volume key released", extra={"instance_id": instance, "result_id": event.id})

    async def _refuse(self, job_id: str, node: str, instance: str, decision: Decision, event: Event) -> None:
        self.refused += 1
        log.warning("key release refused", extra={"instance_id": instance, "reason": decision.reason})
        await self.bus.publish(
            KeyReleaseRefused(instance_id=instance, result_id=event.id, reason=decision.reason,
                              detail=decision.detail[:1024]),
            job_id=job_id, node_id=node,
            event_id=derive_event_id(event.id, "KeyReleaseRefused", decision.reason, str(event.stream_seq)))

    # ================================================================ act: destroy
    async def destroy(self, job_id: str, reason: str) -> None:
        """Drop the job's key: a tombstone replaces the wrapped copy, every earlier revision of the record is
        erased from the store (its bytes overwritten), and only once none is left is `key.destroyed`
        published. Resumable: a redelivery or another replica finishes a destruction that stopped midway,
        with the evidence the tombstone fixed (the same event, published once)."""
        key = job_key(job_id)
        self.records.forget(job_id)
        for _ in range(CAS_TRIES):
            record, revision, _ = await self.kv.get(key, JobKeys)
            if not isinstance(record, JobKeys) or record.destruction_reported:
                return
            if record.destroyed and not record.wrapped_revisions:
                return  # destroyed (and reported) before revisions were erased: nothing of it left to erase
            if not record.destroyed:
                held = [r for r in await self.kv.revisions(key) if r <= revision]  # the current one, and any
                # that a write which stopped before its erase left behind
                record = record.model_copy(update={
                    "wrapped": "", "destroyed": True, "destroyed_reason": reason, "destroyed_ns": time.time_ns(),
                    "wrapped_revisions": tuple(held) or (revision,)})
                try:
                    revision = await self.kv.update(key, record, revision)
                except Stale:
                    continue
            await self.kv.erase_before(key, revision)
            left = [r for r in await self.kv.revisions(key) if r < revision]
            if left:  # checked, not assumed: nothing is reported while a revision below the tombstone is stored
                raise Stale(key)
            evidence = KeyDestruction(kek_version=record.kek_version, wrapped_sha256=record.wrapped_sha256,
                                      wrapped_deleted=True, store_revision=revision,
                                      revisions_erased=len(record.wrapped_revisions),
                                      plaintext_buffers_zeroed=record.plaintext_buffers_zeroed,
                                      released_to=record.holder)
            await self.bus.publish(KeysDestroyed(reason=record.destroyed_reason, volume=evidence,
                                                 destroyed_ns=record.destroyed_ns),
                                   job_id=job_id, event_id=derive_event_id(record.submitted_id, "KeysDestroyed"))
            with contextlib.suppress(Stale):  # another replica marked it first
                await self.kv.update(key, record.model_copy(update={"destruction_reported": True}), revision,
                                     erase_superseded=True)
            log.info("volume key destroyed", extra={"reason": record.destroyed_reason,
                                                    "revisions_erased": len(record.wrapped_revisions)})
            return
        raise Stale(key)

    # ================================================================ helpers
    async def _read(self, job_id: str) -> tuple[JobKeys | None, int]:
        """The job's record and revision as stored now (remembered for the next decision)."""
        got, revision, _ = await self.kv.get(job_key(job_id), JobKeys)
        if isinstance(got, JobKeys):
            self.records.put(job_id, got, revision)
            return got, revision
        self.records.forget(job_id)
        return None, 0

    async def _announced(self, job_id: str, instance: str) -> tuple[JobKeys | None, int, bool]:
        """Wait (briefly, outside the job's lock) until the instance's announcement is stored: another
        replica may still be writing it when the result arrives here. Returns the record, its revision and
        whether it is the copy this replica remembers (one that names the instance: no read then)."""
        remembered = self.records.get(job_id)
        if remembered is not None and instance in remembered[0].instance_keys:
            return *remembered, True
        deadline = time.monotonic() + ANNOUNCE_WAIT_S
        while True:
            record, revision = await self._read(job_id)
            if record is None:
                return None, 0, False
            if instance in record.instance_keys or time.monotonic() >= deadline:
                return record, revision, False
            await asyncio.sleep(0.05)

    async def _follow_revocations(self, stop: asyncio.Event) -> None:
        """Every replica keeps every node revocation in memory, from the store (a KV watch: the stored
        ones first, then each new one as it is written), so a release decision reads none."""
        async for entry in self.kv.watch(NodeRevocation, stop, "node.*"):
            if entry is None:
                self.revocations_loaded.set()  # the stored ones are in
                continue
            rec = entry.value()
            if rec is not None:
                self._remember(rec)
            elif not entry.deleted:
                log.warning("unreadable revocation record in the key store", extra={"key": entry.key[:80]})

    def _remember(self, rec: NodeRevocation) -> None:
        cur = self.revocations.get(rec.node_id)
        if cur is None or cur.revoked_ns < rec.revoked_ns:
            self.revocations[rec.node_id] = rec

    async def _cas(self, key: str, model: type[Record], change: Callable[[Record | None], Record | None], *,
                   erase_superseded: bool = False) -> tuple[Record, int] | None:
        """Read, apply `change` (None: nothing to write), compare-and-set; again on a lost race. Returns what
        was written and its revision (None when nothing was)."""
        for _ in range(CAS_TRIES):
            cur, revision, _ = await self.kv.get(key, model)
            new = change(cur if isinstance(cur, model) else None)
            if new is None:
                return None
            try:
                return new, await self.kv.update(key, new, revision, erase_superseded=erase_superseded)
            except Stale:
                continue
        raise Stale(key)
