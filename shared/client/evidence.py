"""Everything a client needs to check an instance itself, read back from the bus (each event's signature
checked by the codec as it is read):

    instance.attested   the verifier's result (job stream): instance key, image, evidence and challenge ids
    attest.challenge    the verifier's nonce for that challenge (attestation stream)
    attest.evidence     the node's quote, PCR values and measurement log (attestation stream)
    attest.enroll       the node's AK (and EK) as it enrolled; the result names the AK the verifier accepted

The reads are ordered (ephemeral) consumers filtered to one subject: the node's attestation history is
read from shortly before the result, the enrollment as the subject's last message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared.bus import Bus, map_nats_errors
from shared.codec import Event
from shared.errors import ReasonedError, RejectedEvent
from shared.events import (
    CATALOGUE,
    STREAMS,
    AttestChallenge,
    AttestEvidence,
    Domain,
    EnrollRequested,
    EventType,
    InstanceAttested,
    subject_for,
)

__all__ = ["EvidenceError", "InstanceEvidence", "collect_evidence", "wait_for"]

LOOKBACK_NS = 10 * 60 * 1_000_000_000  # evidence is made moments before its result; read this far back


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
    found: asyncio.Future[Event | None] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Msg) -> None:
        if found.done():
            return
        try:
            event = bus.codec.decode(msg.subject, msg.data)
        except RejectedEvent:
            event = None
        if event is not None and match(event):
            found.set_result(event)
        elif not follow and msg.metadata is not None and msg.metadata.num_pending == 0:
            found.set_result(None)

    config = ConsumerConfig()
    if last_per_subject:
        policy = DeliverPolicy.LAST_PER_SUBJECT
    elif start_ns is not None:
        policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = datetime.fromtimestamp(max(0, start_ns) / 1e9, UTC)
    else:
        policy = DeliverPolicy.ALL
    stream = STREAMS[domain].name
    with map_nats_errors(f"read {subject}"):
        info = await bus.js.stream_info(stream)
        sub = await bus.js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=policy,
                                     config=config, cb=on_msg)
    try:
        if not follow and info.state.messages == 0:
            return None
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            try:
                return await asyncio.wait_for(asyncio.shield(found), min(left, 0.2 if not follow else left))
            except TimeoutError:
                pass
            if not follow:  # nothing (more) matched: stop once the consumer has handed over everything
                with map_nats_errors(f"read {subject}"):
                    ci = await sub.consumer_info()
                if ci.num_pending == 0 and ci.num_ack_pending == 0 and sub.pending_msgs == 0:
                    await asyncio.sleep(0.05)
                    return found.result() if found.done() else None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def collect_evidence(bus: Bus, job_id: str, timeout_s: float = 120.0) -> InstanceEvidence:
    """Wait for the job's instance to be attested, then gather what the verifier saw."""
    attested = await wait_for(
        bus, Domain.JOBS, f"qvm.jobs.{job_id}.instance.attested.*",
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
