"""`qvm audit replay`: replay every stream from its first message; verify every signature and every
job transition; check that every finished job has a complete teardown record, that every instance it
started was destroyed, and that no key outlived it; check that no event was stored twice and that every
dead letter's origin is proven. Any violation makes the audit fail.

Ed25519 verification dominates the cost, so the work is sharded over worker processes: job events are
partitioned by job id (each job's events stay in stream order inside one shard, where its transitions
are folded; its key and teardown events are routed the same way), other events are spread evenly. The
parent only fetches and routes raw bytes; shards send back counts, violations, the ids of the events
they verified (16 bytes and a stream position each) and the signed `event.rejected` reports they saw,
never decoded events. The parent merges the ids (one event id at two stream positions is a replay that
outlived the stream's duplicate window, whichever shards saw the copies) and holds the raw dead letters,
each of which must be paired with a signed report from the identity and consumer its subject names.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import time
import uuid
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from nats.js import JetStreamContext

from shared.codec import Codec
from shared.errors import RejectedEvent, TransitionNotAllowed
from shared.events import (
    DEAD_LETTER_SUBJECT,
    STREAMS,
    Domain,
    EventRejected,
    EventType,
    KeyReleased,
    KeysDestroyed,
    TeardownRecord,
)
from shared.identity import Identity
from shared.lifecycle import JobBook
from shared.models import field_or
from shared.pki import TrustBundle
from shared.replay import RawMessage, read_stream

__all__ = ["AuditReport", "AuditShard", "AuditWorkers", "Rejection", "ShardResult", "audit_replay"]

Item = tuple[int, str, bytes]  # stream sequence, subject, data
RAW_DEAD_PREFIX = DEAD_LETTER_SUBJECT.split("{", 1)[0]
_SEQ = re.compile(r"(0|[1-9][0-9]{0,18})")
_INSTANCE_EVENTS = frozenset(t for t in EventType if t.value.startswith("instance."))


@dataclass
class AuditReport:
    events: int = 0
    per_stream: Counter[str] = field(default_factory=Counter)
    per_type: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)
    job_states: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def merge(self, other: AuditReport) -> None:
        self.events += other.events
        self.per_stream.update(other.per_stream)
        self.per_type.update(other.per_type)
        self.violations += other.violations
        self.job_states.update(other.job_states)


class Rejection(NamedTuple):
    """A verified `event.rejected`: who signed it, and what it says was dead-lettered."""

    producer: str
    consumer: str
    stream_seq: int
    subject: str
    reason: str
    detail: str


@dataclass
class ShardResult:
    """What a shard sends back: its report, and what the parent checks across shards."""

    report: AuditReport
    ids: bytes = b""  # the envelope id of every event it verified, 16 bytes each, in the order seen
    seqs: array[int] = field(default_factory=lambda: array("Q"))  # each one's stream sequence
    streams: bytes = b""  # each one's stream, as an index into `stream_names`
    stream_names: list[str] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


class AuditShard:
    """Verifies events and folds the job transitions of the jobs routed to it."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.book = JobBook()
        self.report = AuditReport()
        self.records: dict[str, TeardownRecord] = {}
        self.keys_released: set[str] = set()
        self.keys_destroyed: set[str] = set()
        self.ids = bytearray()
        self.seqs: array[int] = array("Q")
        self.streams = bytearray()
        self.stream_names: list[str] = []
        self.instances: dict[tuple[str, str], tuple[str, int]] = {}  # (job, instance) -> where first named
        self.destroyed: set[tuple[str, str]] = set()
        self.rejections: list[Rejection] = []

    def add(self, stream: str, items: list[Item], fold: bool) -> None:
        r = self.report
        if stream not in self.stream_names:
            self.stream_names.append(stream)
        stream_index = self.stream_names.index(stream)
        for seq, subject, data in items:
            try:
                event = self.codec.decode(subject, data)
            except RejectedEvent as exc:
                r.violations.append(f"{stream} #{seq} {subject[:120]}: {exc.reason.value}: {exc.detail[:200]}")
                continue
            r.events += 1
            r.per_stream[stream] += 1
            r.per_type[event.spec.type.value] += 1
            self.ids += bytes.fromhex(event.id.replace("-", ""))  # a UUID: the codec checked its form
            self.seqs.append(seq)
            self.streams.append(stream_index)
            if fold:
                try:
                    self.book.apply(event)
                except TransitionNotAllowed as exc:
                    r.violations.append(f"{stream} #{seq}: illegal transition: {exc}")
            job = event.job_id or ""
            if event.spec.type in _INSTANCE_EVENTS:  # counted whether the fold took the event or not
                instance = field_or(event.payload, "instance_id", None) or event.envelope.instance_id
                if instance:
                    self.instances.setdefault((job, instance), (stream, seq))
                    if event.spec.type is EventType.INSTANCE_DESTROYED:
                        self.destroyed.add((job, instance))
            match event.payload:
                case TeardownRecord() as rec:
                    self.records[job] = rec
                case KeyReleased():
                    self.keys_released.add(job)
                case KeysDestroyed():
                    self.keys_destroyed.add(job)
                case EventRejected() as rej:
                    self.rejections.append(Rejection(event.envelope.producer, rej.consumer, rej.stream_seq,
                                                     rej.subject, rej.reason.value, rej.detail))

    def finish(self) -> ShardResult:
        violations = self.report.violations
        self.report.job_states.update(str(v.state) for v in self.book.jobs.values())
        for view in self.book.jobs.values():
            if not view.terminal:
                continue
            rec = self.records.get(view.job_id)
            if rec is None:
                violations.append(f"job {view.job_id} ended ({view.state}) without a teardown record")
            elif not rec.complete:
                bad = [f"{st.name}: {st.status}" for st in rec.steps if st.status in ("missing", "failed")]
                violations.append(f"job {view.job_id}: teardown incomplete ({'; '.join(bad)[:300]})")
            had_volume = bool(view.spec and view.spec.volume_mib and view.instance_id)
            had_keys = view.job_id in self.keys_released or had_volume
            if had_keys and view.job_id not in self.keys_destroyed:
                violations.append(f"job {view.job_id}: its key outlived it (no key.destroyed)")
        for (job, instance), (stream, seq) in self.instances.items():
            if (job, instance) in self.destroyed:
                continue
            last = self.book.get(job)
            if last is not None and not last.terminal:
                continue  # still running: its instance may well be alive
            state = f"ended {last.state}" if last is not None else "never submitted"
            violations.append(f"job {job} ({state}): instance {instance}, named at {stream} #{seq}, was never "
                              "destroyed (no instance.destroyed)")
        return ShardResult(self.report, bytes(self.ids), self.seqs, bytes(self.streams), self.stream_names,
                           self.rejections)


def _shard_main(conn: Connection, bundle_pem: bytes, ca_pem: bytes) -> None:
    shard = AuditShard(Codec(None, TrustBundle.load(bundle_pem, ca_pem)))
    while True:
        msg: Any = conn.recv()
        if msg[0] == "batch":
            shard.add(msg[1], msg[2], msg[3])
        else:
            conn.send(shard.finish())
            shard = AuditShard(shard.codec)
            if msg[0] == "exit":
                return


class AuditWorkers:
    """`workers` shard processes (0: one shard in this process). Reusable across audits; `close()` ends them.

    `feed` each stream's messages in stream order, then `collect` the report (which starts the next audit)."""

    def __init__(self, bundle_pem: bytes, ca_pem: bytes, workers: int | None = None) -> None:
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self._codec = Codec(None, TrustBundle.load(bundle_pem, ca_pem))
        self._local = AuditShard(self._codec)
        self._raw_dead: list[RawMessage] = []
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        ctx = mp.get_context("forkserver")  # no fork of a process that runs an event loop and threads
        for _ in range(self.workers if self.workers > 1 else 0):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_shard_main, args=(child, bundle_pem, ca_pem), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def pids(self) -> list[int]:
        """The shard processes' ids (none when the shard runs in this process)."""
        return [int(p.pid) for p in self._procs]

    def feed(self, domain: Domain, msgs: list[RawMessage]) -> None:
        """A batch of `domain`'s stream, in stream order. Raw dead letters stay here (they are not events:
        the parent pairs them with the signed reports); everything else is an event and goes to a shard."""
        if domain is Domain.DEAD:
            self._raw_dead += [m for m in msgs if m.subject.startswith(RAW_DEAD_PREFIX)]
            msgs = [m for m in msgs if not m.subject.startswith(RAW_DEAD_PREFIX)]
        self.send(STREAMS[domain].name, msgs, fold=domain is Domain.JOBS,
                  by_job=domain in (Domain.JOBS, Domain.KEYS, Domain.TEARDOWN))

    def send(self, stream: str, msgs: list[RawMessage], fold: bool, by_job: bool = False) -> None:
        """`fold`: job events (transitions folded); `by_job`: routed by the job id in the subject."""
        if not self._conns:
            self._local.add(stream, [(m.seq, m.subject, m.data) for m in msgs], fold)
            return
        n = len(self._conns)
        parts: list[list[Item]] = [[] for _ in range(n)]
        if fold or by_job:  # one job -> one shard, in stream order
            for m in msgs:
                key = m.subject.split(".", 3)[2] if m.subject.count(".") >= 3 else m.subject
                parts[zlib.crc32(key.encode()) % n].append((m.seq, m.subject, m.data))
        else:
            for i, m in enumerate(msgs):
                parts[i % n].append((m.seq, m.subject, m.data))
        for conn, part in zip(self._conns, parts, strict=True):
            if part:
                conn.send(("batch", stream, part, fold))

    def collect(self) -> AuditReport:
        results: list[ShardResult] = []
        if not self._conns:
            results.append(self._local.finish())
            self._local = AuditShard(self._codec)
        else:
            for conn in self._conns:
                conn.send(("report",))
            results = [conn.recv() for conn in self._conns]
        report = AuditReport()
        for result in results:
            report.merge(result.report)
        report.violations += stored_twice(results)
        report.dead_letters, unproven = dead_letters(self._raw_dead, [r for res in results for r in res.rejections])
        report.violations += unproven
        self._raw_dead = []
        return report

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("exit",))
                conn.recv()
            except (OSError, EOFError):
                pass
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        self._conns, self._procs = [], []


async def audit_replay(js: JetStreamContext, workers: AuditWorkers) -> AuditReport:
    start = time.perf_counter()
    for domain, spec in STREAMS.items():
        async for batch in read_stream(js, spec.name):
            workers.feed(domain, batch)
    report = workers.collect()
    report.seconds = time.perf_counter() - start
    return report


def stored_twice(results: list[ShardResult]) -> list[str]:
    """One violation per event id stored at more than one stream position, across all shards."""
    keys = [res.ids[i:i + 16] for res in results for i in range(0, len(res.ids), 16)]
    counts = Counter(keys)
    if len(counts) == len(keys):
        return []
    twice = {k for k, n in counts.items() if n > 1}
    where: dict[bytes, list[tuple[str, int]]] = {k: [] for k in twice}
    for res in results:
        for i, seq in enumerate(res.seqs):
            key = res.ids[16 * i:16 * i + 16]
            if key in twice:
                where[key].append((res.stream_names[res.streams[i]], seq))
    return [f"event {uuid.UUID(bytes=k)} stored {len(at)} times (a replay): "
            + ", ".join(f"{stream} #{seq}" for stream, seq in sorted(at))
            for k, at in sorted(where.items(), key=lambda kv: min(kv[1]))]


def dead_letters(raw: list[RawMessage], reports: list[Rejection]) -> tuple[list[str], list[str]]:
    """(proven dead letters, listed; violations for the others). A raw copy is proven by a signed
    `event.rejected` from the identity its subject names, for the same consumer, stream sequence and subject;
    it is attributed to that report's producer, never to a header."""
    signed = {(r.producer, r.consumer, r.stream_seq, r.subject): r for r in reports}
    listed, unproven = [], []
    for m in raw:
        why, rej = _prove(m, signed)
        if rej is None:
            unproven.append(f"dead letter of unproven origin: {m.stream or 'QVM_DEAD'} #{m.seq} on "
                            f"{m.subject[:160]}: {why}")
            continue
        detail = f": {rej.detail[:120]}" if rej.detail else ""
        listed.append(f"{m.stream or 'QVM_DEAD'} #{m.seq}: {rej.reason} by {rej.producer} (consumer {rej.consumer}),"
                      f" {rej.subject[:160]} #{rej.stream_seq}{detail}")
    return listed, unproven


def _prove(m: RawMessage, signed: dict[tuple[str, str, int, str], Rejection]) -> tuple[str, Rejection | None]:
    identity, _, consumer = m.subject[len(RAW_DEAD_PREFIX):].rpartition(".")
    if not identity or not consumer:
        return "the subject names no identity and consumer (qvm.dead.raw.<identity>.<consumer>)", None
    try:
        known = str(Identity.parse(identity)) == identity
    except ValueError:
        known = False
    if not known:
        return f"{identity[:80]!r} is not an identity", None
    header = m.headers.get("Qvm-Consumer")
    if header != consumer:
        return f"its Qvm-Consumer header {(header or '')[:80]!r} is not the subject's consumer {consumer!r}", None
    seq_text = m.headers.get("Qvm-Stream-Seq", "")
    if not _SEQ.fullmatch(seq_text):
        return f"its Qvm-Stream-Seq header {seq_text[:24]!r} is not a stream sequence", None
    subject = m.headers.get("Qvm-Subject", "")
    rej = signed.get((identity, consumer, int(seq_text), subject))
    if rej is None:
        return (f"no signed event.rejected by {identity} for consumer {consumer}, stream sequence {seq_text}, "
                f"subject {subject[:160]!r}"), None
    return "", rej
