"""The node-agent's response to runtime-guard findings: the job's policy per severity, never below the platform's
floor (critical stops the workload; a host process reaching into an instance also revokes the node)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.node_agent.guard.respond import GuardResponder, JobRef, decide
from shared.events import GuardAction, GuardPolicy, InstanceSuspicious, NodeTampered, Severity

A = GuardAction


@pytest.mark.parametrize(("rule", "severity", "policy", "action"), [
    ("vmm_connect", Severity.WARNING, GuardPolicy(), A.RECORD),
    ("vmm_connect", Severity.WARNING, GuardPolicy(warning=A.STOP), A.STOP),  # a job may ask for more
    ("vmm_exec", Severity.CRITICAL, GuardPolicy(critical=A.RECORD), A.STOP),  # ... never for less
    ("vmm_exec", Severity.CRITICAL, GuardPolicy(), A.STOP),
    ("host_ptrace_vmm", Severity.CRITICAL, GuardPolicy(), A.REVOKE_NODE),  # the hoster looking inside
    ("host_reads_instance_file", Severity.CRITICAL, GuardPolicy(critical=A.RECORD), A.REVOKE_NODE),
    ("vmm_setuid", Severity.INFO, GuardPolicy(), A.RECORD),
])
def test_decide(rule: str, severity: Severity, policy: GuardPolicy, action: GuardAction) -> None:
    assert decide(rule, severity, policy) is action


@dataclass(frozen=True)
class _Finding:
    rule: str
    severity: str
    enforced: bool = True
    instance_id: str = "i-1"
    pid: int = 4242
    comm: str = "cat"
    target_pid: int = 77
    detail: str = "/proc/77/mem"


class _Bus:
    """Records what the responder publishes (the wire itself is tested with real NATS elsewhere)."""

    class identity:  # mirrors Bus.identity
        node_id = "node-a"

    def __init__(self) -> None:
        self.sent: list[tuple[object, dict[str, object]]] = []

    async def publish(self, payload: object, **kw: object) -> bool:
        self.sent.append((payload, kw))
        return True


async def test_a_host_process_reading_a_vmm_stops_the_job_and_revokes_the_node() -> None:
    bus = _Bus()
    stopped: list[tuple[str, str, str]] = []

    async def stop(job_id: str, reason: str, detail: str) -> bool:
        stopped.append((job_id, reason, detail))
        return True

    jobs = {"i-1": JobRef("job-1", GuardPolicy())}
    responder = GuardResponder(bus, jobs.get, stop)  # type: ignore[arg-type]
    assert await responder.handle(_Finding("host_ptrace_vmm", "critical")) is A.REVOKE_NODE
    suspicious = [p for p, _ in bus.sent if isinstance(p, InstanceSuspicious)]
    tampered = [p for p, _ in bus.sent if isinstance(p, NodeTampered)]
    assert len(suspicious) == 1 and suspicious[0].rule == "host_ptrace_vmm" and suspicious[0].enforced
    assert suspicious[0].action is A.REVOKE_NODE and suspicious[0].target_pid == 77
    assert len(tampered) == 1 and tampered[0].instance_id == "i-1" and tampered[0].comm == "cat"
    assert stopped == [("job-1", "suspicious_activity", stopped[0][2])] and "host_ptrace_vmm" in stopped[0][2]
    # the same process retrying is one report; a finding for an instance no longer here is dropped
    await responder.handle(_Finding("host_ptrace_vmm", "critical"))
    assert len([p for p, _ in bus.sent if isinstance(p, InstanceSuspicious)]) == 1
    assert await responder.handle(_Finding("vmm_exec", "critical", instance_id="i-gone")) is None


async def test_a_warning_is_recorded_only() -> None:
    bus = _Bus()

    async def stop(job_id: str, reason: str, detail: str) -> bool:
        raise AssertionError("a warning must not stop the job")

    responder = GuardResponder(bus, {"i-1": JobRef("job-1", GuardPolicy())}.get, stop)  # type: ignore[arg-type]
    assert await responder.handle(_Finding("vmm_connect", "warning", enforced=False, detail="AF_INET")) is A.RECORD
    assert [type(p).__name__ for p, _ in bus.sent] == ["InstanceSuspicious"]
