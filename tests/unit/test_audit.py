"""The audit's checks, without a server: signed events from a real test PKI, fed to `AuditWorkers` as the
stream reader hands them over (stream, sequence, subject, data, headers).

Replays (one event id at two stream positions, within a shard or across shards), instances that were never
destroyed (also those named by events the fold refuses), and dead letters whose origin no signed
`event.rejected` proves."""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from shared.audit import AuditReport, AuditWorkers
from shared.codec import Codec
from shared.consumers import consumer_spec
from shared.errors import Reason
from shared.events import (
    STREAMS,
    Domain,
    EventRejected,
    InstanceDestroyed,
    InstanceExited,
    InstanceFailed,
    InstanceProvisioning,
    InstanceRunning,
    JobAccepted,
    JobDone,
    JobFailed,
    JobPlaced,
    JobSubmitted,
    NodeHeartbeat,
    TeardownRecord,
    TeardownStep,
)
from shared.identity import Identity, Role
from shared.ids import new_event_id
from shared.models import Frozen, ResourceClaim
from shared.pki import Pki
from shared.replay import RawMessage

MARKET = Identity(Role.MARKETPLACE)
SCHED = Identity(Role.SCHEDULER)
JANITOR = Identity(Role.JANITOR)
NODE_A = Identity(Role.NODE_AGENT, "node-a")
HEX = "ab" * 32
SCHED_DURABLE = consumer_spec(Role.SCHEDULER, "jobs").durables(SCHED)[0].name  # "scheduler-jobs"
NODE_DURABLE = consumer_spec(Role.NODE_AGENT, "assignments").durables(NODE_A)[0].name  # its real name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    p = Pki(tmp_path_factory.mktemp("audit") / "pki")
    p.init(nodes=("node-a",))
    return p


@pytest.fixture
def inline(pki: Pki) -> Iterator[AuditWorkers]:
    workers = AuditWorkers(pki.trust_bundle.read_bytes(), pki.ca_cert.read_bytes(), workers=0)
    yield workers
    workers.close()


class Streams:
    """Stores what it is given as the streams would: each domain's messages with their own sequence."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.trust = pki.load_trust()
        self.codecs: dict[Identity, Codec] = {}
        self.seq: Counter[Domain] = Counter()
        self.streams: dict[Domain, list[RawMessage]] = defaultdict(list)

    def emit(self, ident: Identity, payload: Frozen, **ids: Any) -> RawMessage:
        codec = self.codecs.get(ident) or self.codecs.setdefault(ident, Codec(self.pki.signer(ident), self.trust))
        out = codec.encode(payload, **ids)
        return self.store(out.subject, out.data)

    def store(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> RawMessage:
        domain = Domain(subject.split(".")[1])
        self.seq[domain] += 1
        msg = RawMessage(STREAMS[domain].name, self.seq[domain], subject, data, headers or {})
        self.streams[domain].append(msg)
        return msg

    def again(self, msg: RawMessage) -> RawMessage:
        """The same bytes stored again (a replay past the duplicate window)."""
        return self.store(msg.subject, msg.data)

    def audit(self, workers: AuditWorkers) -> AuditReport:
        for domain in STREAMS:
            workers.feed(domain, self.streams.get(domain, []))
        return workers.collect()

    # ------------------------------------------------------------ a job's life
    def submit(self, job: str) -> RawMessage:
        return self.emit(MARKET, JobSubmitted(owner="alice", image="img"), job_id=job)

    def start(self, job: str, instance: str) -> None:
        """Submitted, placed, accepted, instance provisioning and running."""
        self.submit(job)
        self.emit(SCHED, JobPlaced(node_id="node-a", attempt=0, claim=ResourceClaim(cpu_cores=1, ram_mib=64),
                                   job=JobSubmitted(owner="alice", image="img")), job_id=job, node_id="node-a")
        self.emit(NODE_A, JobAccepted(node_id="node-a", attempt=0), job_id=job)
        self.provision(job, instance)
        self.emit(NODE_A, InstanceRunning(instance_id=instance), job_id=job)

    def provision(self, job: str, instance: str, event_id: str | None = None) -> RawMessage:
        return self.emit(NODE_A, InstanceProvisioning(instance_id=instance, image="img", image_manifest_sha256=HEX,
                                                      vmm="qemu", public_key=HEX), job_id=job, event_id=event_id)

    def destroy(self, job: str, instance: str) -> RawMessage:
        return self.emit(NODE_A, InstanceDestroyed(instance_id=instance), job_id=job)

    def finish(self, job: str, instance: str, *, destroyed: bool = True) -> None:
        """Exited, destroyed, done, and the teardown record."""
        exited = {"instance_id": instance, "exit_code": 0, "runtime_ms": 1.0, "output_sha256": HEX, "output_bytes": 0,
                  "output_chunks": 0}
        self.emit(NODE_A, InstanceExited.model_validate({k: v for k, v in exited.items()
                                                         if k in InstanceExited.model_fields}), job_id=job)
        if destroyed:
            self.destroy(job, instance)
            self.emit(JANITOR, JobDone(exit_code=0), job_id=job)
        else:
            self.emit(JANITOR, JobFailed(reason="node_lost"), job_id=job)
        self.record(job, instance)

    def record(self, job: str, instance: str, outcome: str = "done") -> None:
        self.emit(JANITOR, TeardownRecord(node="node-a", instance_id=instance, outcome=outcome, complete=True,
                                          steps=(TeardownStep(name="instance", status="ok"),), ended_ns=1,
                                          recorded_ns=2, duration_ms=1.0), job_id=job)

    # ------------------------------------------------------------ dead letters
    def dead_letter(self, by: Identity, consumer: str, original: RawMessage, *, report: bool = True,
                    subject: str | None = None, headers: dict[str, str] | None = None) -> RawMessage:
        """What `Bus.dead_letter` stores: the raw copy with its headers, then the signed report."""
        hdrs = {"Qvm-Reason": "job_exists", "Qvm-Detail": "a replay", "Qvm-Subject": original.subject,
                "Qvm-Stream-Seq": str(original.seq), "Qvm-Consumer": consumer}
        raw = self.store(subject or f"qvm.dead.raw.{by}.{consumer}", original.data, {**hdrs, **(headers or {})})
        if report:
            self.emit(by, EventRejected(consumer=consumer, subject=original.subject, stream_seq=original.seq,
                                        reason=Reason.JOB_EXISTS, detail="a replay", size=len(original.data)))
        return raw


def only(report: AuditReport, *fragments: str) -> list[str]:
    return [v for v in report.violations if all(f in v for f in fragments)]


# ---------------------------------------------------------------- a clean history


def test_a_clean_history_is_clean(pki: Pki, inline: AuditWorkers) -> None:
    bus = Streams(pki)
    bus.start("j1", "i1")
    bus.finish("j1", "i1")
    bus.start("j2", "i2")  # still running: its instance is alive, nothing to say
    bus.emit(NODE_A, NodeHeartbeat(seq=1, jobs=("j2",)))
    report = bus.audit(inline)
    assert report.ok, report.violations
    assert report.events == sum(len(v) for v in bus.streams.values())
    assert report.job_states == Counter({"done": 1, "running": 1})
    assert report.dead_letters == []
    # The workers are reusable: a second audit starts from nothing.
    assert bus.audit(inline).violations == []


# ---------------------------------------------------------------- replays


def test_a_replayed_submission_is_a_violation(pki: Pki, inline: AuditWorkers) -> None:
    """The review's finding: a genuine job.submitted stored again past the duplicate window, and a second run
    whose events reuse the derived ids. The fold skips ids it has seen; the audit does not."""
    bus = Streams(pki)
    submitted = bus.submit("rp-1")
    bus.emit(SCHED, JobPlaced(node_id="node-a", attempt=0, claim=ResourceClaim(cpu_cores=1, ram_mib=64),
                              job=JobSubmitted(owner="alice", image="img")), job_id="rp-1", node_id="node-a")
    bus.emit(NODE_A, JobAccepted(node_id="node-a", attempt=0), job_id="rp-1")
    provisioning = bus.provision("rp-1", "i1", event_id=new_event_id())
    bus.emit(NODE_A, InstanceRunning(instance_id="i1"), job_id="rp-1")
    bus.finish("rp-1", "i1")
    assert bus.audit(inline).ok
    again = bus.again(submitted)
    # The second run: same derived event id (the node derives it from the assignment), a new instance.
    second = bus.provision("rp-1", "i2", event_id=envelope_id(provisioning))
    report = bus.audit(inline)
    assert not report.ok
    sub_id = envelope_id(submitted)
    assert only(report, f"event {sub_id} stored 2 times", f"QVM_JOBS #{submitted.seq}", f"QVM_JOBS #{again.seq}")
    assert only(report, f"event {envelope_id(provisioning)} stored 2 times", f"#{second.seq}")
    # The second run's instance was never destroyed, though the fold never took its event (a seen id).
    assert only(report, "job rp-1", "instance i2", "never destroyed")
    assert not only(report, "instance i1")


def test_a_dead_letter_copy_is_not_a_second_event(pki: Pki, inline: AuditWorkers) -> None:
    bus = Streams(pki)
    submitted = bus.submit("j1")
    bus.dead_letter(SCHED, SCHED_DURABLE, submitted)
    report = bus.audit(inline)
    assert not any("stored" in v for v in report.violations), report.violations


def test_replays_are_found_across_shards(pki: Pki) -> None:
    """Two worker processes: the copies of a heartbeat (spread round robin) and two envelopes sharing one id
    under different job ids (routed by job) land in different shards; the parent still sees each id twice."""
    bus = Streams(pki)
    beat = bus.emit(NODE_A, NodeHeartbeat(seq=1))
    beat_again = bus.again(beat)
    shared_id = new_event_id()
    jobs = pick_jobs_on_different_shards(2)
    firsts = [bus.emit(MARKET, JobSubmitted(owner="alice", image="img"), job_id=j, event_id=shared_id) for j in jobs]
    workers = AuditWorkers(pki.trust_bundle.read_bytes(), pki.ca_cert.read_bytes(), workers=2)
    try:
        report = bus.audit(workers)
        assert len(workers._conns) == 2
    finally:
        workers.close()
    assert report.events == 4
    assert only(report, f"event {envelope_id(beat)} stored 2 times", f"QVM_NODES #{beat.seq}",
                f"QVM_NODES #{beat_again.seq}")
    assert only(report, f"event {shared_id} stored 2 times", f"QVM_JOBS #{firsts[0].seq}", f"QVM_JOBS #{firsts[1].seq}")


def pick_jobs_on_different_shards(n: int) -> list[str]:
    """Job ids that `AuditWorkers.send` routes to n different shards (crc32 of the id, modulo n)."""
    found: dict[int, str] = {}
    for i in range(100):
        found.setdefault(zlib.crc32(f"job-{i}".encode()) % n, f"job-{i}")
    assert len(found) == n
    return [found[k] for k in sorted(found)]


def envelope_id(msg: RawMessage) -> str:
    env = msgpack.unpackb(msgpack.unpackb(msg.data, raw=False)[1], raw=False)
    return str(env["id"])


# ---------------------------------------------------------------- instances never destroyed


def test_an_ended_job_with_a_live_instance_is_a_violation(pki: Pki, inline: AuditWorkers) -> None:
    bus = Streams(pki)
    bus.start("j1", "i1")
    bus.finish("j1", "i1", destroyed=False)  # failed (node lost), no instance.destroyed ever came
    bus.submit("j2")
    bus.emit(SCHED, JobPlaced(node_id="node-a", attempt=0, claim=ResourceClaim(cpu_cores=1, ram_mib=64),
                              job=JobSubmitted(owner="alice", image="img")), job_id="j2", node_id="node-a")
    bus.emit(NODE_A, JobAccepted(node_id="node-a", attempt=0), job_id="j2")
    bus.provision("j2", "i2")  # still provisioning at the end: nothing to say yet
    report = bus.audit(inline)
    assert len(report.violations) == 1, report.violations
    assert only(report, "job j1 (ended failed)", "instance i1", "never destroyed")


def test_instances_named_by_refused_events_count(pki: Pki, inline: AuditWorkers) -> None:
    """A second run of a finished job under new event ids: the fold refuses each event as an illegal
    transition, and the instance it names must still have been destroyed."""
    bus = Streams(pki)
    bus.start("j1", "i1")
    bus.finish("j1", "i1")
    late = bus.provision("j1", "i9")
    bus.emit(NODE_A, InstanceFailed(instance_id="i8", reason="boot_timeout"), job_id="j1")
    bus.provision("ghost", "i7")  # a job never submitted
    report = bus.audit(inline)
    assert only(report, f"QVM_JOBS #{late.seq}: illegal transition")
    assert only(report, "job j1 (ended done)", "instance i9", "never destroyed")
    assert only(report, "job j1 (ended done)", "instance i8", "never destroyed")
    assert only(report, "job ghost (never submitted)", "instance i7", "never destroyed")
    bus.destroy("j1", "i9")
    bus.destroy("j1", "i8")
    report = bus.audit(inline)
    assert not only(report, "never destroyed", "j1"), report.violations
    assert only(report, "instance i7", "never destroyed")


def test_a_destroyed_instance_of_another_job_does_not_count(pki: Pki, inline: AuditWorkers) -> None:
    bus = Streams(pki)
    bus.start("j1", "i1")
    bus.emit(NODE_A, InstanceFailed(instance_id="i1", reason="boot_timeout"), job_id="j1")
    bus.record("j1", "i1", outcome="failed")
    bus.start("j2", "i2")
    bus.destroy("j2", "i1")  # i1's destruction reported under the wrong job
    report = bus.audit(inline)
    assert only(report, "job j1 (ended failed)", "instance i1", "never destroyed")


# ---------------------------------------------------------------- dead letters


def test_a_proven_dead_letter_is_listed_by_its_signed_producer(pki: Pki, inline: AuditWorkers) -> None:
    bus = Streams(pki)
    submitted = bus.submit("j1")
    placed = bus.emit(SCHED, JobPlaced(node_id="node-a", attempt=0, claim=ResourceClaim(cpu_cores=1, ram_mib=64),
                                       job=JobSubmitted(owner="alice", image="img")), job_id="j1", node_id="node-a")
    raw1 = bus.dead_letter(SCHED, SCHED_DURABLE, submitted)
    raw2 = bus.dead_letter(NODE_A, NODE_DURABLE, placed)  # an identity with a dot in it
    report = bus.audit(inline)
    assert report.violations == [], report.violations
    assert len(report.dead_letters) == 2
    first, second = report.dead_letters
    assert first.startswith(f"QVM_DEAD #{raw1.seq}: job_exists by scheduler (consumer {SCHED_DURABLE}), "
                            f"qvm.jobs.j1.submitted #{submitted.seq}")
    assert second.startswith(f"QVM_DEAD #{raw2.seq}: job_exists by node-agent.node-a (consumer {NODE_DURABLE})")


@pytest.mark.parametrize(
    ("case", "why"),
    [
        pytest.param("no-report", "no signed event.rejected by scheduler", id="no-report"),
        pytest.param("report-by-another", "no signed event.rejected by scheduler", id="report-by-another-identity"),
        pytest.param("subject-names-another", "no signed event.rejected by janitor", id="subject-names-another"),
        pytest.param("header-consumer", "Qvm-Consumer header", id="header-consumer-differs"),
        pytest.param("report-consumer", "no signed event.rejected", id="report-names-another-consumer"),
        pytest.param("report-seq", "no signed event.rejected", id="report-names-another-seq"),
        pytest.param("header-seq", "Qvm-Stream-Seq", id="bad-seq-header"),
        pytest.param("header-subject", "no signed event.rejected", id="header-subject-differs"),
        pytest.param("old-subject", "names no identity and consumer", id="old-subject-without-consumer"),
        pytest.param("not-identity", "is not an identity", id="subject-identity-unknown"),
    ],
)
def test_an_unproven_dead_letter_is_a_violation(pki: Pki, inline: AuditWorkers, case: str, why: str) -> None:
    bus = Streams(pki)
    submitted = bus.submit("j1")
    kw: dict[str, Any] = {}
    by = SCHED
    if case == "no-report":
        kw = {"report": False}
    elif case == "report-by-another":  # the janitor signs a report naming the scheduler's consumer
        kw = {"report": False}
        bus.emit(JANITOR, EventRejected(consumer=SCHED_DURABLE, subject=submitted.subject, stream_seq=submitted.seq,
                                        reason=Reason.JOB_EXISTS, detail="", size=1))
    elif case == "subject-names-another":  # the scheduler's report, the raw copy under the janitor's name
        kw = {"subject": f"qvm.dead.raw.janitor.{SCHED_DURABLE}"}
    elif case == "header-consumer":
        kw = {"headers": {"Qvm-Consumer": "scheduler-other"}}
    elif case == "report-consumer":
        kw = {"report": False}
        bus.emit(SCHED, EventRejected(consumer="scheduler-other", subject=submitted.subject,
                                      stream_seq=submitted.seq, reason=Reason.JOB_EXISTS, detail="", size=1))
    elif case == "report-seq":
        kw = {"report": False}
        bus.emit(SCHED, EventRejected(consumer=SCHED_DURABLE, subject=submitted.subject,
                                      stream_seq=submitted.seq + 1, reason=Reason.JOB_EXISTS, detail="", size=1))
    elif case == "header-seq":
        kw = {"headers": {"Qvm-Stream-Seq": f"0{submitted.seq}"}}
    elif case == "header-subject":
        kw = {"headers": {"Qvm-Subject": "qvm.jobs.j2.submitted"}}
    elif case == "old-subject":
        kw = {"subject": "qvm.dead.raw.scheduler"}
    elif case == "not-identity":
        kw = {"subject": f"qvm.dead.raw.nobody.{SCHED_DURABLE}"}
    raw = bus.dead_letter(by, SCHED_DURABLE, submitted, **kw)
    report = bus.audit(inline)
    assert not report.ok
    found = only(report, "dead letter of unproven origin", f"QVM_DEAD #{raw.seq}", why)
    assert found, report.violations
    assert report.dead_letters == []


def test_other_messages_in_the_dead_stream_must_verify(pki: Pki, inline: AuditWorkers) -> None:
    bus = Streams(pki)
    stray = bus.store("qvm.dead.something", b"\x93\x01\x02\x03")
    report = bus.audit(inline)
    assert only(report, f"QVM_DEAD #{stray.seq} qvm.dead.something: malformed")
