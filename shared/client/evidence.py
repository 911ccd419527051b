"""Everything a client needs to check an instance itself, read back from the bus (each event's signature
checked by the codec as it is read):

    instance.attested   the verifier's result (job stream): instance key, image, evidence and challenge ids
    attest.challenge    the verifier's nonce for that challenge (attestation stream)
    attest.evidence     the node's quote, PCR values and measurement log (attestation stream)
    attest.enroll       the node's AK (and EK) as it enrolled; the result names the AK the verifier accepted

The reads are message gets filtered to one subject (`shared/reader.py`; a client creates no consumer): the
node's attestation history is read from shortly before the result, the enrollment as the subject's last
message.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from shared.bus import Bus
from shared.codec import Event
from shared.errors import ReasonedError, RejectedEvent
from shared.events import (
    CATALOGUE,
    AttestChallenge,
    AttestEvidence,
    Domain,
    EnrollRequested,
    EventType,
    InstanceAttested,
    subject_filter,
    subject_for,
)
from shared.reader import RawMessage

__all__ = ["EvidenceError", "InstanceEvidence", "collect_evidence", "wait_for"]

LOOKBACK_NS = 10 * 60 * 1_000_000_000  # evidence is made moments before its result; read this far back
POLL_S = 0.2  # how often a follower asks for new messages once it has read everything stored


class EvidenceError(ReasonedError):
    """A failure with a stable reason code (see `ReasonedError`)."""


@dataclass(frozen=True)
class InstanceEvidence:
    job_id: str
    node_id: str
    result: Event  # instance.attested
    challenge: AttestChallenge
    evidence: Event  # attest.evidence
    enrollment: EnrollRequested

    @property
    def attested(self) -> InstanceAttested:
        assert isinstance(self.result.payload, InstanceAttested)
        return self.result.payload


async def wait_for(bus: Bus, domain: Domain, subject: str, match: Callable[[Event], bool], timeout_s: float, *,
                   start_ns: int | None = None, last_per_subject: bool = False, follow: bool = True) -> Event | None:
    """The first event on `subject` that `match`es; with `follow`, wait for new ones until `timeout_s`,
    else stop at the end of what is stored. Messages that do not verify are skipped (the consumers that
    own them dead-letter them)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    if last_per_subject:
        msg = await bus.last(domain, subject)
        event = _decoded(bus, msg) if msg is not None else None
        return event if event is not None and match(event) else None
    seq, start = 1, start_ns
    while True:
        batch = await bus.read_batch(domain, subject, seq=seq, start_ns=start)
        for msg in batch.messages:
            event = _decoded(bus, msg)
            if event is not None and match(event):
                return event
        if batch.messages:
            seq, start = batch.messages[-1].seq + 1, None
            if batch.pending:
                continue
        if not follow or loop.time() >= deadline:
            return None
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - loop.time())))


def _decoded(bus: Bus, msg: RawMessage) -> Event | None:
    try:
        return dataclasses.replace(bus.codec.decode(msg.subject, msg.data), stream_seq=msg.seq)
    except RejectedEvent:
        return None


async def collect_evidence(bus: Bus, job_id: str, timeout_s: float = 120.0) -> InstanceEvidence:
    """Wait for the job's instance to be attested, then gather what the verifier saw."""
    attested = await wait_for(
        bus, Domain.JOBS, subject_filter(CATALOGUE[EventType.INSTANCE_ATTESTED], job_id=job_id),
        lambda e: isinstance(e.payload, InstanceAttested), timeout_s)
    if attested is None:
        raise EvidenceError("not_attested", f"no attestation result for job {job_id} within {timeout_s:g}s")
    result = attested.payload
    assert isinstance(result, InstanceAttested)
    node = attested.node_id or ""
    since = result.verified_ns - LOOKBACK_NS

    def subject(t: EventType) -> str:
        return subject_for(CATALOGUE[t], node_id=node)

    challenge = await wait_for(
        bus, Domain.ATTESTATION, subject(EventType.ATTEST_CHALLENGE),
        lambda e: getattr(e.payload, "challenge_id", None) == result.challenge_id, 10.0, start_ns=since, follow=False)
    evidence = await wait_for(
        bus, Domain.ATTESTATION, subject(EventType.ATTEST_EVIDENCE), lambda e: e.id == result.evidence_id, 10.0,
        start_ns=since, follow=False)
    enrollment = await wait_for(
        bus, Domain.ATTESTATION, subject(EventType.ATTEST_ENROLL_REQUESTED), lambda e: True, 10.0,
        last_per_subject=True, follow=False)
    if challenge is None or evidence is None or enrollment is None:
        missing = [n for n, v in (("challenge", challenge), ("evidence", evidence), ("enrollment", enrollment))
                   if v is None]
        raise EvidenceError("evidence_missing", f"not on the bus: the {', '.join(missing)} behind result {attested.id}")
    assert isinstance(challenge.payload, AttestChallenge) and isinstance(enrollment.payload, EnrollRequested)
    if not isinstance(evidence.payload, AttestEvidence):
        raise EvidenceError("evidence_missing", f"event {evidence.id} is not evidence")
    return InstanceEvidence(job_id, node, attested, challenge.payload, evidence, enrollment.payload)
