"""The job lifecycle as an explicit state machine; a job's state is a fold of its events.

    (none) --submitted--> pending --placed--> placed --accepted--> provisioning
    pending <--refused-- placed
    provisioning --instance.booted--> attesting --instance.attested--> attesting --instance.running--> running
    provisioning --instance.running--> running  (a node without a TPM, where the operator allows it)
    running --instance.exited--> stopping
                 --instance.destroyed--> cleaning --job.done--> done
    provisioning / attesting / running --instance.destroyed--> failed(instance_destroyed)
    attesting --instance.attestation_failed--> failed(reason)
    any non-terminal --failed / instance.failed--> failed(reason);  any non-terminal --cancelled--> cancelled

Key releases are not job states: they live on the keys stream (`key.released`, `key.secrets_released`) and
the instance reports `instance.running` only once it holds what it waited for. `apply` returns the new
view or raises `TransitionNotAllowed`; it never mutates. Re-applying an event already folded (same id,
as on JetStream redelivery) is a no-op, which keeps every consumer idempotent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from shared.codec import Event
from shared.errors import TransitionNotAllowed
from shared.events import (
    AttestationFailed,
    EventType,
    InstanceExited,
    InstanceFailed,
    JobCancelRequested,
    JobFailed,
    JobPlaced,
    JobRefused,
    JobSubmitted,
)
from shared.models import field_or

__all__ = ["TERMINAL", "JobBook", "JobState", "JobView", "apply"]


class JobState(StrEnum):
    PENDING = "pending"
    PLACED = "placed"
    PROVISIONING = "provisioning"
    ATTESTING = "attesting"
    RUNNING = "running"
    STOPPING = "stopping"
    CLEANING = "cleaning"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
_ACTIVE = frozenset(JobState) - TERMINAL
_S = JobState

# event type -> (states it may arrive in; None = the job does not exist yet)
ALLOWED_FROM: dict[EventType, frozenset[JobState | None]] = {
    EventType.JOB_SUBMITTED: frozenset({None}),
    EventType.JOB_PENDING: frozenset({_S.PENDING}),
    EventType.JOB_PLACED: frozenset({_S.PENDING}),
    EventType.JOB_ACCEPTED: frozenset({_S.PLACED}),
    EventType.JOB_REFUSED: frozenset({_S.PLACED}),
    EventType.JOB_CANCEL_REQUESTED: frozenset(_ACTIVE),
    EventType.JOB_CANCELLED: frozenset(_ACTIVE),
    EventType.JOB_FAILED: frozenset(_ACTIVE),
    EventType.JOB_DONE: frozenset({_S.CLEANING}),
    EventType.INSTANCE_PROVISIONING: frozenset({_S.PROVISIONING}),
    EventType.INSTANCE_BOOTED: frozenset({_S.PROVISIONING}),
    EventType.INSTANCE_ATTESTED: frozenset({_S.ATTESTING}),
    EventType.INSTANCE_ATTESTATION_FAILED: frozenset({_S.ATTESTING}),
    EventType.INSTANCE_RUNNING: frozenset({_S.PROVISIONING, _S.ATTESTING}),
    EventType.INSTANCE_OUTPUT: frozenset({_S.RUNNING}),
    EventType.INSTANCE_EXITED: frozenset({_S.RUNNING}),
    # After a failed attestation the agent reports its own failure of the instance: already failed, kept.
    EventType.INSTANCE_FAILED: frozenset({_S.PROVISIONING, _S.ATTESTING, _S.RUNNING, _S.FAILED}),
    # Tearing an instance down is always legal, also after the job ended (cancelled, failed).
    EventType.INSTANCE_DESTROYED: frozenset(JobState),
    # A guard finding can come at any time an instance exists (and be delivered after the job ended); the
    # instance.failed that stops the workload is what changes the job's state.
    EventType.INSTANCE_SUSPICIOUS: frozenset(JobState),
}


@dataclass(frozen=True)
class JobView:
    """What the fold knows about one job."""

    job_id: str
    state: JobState
    since_ns: int
    spec: JobSubmitted | None = None
    node_id: str | None = None
    attempt: int = 0
    reason: str = ""
    cancel_requested: bool = False
    submitted_id: str = ""
    instance_id: str = ""
    exit_code: int | None = None
    destroyed: bool = False
    attested: bool = False
    gpu_uuids: tuple[str, ...] = ()  # the GPUs of the placement the node accepted (scrubbed before re-listing)
    seen: frozenset[str] = field(default_factory=frozenset)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def apply(view: JobView | None, event: Event) -> JobView:
    """Fold one job event into the view (pure)."""
    job_id = event.job_id or ""
    if view is not None and event.id in view.seen:
        return view
    etype = EventType(event.spec.type)
    allowed = ALLOWED_FROM.get(etype)
    current = view.state if view else None
    if allowed is None or current not in allowed:
        raise TransitionNotAllowed(job_id, str(current) if current else "absent", etype.value)
    p = event.payload
    t = event.envelope.time_ns
    if view is None:
        assert isinstance(p, JobSubmitted)
        return JobView(job_id, _S.PENDING, t, spec=p, submitted_id=event.id, seen=frozenset({event.id}))
    seen = view.seen | {event.id}
    match etype:
        case EventType.JOB_PENDING:
            return replace(view, seen=seen, reason=field_or(p, "reason", ""))
        case EventType.JOB_PLACED:
            assert isinstance(p, JobPlaced)
            if p.attempt != view.attempt:  # a placement from an earlier attempt, arriving late
                state = f"{view.state} (attempt {view.attempt}, not {p.attempt})"
                raise TransitionNotAllowed(job_id, state, etype.value)
            return replace(view, state=_S.PLACED, since_ns=t, node_id=p.node_id, attempt=p.attempt, seen=seen,
                           gpu_uuids=tuple(p.claim.gpu_uuids))
        case EventType.JOB_ACCEPTED | EventType.JOB_REFUSED:
            if event.node_id != view.node_id or field_or(p, "attempt", -1) != view.attempt:
                raise TransitionNotAllowed(job_id, f"{view.state} on {view.node_id}#{view.attempt}", etype.value)
            if isinstance(p, JobRefused):
                return replace(view, state=_S.PENDING, since_ns=t, node_id=None, attempt=view.attempt + 1,
                               reason=p.reason, seen=seen)
            return replace(view, state=_S.PROVISIONING, since_ns=t, seen=seen)
        case EventType.JOB_CANCEL_REQUESTED:
            assert isinstance(p, JobCancelRequested)
            return replace(view, cancel_requested=True, reason=p.reason, seen=seen)
        case EventType.JOB_CANCELLED:
            return replace(view, state=_S.CANCELLED, since_ns=t, reason=field_or(p, "reason", ""), seen=seen)
        case EventType.JOB_FAILED:
            assert isinstance(p, JobFailed)
            return replace(view, state=_S.FAILED, since_ns=t, reason=p.reason, seen=seen)
        case EventType.JOB_DONE:
            return replace(view, state=_S.DONE, since_ns=t, seen=seen)
        case EventType.INSTANCE_PROVISIONING | EventType.INSTANCE_OUTPUT | EventType.INSTANCE_SUSPICIOUS:
            return replace(view, seen=seen, instance_id=field_or(p, "instance_id", view.instance_id))
        case EventType.INSTANCE_BOOTED:
            return replace(view, state=_S.ATTESTING, since_ns=t, seen=seen,
                           instance_id=field_or(p, "instance_id", view.instance_id))
        case EventType.INSTANCE_ATTESTED:
            return replace(view, seen=seen, attested=True)
        case EventType.INSTANCE_ATTESTATION_FAILED:
            assert isinstance(p, AttestationFailed)
            return replace(view, state=_S.FAILED, since_ns=t, reason=f"attestation_{p.reason}"[:64], seen=seen)
        case EventType.INSTANCE_RUNNING:
            return replace(view, state=_S.RUNNING, since_ns=t, seen=seen)
        case EventType.INSTANCE_EXITED:
            assert isinstance(p, InstanceExited)
            return replace(view, state=_S.STOPPING, since_ns=t, exit_code=p.exit_code, seen=seen)
        case EventType.INSTANCE_FAILED:
            assert isinstance(p, InstanceFailed)
            if view.state is _S.FAILED:
                return replace(view, seen=seen)
            return replace(view, state=_S.FAILED, since_ns=t, reason=p.reason, seen=seen)
        case EventType.INSTANCE_DESTROYED:
            if view.terminal:
                return replace(view, seen=seen, destroyed=True)
            if view.state in (_S.STOPPING, _S.CLEANING):
                return replace(view, state=_S.CLEANING, since_ns=t, seen=seen, destroyed=True)
            # Destroyed before its workload exited (agent restart, VMM crash): the job failed.
            return replace(view, state=_S.FAILED, since_ns=t, reason="instance_destroyed", seen=seen, destroyed=True)
    raise TransitionNotAllowed(job_id, str(view.state), etype.value)  # pragma: no cover - table is exhaustive


class JobBook:
    """Every job's view, folded from the job stream (in stream order)."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobView] = {}

    def apply(self, event: Event) -> JobView:
        """Fold one event; raises `TransitionNotAllowed` and leaves the book unchanged when illegal."""
        job_id = event.job_id or ""
        new = apply(self.jobs.get(job_id), event)
        self.jobs[job_id] = new
        return new

    def active(self) -> Iterable[JobView]:
        return (v for v in self.jobs.values() if not v.terminal)

    def get(self, job_id: str) -> JobView | None:
        return self.jobs.get(job_id)
