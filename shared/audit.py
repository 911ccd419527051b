"""`qvm audit replay`: replay every stream from its first message; verify every signature and every
job transition; report dead letters. Any violation makes the audit fail.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from nats.js import JetStreamContext

from shared.codec import Event
from shared.errors import RejectedEvent, TransitionNotAllowed
from shared.events import STREAMS, Domain
from shared.lifecycle import JobBook
from shared.replay import RawMessage, Verifier, read_stream

__all__ = ["AuditReport", "audit_replay"]


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


async def audit_replay(js: JetStreamContext, verifier: Verifier) -> AuditReport:
    report = AuditReport()
    book = JobBook()
    start = time.perf_counter()
    for domain, spec in STREAMS.items():
        async for batch in read_stream(js, spec.name):
            if domain is Domain.DEAD:
                _dead(report, verifier, batch)
                verified = [m for m in batch if m.subject.startswith("qvm.dead.rejected.")]
                results = await verifier.decode(verified)
                _count(report, spec.name, verified, results, book=None)
                continue
            results = await verifier.decode(batch)
            _count(report, spec.name, batch, results, book if domain is Domain.JOBS else None)
    report.job_states.update(str(v.state) for v in book.jobs.values())
    report.seconds = time.perf_counter() - start
    return report


def _dead(report: AuditReport, verifier: Verifier, batch: list[RawMessage]) -> None:
    for m in batch:
        if m.subject.startswith("qvm.dead.raw."):
            report.dead_letters.append(
                f"#{m.seq} from {m.headers.get('Qvm-Consumer', '?')}: {m.headers.get('Qvm-Reason', '?')} "
                f"({m.headers.get('Qvm-Detail', '')[:120]}) on {m.headers.get('Qvm-Subject', '?')}")


def _count(report: AuditReport, stream: str, batch: list[RawMessage], results: list[Event | RejectedEvent],
           book: JobBook | None) -> None:
    for m, r in zip(batch, results, strict=True):
        if isinstance(r, RejectedEvent):
            report.violations.append(f"{stream} #{m.seq} {m.subject[:120]}: {r.reason.value}: {r.detail[:200]}")
            continue
        report.events += 1
        report.per_stream[stream] += 1
        report.per_type[str(r.spec.type)] += 1
        if book is not None:
            try:
                book.apply(r)
            except TransitionNotAllowed as exc:
                report.violations.append(f"{stream} #{m.seq}: illegal transition: {exc}")
