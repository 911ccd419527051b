"""The janitor, first part: deadline and lost-node sweeps, cancellations, teardown requests.

consume  the whole job stream through an ordered consumer (replayed from the start at every start, so
         the book survives restarts without its own storage), node.offline and attest.revoked (durable)
decide   `deadlines.due_actions` on the folded book; jobs on a lost or revoked node
act/emit job.failed / job.cancelled and teardown.requested for the job's node, with ids derived from
         the job's state, so replicas and restarts report each failure once

Scrubbing and wipe evidence come with the teardown issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from services.janitor.deadlines import Action, due_actions, jobs_on_node
from shared.bus import Bus, map_nats_errors
from shared.codec import Event
from shared.config import Settings
from shared.consumers import consumer_spec
from shared.errors import RejectedEvent, TransitionNotAllowed
from shared.events import (
    STREAMS,
    Domain,
    JobCancelled,
    JobDone,
    JobFailed,
    NodeOffline,
    NodeRevoked,
    TeardownRequested,
)
from shared.identity import Role
from shared.ids import derive_event_id
from shared.lifecycle import JobBook, JobView
from shared.runtime import run_together
from shared.telemetry import current_job, get_logger

__all__ = ["Janitor"]

log = get_logger("qvm.janitor")


class Janitor:
    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings
        self.book = JobBook()
        self.caught_up = asyncio.Event()

    @classmethod
    async def create(cls, bus: Bus, settings: Settings) -> Janitor:
        return cls(bus, settings)

    async def run(self, stop: asyncio.Event) -> None:
        stream = STREAMS[Domain.JOBS]
        info = await self.bus.stream_info(stream.name)
        self._target_seq = info.state.last_seq if info else 0
        if self._target_seq == 0:
            self.caught_up.set()
        with map_nats_errors("follow job stream"):
            sub = await self.bus.js.subscribe(stream.subjects[0], stream=stream.name, ordered_consumer=True,
                                              deliver_policy=DeliverPolicy.ALL, cb=self._on_job_msg)
        try:
            await run_together(
                self.bus.consume(consumer_spec(Role.JANITOR, "offline"), self.on_offline, stop),
                self.bus.consume(consumer_spec(Role.JANITOR, "revocations"), self.on_revoked, stop),
                self._sweeper(stop),
            )
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # ------------------------------------------------------------ consume
    async def _on_job_msg(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream if msg.metadata else 0
        try:
            event = self.bus.codec.decode(msg.subject, msg.data)
        except RejectedEvent as exc:
            # The consumers that own these events dead-letter them; `qvm audit replay` reports them.
            log.warning("job event not folded", extra={"stream_seq": seq, "error": str(exc)[:300]})
        else:
            try:
                self.book.apply(event)
            except TransitionNotAllowed as exc:
                log.warning("job event not folded", extra={"stream_seq": seq, "error": str(exc)[:300]})
                await self._late_event(event)
        if seq >= self._target_seq:
            self.caught_up.set()

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

    # ------------------------------------------------------------ decide + act
    async def _sweeper(self, stop: asyncio.Event) -> None:
        await self.caught_up.wait()
        while not stop.is_set():
            try:
                for action in due_actions(self.book, time.time_ns(), self.settings):
                    await self.act(action)
            except Exception as exc:  # one failed sweep must not stop the janitor; the next one retries
                log.warning("sweep failed", extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.sweep_interval_s)

    async def act(self, action: Action) -> None:
        job: JobView = action.job
        token = current_job.set(job.job_id)
        try:
            parts = (action.kind, action.reason, str(job.state), str(job.since_ns))
            if action.kind == "done":
                await self.bus.publish(JobDone(exit_code=job.exit_code), job_id=job.job_id,
                                       event_id=derive_event_id(job.submitted_id, "JobDone"))
                log.info("job done", extra={"exit_code": job.exit_code})
                return
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


