"""The node's own memory of the assignments it took: a replayed placement never runs a job twice here.

The scheduler refuses a second submission of a job id, but a node does not take that on trust: it keeps,
per job id, the stream sequence of the `job.placed` it accepted. The same message again (a redelivery)
is answered as before; any other placement of a job it already took (a replay of an old assignment, or a
placement stored again after the dedupe window) is refused as `job_exists`. The file survives agent
restarts; it holds job ids and sequences only, one JSON line each, bounded to the newest entries.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from shared.telemetry import get_logger

__all__ = ["AssignmentLedger"]

log = get_logger("qvm.node_agent.ledger")
MAX_ENTRIES = 100_000


class AssignmentLedger:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.accepted: dict[str, int] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                job, seq = row["job"], row["seq"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash: the rest still counts
            if isinstance(job, str) and isinstance(seq, int) and not isinstance(seq, bool):
                self.accepted[job] = seq
        if len(self.accepted) > MAX_ENTRIES:
            self._compact()

    def taken_elsewhere(self, job_id: str, stream_seq: int) -> int | None:
        """The sequence of the placement this node already took for `job_id`, when it is not this one."""
        seq = self.accepted.get(job_id)
        return seq if seq is not None and stream_seq and seq != stream_seq else None

    def record(self, job_id: str, stream_seq: int) -> None:
        if job_id in self.accepted:
            return
        self.accepted[job_id] = stream_seq
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"job": job_id, "seq": stream_seq}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if len(self.accepted) > MAX_ENTRIES:
            self._compact()

    def _compact(self) -> None:
        keep = list(self.accepted.items())[-MAX_ENTRIES // 2:]
        self.accepted = dict(keep)
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"job": j, "seq": s}) + "\n" for j, s in keep))
        with contextlib.suppress(OSError):
            os.replace(tmp, self.path)
        log.info("assignment ledger compacted", extra={"entries": len(keep)})
