"""`qvm audit replay`: replay every stream from its first message; verify every signature and every
job transition; check that every finished job has a complete teardown record and that no key outlived
its job; report dead letters. Any violation makes the audit fail.

Ed25519 verification dominates the cost, so the work is sharded over worker processes: job events are
partitioned by job id (each job's events stay in stream order inside one shard, where its transitions
are folded; its key and teardown events are routed the same way), other events are spread evenly. The
parent only fetches and routes raw bytes; shards send back counts and violations, never decoded events.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from nats.js import JetStreamContext

from shared.codec import Codec
from shared.errors import RejectedEvent, TransitionNotAllowed
from shared.events import STREAMS, Domain, KeyReleased, KeysDestroyed, TeardownRecord
from shared.lifecycle import JobBook
from shared.pki import TrustBundle
from shared.replay import RawMessage, read_stream

__all__ = ["AuditReport", "AuditWorkers", "audit_replay"]

Item = tuple[int, str, bytes]  # stream sequence, subject, data


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


class AuditShard:
    """Verifies events and folds the job transitions of the jobs routed to it."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.book = JobBook()
        self.report = AuditReport()
        self.records: dict[str, TeardownRecord] = {}
        self.keys_released: set[str] = set()
        self.keys_destroyed: set[str] = set()

    def add(self, stream: str, items: list[Item], fold: bool) -> None:
        r = self.report
        for seq, subject, data in items:
            try:
                event = self.codec.decode(subject, data)
            except RejectedEvent as exc:
                r.violations.append(f"{stream} #{seq} {subject[:120]}: {exc.reason.value}: {exc.detail[:200]}")
                continue
            r.events += 1
            r.per_stream[stream] += 1
            r.per_type[event.spec.type.value] += 1
            if fold:
                try:
                    self.book.apply(event)
                except TransitionNotAllowed as exc:
                    r.violations.append(f"{stream} #{seq}: illegal transition: {exc}")
            job = event.job_id or ""
            match event.payload:
                case TeardownRecord() as rec:
                    self.records[job] = rec
                case KeyReleased():
                    self.keys_released.add(job)
                case KeysDestroyed():
                    self.keys_destroyed.add(job)

    def finish(self) -> AuditReport:
        self.report.job_states.update(str(v.state) for v in self.book.jobs.values())
        for view in self.book.jobs.values():
            if not view.terminal:
                continue
            rec = self.records.get(view.job_id)
            if rec is None:
                self.report.violations.append(f"job {view.job_id} ended ({view.state}) without a teardown record")
            elif not rec.complete:
                bad = [f"{st.name}: {st.status}" for st in rec.steps if st.status in ("missing", "failed")]
                self.report.violations.append(f"job {view.job_id}: teardown incomplete ({'; '.join(bad)[:300]})")
            had_volume = bool(view.spec and view.spec.volume_mib and view.instance_id)
            had_keys = view.job_id in self.keys_released or had_volume
            if had_keys and view.job_id not in self.keys_destroyed:
                self.report.violations.append(f"job {view.job_id}: its key outlived it (no key.destroyed)")
        return self.report


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
    """`workers` shard processes (0: one shard in this process). Reusable across audits; `close()` ends them."""

    def __init__(self, bundle_pem: bytes, ca_pem: bytes, workers: int | None = None) -> None:
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self._codec = Codec(None, TrustBundle.load(bundle_pem, ca_pem))
        self._local = AuditShard(self._codec)
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
        report = AuditReport()
        if not self._conns:
            report.merge(self._local.finish())
            self._local = AuditShard(self._codec)
            return report
        for conn in self._conns:
            conn.send(("report",))
        for conn in self._conns:
            report.merge(conn.recv())
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
    dead: list[str] = []
    for domain, spec in STREAMS.items():
        async for batch in read_stream(js, spec.name):
            if domain is Domain.DEAD:
                dead += _dead_letters(batch)
                batch = [m for m in batch if m.subject.startswith("qvm.dead.rejected.")]
            workers.send(spec.name, batch, fold=domain is Domain.JOBS,
                         by_job=domain in (Domain.JOBS, Domain.KEYS, Domain.TEARDOWN))
    report = workers.collect()
    report.dead_letters = dead
    report.seconds = time.perf_counter() - start
    return report


def _dead_letters(batch: list[RawMessage]) -> list[str]:
    return [f"#{m.seq} from {m.headers.get('Qvm-Consumer', '?')}: {m.headers.get('Qvm-Reason', '?')} "
            f"({m.headers.get('Qvm-Detail', '')[:120]}) on {m.headers.get('Qvm-Subject', '?')}"
            for m in batch if m.subject.startswith("qvm.dead.raw.")]
