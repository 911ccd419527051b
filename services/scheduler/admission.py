"""Admission: a job id is submitted once, ever, whatever the transport's dedupe window says.

JetStream drops a re-published message only while its `Nats-Msg-Id` is inside the stream's duplicate window
(and only if the id is the same). A genuine, signed `job.submitted` replayed later, or under a new id, is
stored again, so the scheduler decides from the job stream itself: the submission it places must be the
first `job.submitted` stored for that job id. A submission older than the stream's retention can no longer
be compared with its history, so it is refused as stale. Either refusal dead-letters the copy with its
reason (`job_exists`, `submission_stale`) and a signed `event.rejected`; the job's own history is untouched.
"""

from __future__ import annotations

from shared.bus import Bus
from shared.codec import Event
from shared.errors import Reason, RejectedEvent
from shared.events import CATALOGUE, Domain, EventType, subject_for
from shared.reader import RawMessage

__all__ = ["first_submission", "refusal"]


async def first_submission(bus: Bus, job_id: str) -> RawMessage | None:
    """The job's first stored `job.submitted` (the only one that counts)."""
    return await bus.first(Domain.JOBS, subject_for(CATALOGUE[EventType.JOB_SUBMITTED], job_id=job_id))


async def refusal(bus: Bus, event: Event, now_ns: int, max_age_s: float) -> RejectedEvent | None:
    """Why this `job.submitted` must not be placed, or None when it is the job's one submission."""
    age_s = (now_ns - event.envelope.time_ns) / 1e9
    if age_s > max_age_s:
        return RejectedEvent(Reason.SUBMISSION_STALE, f"submitted {age_s:.0f}s ago; the job stream keeps "
                                                      f"{max_age_s:.0f}s of history")
    first = await first_submission(bus, event.job_id or "")
    if first is not None and event.stream_seq and first.seq < event.stream_seq:
        return RejectedEvent(Reason.JOB_EXISTS, f"job {event.job_id} was submitted at stream sequence {first.seq}; "
                                                f"this copy (#{event.stream_seq}) is not placed")
    return None
