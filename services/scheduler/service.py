"""The scheduler: consume job and node events, decide placements, reserve capacity, emit placements.

consume  job.submitted / refused / accepted / failed / cancelled, node.registered / heartbeat,
         teardown.requested (durable consumers shared by all replicas)
decide   `admission.refusal` (a job id is submitted once, ever: replays are dead-lettered as `job_exists`);
         `placement.choose` over the registry's current view
act      compare-and-set the claim into the node's registry record; park unplaceable jobs in `qvm_jobs`
emit     job.placed (id derived from the submission and attempt: a retry or a second replica making
         the same decision is stored once, and the loser rolls its claim back), job.pending, node.offline
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from services.scheduler import admission
from services.scheduler.placement import (
    Claim,
    NodeRecord,
    NodeStatus,
    NoFit,
    choose,
    claim_still_fits,
    with_claims,
)
from services.scheduler.registry import Conflict, Registry
from services.scheduler.settings import SchedulerSettings
from shared.buckets import NODES, PENDING_JOBS
from shared.bus import Bus, Handler
from shared.codec import Event
from shared.consumers import consumer_spec
from shared.errors import RejectedEvent
from shared.events import (
    AttestationFailed,
    AttestationResult,
    EventType,
    JobAccepted,
    JobPending,
    JobPlaced,
    JobRefused,
    JobSubmitted,
    NodeHeartbeat,
    NodeOffline,
    NodeRegistered,
    NodeRevoked,
    NodeSwept,
    TeardownRecord,
)
from shared.identity import Role
from shared.ids import derive_event_id
from shared.kv import Kv
from shared.models import Frozen, TrustState
from shared.runtime import run_together
from shared.telemetry import get_logger

__all__ = ["PendingJob", "Scheduler"]

log = get_logger("qvm.scheduler")


class NodeNotRegistered(Exception):
    """A trust result arrived before the node's registration; JetStream redelivers it shortly."""


class PendingJob(Frozen):
    """A job waiting for capacity (value in the `qvm_jobs` bucket)."""

    spec: JobSubmitted
    submitted_id: str
    attempt: int
    excluded: tuple[str, ...] = ()
    reason: str = ""


async def _await(task: asyncio.Task[None]) -> None:
    await task


class Scheduler:
    def __init__(self, bus: Bus, settings: SchedulerSettings, nodes_kv: Kv, jobs_kv: Kv) -> None:
        self.bus = bus
        self.settings = settings
        self.registry = Registry(nodes_kv)
        self.pending_kv = jobs_kv
        self.placed = 0
        self.ended: dict[str, None] = {}  # recently failed/cancelled jobs (bounded, insertion-ordered)

    @classmethod
    async def create(cls, bus: Bus, settings: SchedulerSettings) -> Scheduler:
        return cls(bus, settings, await bus.kv(NODES), await bus.kv(PENDING_JOBS))

    async def run(self, stop: asyncio.Event) -> None:
        ready = asyncio.Event()
        watch = asyncio.create_task(self.registry.load_and_watch(stop, ready))
        loaded = asyncio.ensure_future(ready.wait())
        await asyncio.wait([loaded, watch], return_when=asyncio.FIRST_COMPLETED)
        loaded.cancel()
        if watch.done():
            watch.result()  # raises the watch failure
        log.info("registry loaded", extra={"nodes": len(self.registry.nodes())})
        try:
            await run_together(
                self._consume("jobs", self.on_job_event, stop),
                self._consume("nodes", self.on_node_event, stop),
                self._consume("teardown", self.on_teardown, stop),
                self._consume("trust", self.on_trust, stop),
                self._sweeper(stop),
                _await(watch),
            )
        finally:
            watch.cancel()

    # ================================================================ consume
    async def _consume(self, key: str, handler: Handler, stop: asyncio.Event) -> None:
        spec = consumer_spec(Role.SCHEDULER, key)
        await self.bus.consume(spec, handler, stop, max_inflight=self.settings.max_inflight)

    async def on_job_event(self, event: Event) -> None:
        job_id = event.job_id or ""
        if event.spec.type in (EventType.JOB_FAILED, EventType.JOB_CANCELLED, EventType.JOB_DONE):
            self._mark_ended(job_id)  # before any await: a submission in the same batch sees it
        match event.payload:
            case JobSubmitted() as spec:
                refused = await admission.refusal(self.bus, event, time.time_ns(), self.settings.stream_max_age_s)
                if refused is not None:
                    log.warning("submission refused", extra={"reason": refused.reason.value})
                    raise refused  # dead-lettered with its reason by the bus; the job's history is untouched
                # Let the other events of this batch start first: one that ends this job marks it above.
                await asyncio.sleep(0)
                if job_id in self.ended:
                    log.info("job ended before it was placed; not placing it")
                    return
                await self.place(job_id, spec, event.id, attempt=0, excluded=(), parked=False)
            case JobRefused() as refused:
                await self.on_refused(job_id, refused)
            case JobAccepted() as accepted:
                await self.drop_stray_claims(job_id, keep=accepted.node_id)
            case _ if event.spec.type in (EventType.JOB_FAILED, EventType.JOB_CANCELLED, EventType.JOB_DONE):
                await self.release_job(job_id)
            case _ if event.spec.type is EventType.INSTANCE_DESTROYED and event.node_id:
                await self._unreserve(event.node_id, job_id, used=True)  # the node says its VM is gone

    def _mark_ended(self, job_id: str) -> None:
        self.ended[job_id] = None
        if len(self.ended) > 100_000:
            del self.ended[next(iter(self.ended))]

    async def on_node_event(self, event: Event) -> None:
        node_id = event.node_id or ""
        now = time.time_ns()
        match event.payload:
            case NodeSwept() as swept:
                await self._relist(node_id, {g.gpu_uuid for g in swept.gpus if g.verified})
                return
            case NodeRegistered() as reg:
                def register(rec: NodeRecord | None) -> NodeRecord:
                    if rec is None:
                        return NodeRecord(node_id=node_id, inventory=reg.inventory, agent_version=reg.agent_version,
                                          last_seen_ns=now, last_event_id=event.id)
                    # A restarted agent proves itself again; a result newer than this registration stands.
                    stale = rec.trust_since_ns < event.envelope.time_ns and rec.trust is TrustState.TRUSTED
                    return with_claims(rec, rec.claims, inventory=reg.inventory, agent_version=reg.agent_version,
                                       status=NodeStatus.ONLINE, last_seen_ns=now, last_event_id=event.id,
                                       **({"trust": TrustState.UNVERIFIED} if stale else {}))
                await self.registry.update(node_id, register)
                log.info("node registered", extra={"node_id": node_id, "gpus": len(reg.inventory.gpus)})
            case NodeHeartbeat() as hb:
                def beat(rec: NodeRecord | None) -> NodeRecord | None:
                    if rec is None:
                        return None  # heartbeat before registration: nothing to update yet
                    return with_claims(rec, rec.claims, status=NodeStatus.ONLINE, last_seen_ns=now,
                                       last_event_id=event.id, draining=hb.draining)
                before = self.registry.get(node_id)
                await self.registry.update(node_id, beat)
                if before is not None and before.draining != hb.draining:
                    log.info("node draining" if hb.draining else "node drain ended", extra={"node_id": node_id})

    async def on_trust(self, event: Event) -> None:
        """Attestation results set the node's trust; only a newer result replaces an older one."""
        node_id = event.node_id or ""
        t = event.envelope.time_ns
        match event.payload:
            case AttestationResult() as result:
                changes: dict[str, object] = {"trust": TrustState.TRUSTED, "trust_since_ns": t,
                                              "trust_expires_ns": result.expires_ns}
            case AttestationFailed() | NodeRevoked():
                changes = {"trust": TrustState.UNTRUSTED, "trust_since_ns": t, "trust_expires_ns": 0}
            case _:
                return

        def set_trust(rec: NodeRecord | None) -> NodeRecord | None:
            if rec is None:
                raise NodeNotRegistered(node_id)  # retried: the registration is on its way
            if rec.trust_since_ns > t:
                return rec
            return with_claims(rec, rec.claims, **changes)

        await self.registry.update(node_id, set_trust)
        log.info("node trust", extra={"node_id": node_id, "trust": str(changes["trust"]),
                                      "event_type": str(event.spec.type)})
        if changes["trust"] is TrustState.TRUSTED:
            self.registry.capacity_changed.set()  # parked jobs may fit now

    async def on_teardown(self, event: Event) -> None:
        if isinstance(event.payload, TeardownRecord):
            await self.on_teardown_record(event.job_id or "", event.payload.node, event.payload)
            return
        await self.release_job(event.job_id or "")

    # ================================================================ decide + act
    async def place(
        self, job_id: str, spec: JobSubmitted, submitted_id: str, *, attempt: int, excluded: tuple[str, ...],
        parked: bool = True,
    ) -> bool:
        """Place one attempt of a job; idempotent. Returns True once the job is placed.

        `parked=False` (a first submission) skips clearing the pending bucket, which costs a round trip.
        """
        placed_id = derive_event_id(submitted_id, "JobPlaced", str(attempt))
        for node_id in self.registry.node_of_job(job_id):  # redelivery: the decision is already made
            rec = self.registry.get(node_id)
            held = rec.claims.get(job_id) if rec else None
            if held is not None and held.attempt == attempt:
                await self.bus.publish(JobPlaced(node_id=node_id, attempt=attempt, claim=held.claim, job=spec),
                                       job_id=job_id, node_id=node_id, event_id=placed_id)
                return True
        for _ in range(8):
            decision = choose(self.registry.candidates(spec.profile.gpus.count), spec, self.settings.min_trust,
                              excluded)
            if isinstance(decision, NoFit):
                await self.park(job_id, PendingJob(spec=spec, submitted_id=submitted_id, attempt=attempt,
                                                   excluded=excluded, reason=decision.reason), decision.detail)
                return False
            claim = Claim(claim=decision.claim, attempt=attempt, submitted_id=submitted_id, excluded=excluded)
            if not await self._reserve(decision.node_id, job_id, claim):
                continue
            stored = await self.bus.publish(JobPlaced(node_id=decision.node_id, attempt=attempt, claim=claim.claim,
                                                      job=spec),
                                            job_id=job_id, node_id=decision.node_id, event_id=placed_id)
            if not stored:
                # Another replica placed this attempt first: its placement stands, ours is rolled back.
                await self._unreserve(decision.node_id, job_id)
                return True
            self.placed += 1
            if parked:
                await self._unpark(job_id)
            return True
        log.warning("placement contention, will retry", extra={"job_id": job_id})
        await self.park(job_id, PendingJob(spec=spec, submitted_id=submitted_id, attempt=attempt,
                                           excluded=excluded, reason="contention"), "registry contention")
        return False

    async def _reserve(self, node_id: str, job_id: str, claim: Claim) -> bool:
        self.registry.hold(node_id, job_id, claim)

        def add(rec: NodeRecord | None) -> NodeRecord:
            if rec is None or job_id in rec.claims or not claim_still_fits(rec, claim.claim):
                raise Conflict(node_id)
            return with_claims(rec, {**rec.claims, job_id: claim})

        try:
            await self.registry.update(node_id, add)
            return True
        except Conflict:
            return False
        finally:
            self.registry.unhold(node_id, job_id)

    async def _unreserve(self, node_id: str, job_id: str, only_attempt: int | None = None, used: bool = False) -> None:
        """Drop the job's claim. `used`: the job may have run there, so its GPUs wait for their scrub."""
        def drop(rec: NodeRecord | None) -> NodeRecord | None:
            if rec is None or job_id not in rec.claims:
                return rec
            if only_attempt is not None and rec.claims[job_id].attempt != only_attempt:
                return rec
            scrubbing = dict(rec.scrubbing)
            if used:
                scrubbing.update({u: job_id for u in rec.claims[job_id].claim.gpu_uuids})
            return with_claims(rec, {j: c for j, c in rec.claims.items() if j != job_id}, scrubbing=scrubbing)

        await self.registry.update(node_id, drop)

    async def _relist(self, node_id: str, clean: set[str], job_id: str | None = None) -> None:
        """Put the `clean` GPUs (those waiting for `job_id`'s scrub, or any job's) back into the node's pool."""
        def relist(rec: NodeRecord | None) -> NodeRecord | None:
            if rec is None:
                return rec
            keep = {u: j for u, j in rec.scrubbing.items() if not (u in clean and job_id in (None, j))}
            return rec if keep == rec.scrubbing else with_claims(rec, dict(rec.claims), scrubbing=keep)

        await self.registry.update(node_id, relist)

    async def on_teardown_record(self, job_id: str, node_id: str, record: TeardownRecord) -> None:
        """The job's teardown record lists the GPUs that are clean again; the others stay out of the pool."""
        if node_id:
            await self._relist(node_id, set(record.gpus_clean), job_id)
        if record.gpus_quarantined:
            log.warning("GPUs held back: no verified scrub", extra={"node_id": node_id,
                                                                    "gpus": list(record.gpus_quarantined)})

    async def on_refused(self, job_id: str, refused: JobRefused) -> None:
        rec = self.registry.get(refused.node_id)
        held = rec.claims.get(job_id) if rec else None
        if held is not None and held.attempt == refused.attempt:
            log.info("node refused job, placing again",
                     extra={"node_id": refused.node_id, "reason": refused.reason})
            spec = await self.submitted_spec(job_id)
            if spec is not None:
                await self.place(job_id, spec, held.submitted_id, attempt=refused.attempt + 1,
                                 excluded=(*held.excluded, refused.node_id), parked=False)
        await self._unreserve(refused.node_id, job_id, only_attempt=refused.attempt)

    async def submitted_spec(self, job_id: str) -> JobSubmitted | None:
        """The job's spec, read back from its first (signed, verified) job.submitted event."""
        raw = await admission.first_submission(self.bus, job_id)
        if raw is None:
            log.error("submission not found; job cannot be placed again", extra={"job_id": job_id})
            return None
        try:
            event = self.bus.codec.decode(raw.subject, raw.data)
        except RejectedEvent as exc:
            log.error("stored submission does not verify", extra={"job_id": job_id, "reason": exc.reason.value})
            return None
        return event.payload if isinstance(event.payload, JobSubmitted) else None

    async def drop_stray_claims(self, job_id: str, keep: str) -> None:
        """A crash between reserving and publishing can leave a claim on a node the job never got."""
        for node_id in self.registry.node_of_job(job_id):
            if node_id != keep:
                await self._unreserve(node_id, job_id)

    async def release_job(self, job_id: str) -> None:
        for node_id in self.registry.node_of_job(job_id):
            await self._unreserve(node_id, job_id, used=True)
        await self._unpark(job_id)

    # ================================================================ pending jobs
    async def park(self, job_id: str, pending: PendingJob, detail: str) -> None:
        # Publish first: a replica that later finds the parked job places it after this event.
        await self.bus.publish(JobPending(reason=pending.reason, detail=detail[:1024]), job_id=job_id,
                               event_id=derive_event_id(pending.submitted_id, "JobPending", str(pending.attempt),
                                                        pending.reason))
        await self.pending_kv.put(job_id, pending)

    async def _unpark(self, job_id: str) -> None:
        await self.pending_kv.purge(job_id)

    async def retry_pending(self) -> int:
        """Try every parked job again (after capacity appeared); returns how many were placed."""
        placed = 0
        for job_id in await self.pending_kv.keys():
            pending, revision, _ = await self.pending_kv.get(job_id, PendingJob)
            if pending is None:
                if revision:  # stored but unreadable
                    log.warning("unreadable pending entry dropped", extra={"job_id": job_id})
                    await self._unpark(job_id)
                continue  # placed meanwhile (deleted)
            if await self.place(job_id, pending.spec, pending.submitted_id, attempt=pending.attempt,
                                excluded=pending.excluded):
                placed += 1
        return placed

    # ================================================================ sweeps
    async def _sweeper(self, stop: asyncio.Event) -> None:
        """Mark silent nodes offline; retry pending jobs when capacity appeared."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.registry.capacity_changed.wait(), self.settings.sweep_interval_s)
            if stop.is_set():
                return
            try:
                await self.mark_offline()
                if self.registry.capacity_changed.is_set():
                    self.registry.capacity_changed.clear()
                    await asyncio.sleep(0.05)  # let a burst of registrations land first
                    await self.retry_pending()
            except Exception as exc:  # a sweep failure must not stop the scheduler; next sweep retries
                log.warning("sweep failed", extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"})

    async def mark_offline(self) -> list[str]:
        limit = time.time_ns() - int(self.settings.offline_after_s * 1e9)
        gone: list[str] = []
        for rec in self.registry.nodes():
            if rec.status is NodeStatus.ONLINE and rec.last_seen_ns < limit:
                def offline(cur: NodeRecord | None) -> NodeRecord | None:
                    if cur is None or cur.status is not NodeStatus.ONLINE or cur.last_seen_ns >= limit:
                        raise Conflict("node came back")
                    return with_claims(cur, cur.claims, status=NodeStatus.OFFLINE)
                try:
                    await self.registry.update(rec.node_id, offline)
                except Conflict:
                    continue
                await self.bus.publish(NodeOffline(last_seen_ns=rec.last_seen_ns), node_id=rec.node_id,
                                       event_id=derive_event_id(rec.last_event_id, "NodeOffline")
                                       if rec.last_event_id else None)
                log.warning("node offline", extra={"node_id": rec.node_id})
                gone.append(rec.node_id)
        return gone
