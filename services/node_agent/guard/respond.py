"""What the node-agent does with a runtime-guard finding: decide the action from the instance's policy and
the platform's floor, report it, and carry it out.

    finding (eBPF, kernel) --> decide: the job's GuardPolicy per severity, raised to the platform's floor
      record        instance.suspicious on the job's subject
      stop          + the workload is stopped: instance.failed (suspicious_activity), the usual full teardown
                    (RAM scrubbed, volume erased, keys destroyed by the key-broker, the janitor's record)
      revoke_node   + node.tampered: the verifier revokes the node (its jobs fail, its keys go) and refuses
                    its enrollment until an operator clears it (`qvm node clear`)

The floor: a critical finding always stops the workload (a VMM that executes a binary or mounts something
is no longer the VMM that was measured), and a host process reaching into an instance (`host_*` rules: its
memory through ptrace, /proc/<pid>/mem or process_vm_readv, its volume or scratch files) always revokes the
node too: that is the hoster looking inside, which the platform promises to rule out.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from shared.bus import Bus
from shared.events import GuardAction, GuardPolicy, InstanceSuspicious, NodeTampered, Severity
from shared.telemetry import get_logger

__all__ = ["FindingLike", "GuardResponder", "JobRef", "decide"]

log = get_logger("qvm.node_agent.guard")

_RANK = {GuardAction.RECORD: 0, GuardAction.STOP: 1, GuardAction.REVOKE_NODE: 2}


class FindingLike(Protocol):
    """A finding as the guard reports it (services/node_agent/guard/guard.py `Finding`)."""

    @property
    def rule(self) -> str: ...
    @property
    def severity(self) -> str: ...
    @property
    def enforced(self) -> bool: ...
    @property
    def instance_id(self) -> str | None: ...
    @property
    def pid(self) -> int: ...
    @property
    def comm(self) -> str: ...
    @property
    def target_pid(self) -> int: ...
    @property
    def detail(self) -> str: ...


@dataclass(frozen=True)
class JobRef:
    """The job an instance runs, and the policy its findings are judged by."""

    job_id: str
    policy: GuardPolicy


def decide(rule: str, severity: Severity, policy: GuardPolicy) -> GuardAction:
    """The job's choice for this severity, never below the platform's floor."""
    asked = {Severity.INFO: policy.info, Severity.WARNING: policy.warning, Severity.CRITICAL: policy.critical}[severity]
    floor = GuardAction.RECORD
    if severity is Severity.CRITICAL:
        floor = GuardAction.REVOKE_NODE if rule.startswith("host_") else GuardAction.STOP
    return max(asked, floor, key=_RANK.__getitem__)


class GuardResponder:
    """consume findings -> decide -> emit instance.suspicious (and node.tampered) -> act (stop the workload)."""

    def __init__(self, bus: Bus, job_of: Callable[[str], JobRef | None],
                 stop: Callable[[str, str, str], Awaitable[bool]],
                 discard_warm: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """`job_of(instance_id)`: the job the instance runs here (None: gone); `stop(job_id, reason, detail)`
        stops the job's workload with that reason (InstanceRuntime.stop_for); `discard_warm(instance_id)`
        tears down a warm instance no job holds yet (True if it was one): whatever was seen at it, no job
        will be given an instance something was caught at."""
        self.bus = bus
        self.node_id = bus.identity.node_id or ""
        self.job_of = job_of
        self.stop = stop
        self.discard_warm = discard_warm
        self.findings = 0
        self.last_ns = 0
        self._seen: set[str] = set()

    async def run(self, findings: AsyncIterator[FindingLike]) -> None:
        async for finding in findings:
            try:
                await self.handle(finding)
            except Exception as exc:  # one bad finding must not end the watch over the others
                log.error("guard finding not handled", extra={"rule": finding.rule,
                                                              "error": f"{type(exc).__name__}: {str(exc)[:200]}"})

    async def handle(self, f: FindingLike) -> GuardAction | None:
        self.findings += 1
        self.last_ns = time.monotonic_ns()
        ref = self.job_of(f.instance_id) if f.instance_id else None
        if ref is None and f.instance_id and self.discard_warm is not None and await self.discard_warm(f.instance_id):
            log.warning("guard finding at a warm instance: discarded", extra={"rule": f.rule,
                                                                              "instance_id": f.instance_id})
            return None
        if ref is None or f.instance_id is None:
            log.warning("guard finding for an instance no longer here", extra={"rule": f.rule,
                                                                               "instance_id": f.instance_id})
            return None
        severity = Severity(f.severity)
        action = decide(f.rule, severity, ref.policy)
        event = InstanceSuspicious(
            instance_id=f.instance_id, rule=f.rule, severity=severity, enforced=f.enforced, action=action,
            pid=f.pid, comm=f.comm[:16], target_pid=f.target_pid, detail=f.detail[:256], detected_ns=time.time_ns())
        # one report per distinct finding: a process retrying a denied operation in a loop is one event
        key = hashlib.sha256(f"{f.instance_id}\0{f.rule}\0{f.pid}\0{f.detail}".encode()).hexdigest()
        if key in self._seen:
            return action
        if len(self._seen) > 10_000:  # bounded: a flood of distinct findings forgets the oldest dedup keys
            self._seen.clear()
        self._seen.add(key)
        await self.bus.publish(event, job_id=ref.job_id, node_id=self.node_id)
        log.warning("runtime guard finding", extra={"rule": f.rule, "severity": severity.value,
                                                    "action": action.value, "enforced": f.enforced,
                                                    "instance_id": f.instance_id, "pid": f.pid, "comm": f.comm})
        # stop first, then revoke: the job fails with the finding's reason before the node's revocation
        # fails whatever else of this node still runs
        if _RANK[action] >= _RANK[GuardAction.STOP]:
            await self.stop(ref.job_id, "suspicious_activity",
                            f"runtime guard: {f.rule} ({severity.value}) by {f.comm or '?'} pid {f.pid}"
                            f"{' (denied)' if f.enforced else ''}: {f.detail}"[:1024])
        if action is GuardAction.REVOKE_NODE:
            await self.bus.publish(NodeTampered(rule=f.rule, instance_id=f.instance_id, pid=f.pid, comm=f.comm[:16],
                                                detail=f.detail[:256]), node_id=self.node_id)
        return action
