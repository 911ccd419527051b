"""The agent's local status report, `<state_dir>/node-status.json`, which `qvm node status` reads on the host.

The model is `shared.nodestatus.NodeStatusReport` (the CLI in `shared/` reads the same one and never
imports a service); here it is built from what the agent knows and written. The agent writes it at start,
every heartbeat and when it stops; a report that stops changing means the agent is down.

Written atomically (a temporary file in the same directory, then `os.replace`): a reader sees the old
report or the new one, never half of one. Mode 0644: it holds ids, states and times only, never a key, a
credential or a job's payload.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from shared.models import GpuInfo, ResourceClaim
from shared.nodestatus import GpuState, JobStatus, NodeGpuStatus, NodeStatusReport

__all__ = ["gpu_states", "job_states", "write_status"]


def gpu_states(gpus: Iterable[GpuInfo], held: Mapping[str, ResourceClaim]) -> tuple[NodeGpuStatus, ...]:
    """Each GPU: assigned to the job that holds it, else unhealthy (NVML), else free."""
    holder = {u: job for job, claim in held.items() for u in claim.gpu_uuids}
    out = []
    for g in sorted(gpus, key=lambda g: g.index):
        job = holder.get(g.uuid)
        state = GpuState.ASSIGNED if job else GpuState.FREE if g.healthy else GpuState.UNHEALTHY
        out.append(NodeGpuStatus(index=g.index, uuid=g.uuid, name=g.name, memory_mib=g.memory_mib, state=state,
                                 job_id=job))
    return tuple(out)


def job_states(held: Iterable[str], since: Mapping[str, int],
               instances: Mapping[str, tuple[str, str]]) -> tuple[JobStatus, ...]:
    """The jobs this agent holds; `instances` maps a job to its instance id and phase once it has a VM."""
    out = []
    for job in sorted(held):
        instance_id, phase = instances.get(job, (None, "accepted"))
        out.append(JobStatus(job_id=job, instance_id=instance_id, phase=phase, since_ns=since.get(job, 0)))
    return tuple(out)


def write_status(path: Path, report: NodeStatusReport) -> None:
    """Replace `path` with `report` atomically, mode 0644 (blocking: run it in a worker thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(report.model_dump_json(indent=2).encode() + b"\n")
        os.replace(tmp, path)  # no fsync: the report is rewritten at every start and beat
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
