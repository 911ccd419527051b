"""The janitor: deadline and lost-node sweeps, cancellations, teardown requests, teardown records.

consume  the whole job stream, the key-destruction reports and its own teardown records, followed with
         message gets (`shared/reader.py`; replayed from the start at every start, so the books survive
         restarts without storage of their own), node.offline and attest.revoked (durable)
decide   `deadlines.due_actions` on the folded book; jobs on a lost or revoked node; `records.build_record`
         for each ended job once its node and the key-broker reported their wipes (or the deadline passed)
act/emit job.failed / job.cancelled and teardown.requested for the job's node; teardown.record (what was
         wiped, how, verified or not) before job.done; ids derived from the job's state, so replicas and
         restarts report each once
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from services.janitor.deadlines import Action, due_actions, jobs_on_node
from services.janitor.records import TeardownFacts, build_record
from services.janitor.settings import JanitorSettings
from shared.bus import Bus
from shared.codec import Event
from shared.consumers import consumer_spec
from shared.errors import RejectedEvent, TransitionNotAllowed
from shared.events import (
    CATALOGUE,
    STREAMS,
    Domain,
    EventType,
    InstanceDestroyed,
    InstanceExited,
    JobCancelled,
    JobDone,
    JobFailed,
    KeysDestroyed,
    NodeOffline,
    NodeRevoked,
    TeardownRecord,
    TeardownRequested,
    scope_filter,
    subject_filter,
)
from shared.identity import Role
from shared.ids import derive_event_id
from shared.lifecycle import JobBook, JobState, JobView
from shared.runtime import run_together
from shared.telemetry import current_job, get_logger

__all__ = ["Janitor"]

log = get_logger("qvm.janitor")


class Janitor:
    def __init__(self, bus: Bus, settings: JanitorSettings) -> None:
        self.bus = bus
        self.settings = settings
        self.book = JobBook()
        self.facts: defaultdict[str, TeardownFacts] = defaultdict(TeardownFacts)
        self.unrecorded: set[str] = set()  # ended jobs still without a teardown record
        self.caught_up = asyncio.Event()

    @classmethod
    async def create(cls, bus: Bus, settings: JanitorSettings) -> Janitor:
        return cls(bus, settings)

    async def run(self, stop: asyncio.Event) -> None:
        follows = [
            (Domain.JOBS, STREAMS[Domain.JOBS].subjects[0], self._on_job_event),
            (Domain.KEYS, subject_filter(CATALOGUE[EventType.KEYS_DESTROYED]), self._on_fact),
            (Domain.TEARDOWN, subject_filter(CATALOGUE[EventType.TEARDOWN_RECORD]), self._on_fact),
        ]
        caught_up = [asyncio.Event() for _ in follows]
        await run_together(
            *(self._follow(domain, subject, handle, stop, done)
              for (domain, subject, handle), done in zip(follows, caught_up, strict=True)),
            self._all_caught_up(caught_up),
            self.bus.consume(consumer_spec(Role.JANITOR, "offline"), self.on_offline, stop),
            self.bus.consume(consumer_spec(Role.JANITOR, "revocations"), self.on_revoked, stop),
            self._sweeper(stop),
        )

    # ------------------------------------------------------------ consume
    async def _follow(self, domain: Domain, subject: str, handle: Callable[[Event], Awaitable[None]],
                      stop: asyncio.Event, done: asyncio.Event) -> None:
        """Fold one stream's `subject` from its first message, then live; `done` once a read finds nothing
        more pending."""
        async for batch in self.bus.follow(domain, subject, stop):
            for msg in batch.messages:
                try:
                    event = self.bus.codec.decode(msg.subject, msg.data)
                except RejectedEvent as exc:
                    # The consumers that own these events dead-letter them; `qvm audit replay` reports them.
                    log.warning("event not folded", extra={"stream_seq": msg.seq, "error": str(exc)[:300]})
                    continue
                await handle(dataclasses.replace(event, stream_seq=msg.seq))
            if batch.pending == 0:
                done.set()

    async def _all_caught_up(self, followed: list[asyncio.Event]) -> None:
        await asyncio.gather(*(e.wait() for e in followed))
        self.caught_up.set()

    async def _on_job_event(self, event: Event) -> None:
        try:
            view = self.book.apply(event)
        except TransitionNotAllowed as exc:
            log.warning("job event not folded", extra={"error": str(exc)[:300]})
            await self._late_event(event)
            return
        await self._on_fact(event)
        if (view.terminal or view.state is JobState.CLEANING) and not self.facts[view.job_id].recorded:
            self.unrecorded.add(view.job_id)

    async def _on_fact(self, event: Event) -> None:
        """What the node, the key-broker and earlier janitor runs reported about a job's teardown."""
        job_id = event.job_id or ""
        match event.payload:
            case InstanceDestroyed() as d:
                self.facts[job_id].destroyed = d
                self.facts[job_id].destroyed_ns = event.envelope.time_ns
            case InstanceExited():
                self.facts[job_id].exited_ns = event.envelope.time_ns
            case KeysDestroyed() as k:
                self.facts[job_id].keys_destroyed = k
            case TeardownRecord():
                self.facts[job_id].recorded = True
                self.unrecorded.discard(job_id)

    async def _late_event(self, event: Event) -> None:
        """A node took a job that had already ended (a placement racing a cancellation or a failure):
        tear it down on that node, so nothing it holds outlives the job."""
        job = self.book.get(event.job_id or "")
        node = event.node_id
        if job is None or not job.terminal or node is None:
            return
        token = current_job.set(job.job_id)
        try:
            await self.bus.publish(TeardownRequested(node_id=node, reason=f"late_{event.spec.type.value}"),
                                   job_id=job.job_id, node_id=node, caused_by=event)
        finally:
            current_job.reset(token)

    async def on_offline(self, event: Event) -> None:
        assert isinstance(event.payload, NodeOffline)
        await self.caught_up.wait()
        node = event.node_id or ""
        for job in jobs_on_node(self.book, node):
            await self.act(Action(job, "fail", "node_lost", f"node {node} stopped sending heartbeats"))

    async def on_revoked(self, event: Event) -> None:
        """A node that lost its trust keeps nothing running: fail and tear down each of its jobs."""
        assert isinstance(event.payload, NodeRevoked)
        await self.caught_up.wait()
        node = event.node_id or ""
        for job in jobs_on_node(self.book, node):
            await self.act(Action(job, "fail", "node_revoked", f"node {node}: {event.payload.reason}"))

    async def _ended_meanwhile(self, job_id: str) -> bool:
        """The job's own events, read now: has it ended since this janitor's book folded it? Two causes may
        end one job at once (a node revoked while its agent stops the instance); the stream says which came
        first, and a second terminal event would be an illegal transition."""
        book = JobBook()
        async for batch in self.bus.read(Domain.JOBS, scope_filter(Domain.JOBS, job_id)):
            for m in batch:
                with contextlib.suppress(RejectedEvent, TransitionNotAllowed):
                    book.apply(self.bus.codec.decode(m.subject, m.data))
        view = book.get(job_id)
        return view is not None and view.terminal

    # ------------------------------------------------------------ decide + act
    async def _sweeper(self, stop: asyncio.Event) -> None:
        await self.caught_up.wait()
        while not stop.is_set():
            try:
                for action in due_actions(self.book, time.time_ns(), self.settings):
                    await self.act(action)
                for job_id in list(self.unrecorded):
                    await self.record(job_id)
            except Exception as exc:  # one failed sweep must not stop the janitor; the next one retries
                log.warning("sweep failed", extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.sweep_interval_s)

    async def record(self, job_id: str) -> bool:
        """Publish the job's teardown record once it is ready; True when it exists."""
        view = self.book.get(job_id)
        facts = self.facts[job_id]
        if facts.recorded:
            return True
        if view is None:
            self.unrecorded.discard(job_id)
            return False
        now = time.time_ns()
        rec = build_record(view, facts, now, now - view.since_ns > self.settings.deadline_teardown_s * 1e9)
        if rec is None:
            return False
        token = current_job.set(job_id)
        try:
            await self.bus.publish(rec, job_id=job_id, event_id=derive_event_id(view.submitted_id, "TeardownRecord"))
            log.log(logging.INFO if rec.complete else logging.WARNING, "teardown recorded",
                    extra={"complete": rec.complete, "outcome": rec.outcome,
                           "missing": [st.name for st in rec.steps if st.status in ("missing", "failed")]})
        finally:
            current_job.reset(token)
        facts.recorded = True
        self.unrecorded.discard(job_id)
        return True

    async def act(self, action: Action) -> None:
        job: JobView = action.job
        token = current_job.set(job.job_id)
        try:
            parts = (action.kind, action.reason, str(job.state), str(job.since_ns))
            if action.kind == "done":
                if not await self.record(job.job_id):
                    return  # job.done only after its teardown record (the next sweep tries again)
                await self.bus.publish(JobDone(exit_code=job.exit_code), job_id=job.job_id,
                                       event_id=derive_event_id(job.submitted_id, "JobDone"))
                log.info("job done", extra={"exit_code": job.exit_code})
                return
            if await self._ended_meanwhile(job.job_id):
                return  # another path ended it since this book last saw it (an agent's instance.failed)
            if job.node_id and not job.destroyed:
                await self.bus.publish(TeardownRequested(node_id=job.node_id, reason=action.reason),
                                       job_id=job.job_id, node_id=job.node_id,
                                       event_id=derive_event_id(job.submitted_id, "TeardownRequested", *parts))
            if action.kind == "cancel":
                payload: JobCancelled | JobFailed = JobCancelled(reason=action.reason[:256])
            else:
                payload = JobFailed(reason=action.reason, detail=action.detail, phase=str(job.state))
            await self.bus.publish(payload, job_id=job.job_id,
                                   event_id=derive_event_id(job.submitted_id, type(payload).__name__, *parts))
            log.warning("job ended by janitor", extra={"kind": action.kind, "reason": action.reason,
                                                       "phase": str(job.state)})
        finally:
            current_job.reset(token)


