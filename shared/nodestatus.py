"""A node's local status and drain request: the files a node-agent and `qvm node` share on one host.

    <state_dir>/draining          the hoster's drain request (`qvm node drain`; removed by `qvm node undrain`).
                                  Its presence is the request: the agent stats it every heartbeat and before
                                  every assignment; its content (who asked, when) is informational only.
    <state_dir>/node-status.json  what the agent last knew (`NodeStatusReport`), rewritten atomically at start
                                  and every heartbeat; world-readable (0644), so it never holds a secret.

Both live here, not in the node-agent, because the CLI in `shared/` never imports a service: the agent writes
the report with this model (`services/node_agent/status.py`) and the CLI reads it with the same one. The
report ignores fields it does not know, so an older CLI still reads a newer agent's file.
"""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.models import TrustState

__all__ = [
    "DRAIN_FILE",
    "STALE_AFTER_BEATS",
    "STATUS_FILE",
    "GpuState",
    "JobStatus",
    "NodeGpuStatus",
    "NodeStatusReport",
    "StatusUnreadable",
    "TrustStatus",
    "drain_path",
    "public_url",
    "read_status",
    "status_path",
]

DRAIN_FILE = "draining"
STATUS_FILE = "node-status.json"
STALE_AFTER_BEATS = 3
"""A report older than this many heartbeat intervals means the agent is down (or hung)."""


def drain_path(state_dir: Path) -> Path:
    return state_dir / DRAIN_FILE


def status_path(state_dir: Path) -> Path:
    return state_dir / STATUS_FILE


def public_url(url: str) -> str:
    """A NATS url without credentials, path or query: `tls://user:pw@host:4222/?x` -> `tls://host:4222`."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return ""
    if not parts.scheme or not host:
        return ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


class _Report(BaseModel):
    """Immutable; unknown fields ignored (a newer agent may write more than this reader knows)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class GpuState(StrEnum):
    FREE = "free"  # no job on this node holds it
    ASSIGNED = "assigned"  # a job this agent accepted holds it (in its VM, or about to be)
    UNHEALTHY = "unhealthy"  # NVML reports memory needing a reset or repair: the agent refuses claims on it


class NodeGpuStatus(_Report):
    index: int = Field(ge=0)
    uuid: str
    name: str
    memory_mib: int = Field(ge=0)
    state: GpuState
    job_id: str | None = Field(None, description="The job holding it (assigned).")


class JobStatus(_Report):
    job_id: str
    instance_id: str | None = Field(None, description="Its micro VM, once the agent started one.")
    phase: str = Field(description="accepted (no VM yet), starting, the VM's state (created, verified, booting, "
                                   "running, exited, failed), or tearing_down.")
    since_ns: int = Field(ge=0, description="When this agent accepted the job.")


class TrustStatus(_Report):
    """The node's trust as the agent last learned it from the verifier (attest.verified / attest.failed)."""

    state: TrustState = TrustState.UNVERIFIED
    detail: str = Field("", description="Why: the failure reason, or why there is no result yet.")
    updated_ns: int = Field(0, ge=0, description="When the agent learned it (0: never).")
    verified_ns: int = Field(0, ge=0, description="When the verifier appraised the last good quote.")
    expires_ns: int = Field(0, ge=0, description="The result's expiry: the node must re-attest before it, or it "
                                                 "is no longer trusted (0: no result).")

    def at(self, now_ns: int) -> TrustState:
        """Trust as of `now_ns`: an expired verified result proves nothing any more (as the scheduler reads it)."""
        if self.state is TrustState.TRUSTED and self.expires_ns and now_ns > self.expires_ns:
            return TrustState.UNVERIFIED
        return self.state


class NodeStatusReport(_Report):
    """What `qvm node status` shows; no credentials, keys or job payloads."""

    version: int = 1
    node_id: str
    agent_version: str
    pid: int = Field(0, ge=0, description="The agent's process id.")
    nats_url: str = Field("", description="The NATS server the agent is connected to (no credentials).")
    connected: bool
    registered_ns: int = Field(0, ge=0, description="When the agent announced itself (node.registered; 0: not yet).")
    last_heartbeat_ns: int = Field(0, ge=0, description="Its last published heartbeat (0: none yet).")
    heartbeat_interval_s: float = Field(gt=0)
    written_ns: int = Field(ge=0, description="When this report was written.")
    stopped_ns: int = Field(0, ge=0, description="When the agent stopped cleanly (0: it runs).")
    draining: bool = False
    draining_since_ns: int = Field(0, ge=0, description="When the drain was requested (the file's mtime).")
    trust: TrustStatus = TrustStatus()
    gpus: tuple[NodeGpuStatus, ...] = ()
    jobs: tuple[JobStatus, ...] = ()

    def age_s(self, now_ns: int | None = None) -> float:
        return max(0.0, ((now_ns if now_ns is not None else time.time_ns()) - self.written_ns) / 1e9)

    def stale(self, now_ns: int | None = None) -> bool:
        """The agent stopped, or wrote nothing for `STALE_AFTER_BEATS` heartbeat intervals: it is down."""
        return bool(self.stopped_ns) or self.age_s(now_ns) > STALE_AFTER_BEATS * self.heartbeat_interval_s


class StatusUnreadable(Exception):
    """The status file exists but is not a status report (torn by hand, or another program's)."""


def read_status(state_dir: Path) -> NodeStatusReport | None:
    """The agent's last report; None when there is none (the agent never ran with this state dir)."""
    try:
        raw = status_path(state_dir).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return NodeStatusReport.model_validate_json(raw)
    except ValidationError as exc:
        raise StatusUnreadable(f"{status_path(state_dir)} is not a node status report: "
                               f"{exc.errors()[0]['msg'] if exc.errors() else exc}") from None
