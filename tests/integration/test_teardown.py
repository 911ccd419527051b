"""Every way a job ends, each with a real micro VM, ends with one complete, signed teardown record: the
guest RAM overwritten and read back, the instance's namespace, cgroup and work directory gone.

    exited        the workload finished            -> done
    cancelled     the client cancelled it running  -> cancelled
    revoked       its node lost its trust mid-run  -> failed
    run deadline  it ran past max_runtime_s        -> failed
    attestation   its quote did not verify (swtpm) -> failed, the workload never ran
    node lost     the agent was killed mid-run; the janitor failed the job; the restarted agent scrubbed
                  the RAM it found in the orphaned VMM       -> failed, still complete
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.attestation_verifier.service import Verifier
from services.janitor.service import Janitor
from services.node_agent.service import NodeAgent
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from services.scheduler.service import Scheduler
from shared.events import (
    Domain,
    EventType,
    InstanceRunning,
    JobCancelRequested,
    JobSubmitted,
    NodeRevoked,
    TeardownRecord,
)
from shared.models import HardwareProfile, TrustState
from shared.tpm.policy_gen import local_policy
from shared.tpm.swtpm import Swtpm
from tests.framework.flow import agent_process, attested_agent, audited, events_of, eventually, job_book, running
from tests.framework.images import IMAGE, build_test_image
from tests.framework.stack import Stack

pytestmark = pytest.mark.nats


def _settings(stack: Stack, tmp_path: Path, **extra: Any) -> Any:
    return stack.settings.model_copy(update={
        "min_trust": TrustState.UNVERIFIED, "images_dir": tmp_path / "images", "instances_dir": tmp_path / "instances",
        "sweep_interval_s": 0.3, "deadline_run_grace_s": 1.0, **extra})


def _job(*command: str, runtime_s: int = 300) -> JobSubmitted:
    return JobSubmitted(owner="alice", image=IMAGE, command=command, max_runtime_s=runtime_s,
                        profile=HardwareProfile(cpu_cores=1, ram_mib=256))


async def _recorded(admin: Any, job_id: str, timeout: float = 180) -> TeardownRecord:
    async def found() -> bool:
        return any(isinstance(e.payload, TeardownRecord)
                   for e in await events_of(admin, Domain.TEARDOWN, f"qvm.teardown.{job_id}.record"))
    await eventually(found, timeout=timeout, what=f"the teardown record of {job_id}")
    return next(e.payload for e in await events_of(admin, Domain.TEARDOWN, f"qvm.teardown.{job_id}.record")
                if isinstance(e.payload, TeardownRecord))


def _assert_complete(rec: TeardownRecord, outcome: str) -> None:
    assert rec.outcome == outcome, rec
    assert rec.complete, [(s.name, s.status, s.detail) for s in rec.steps]
    steps = {s.name: s.status for s in rec.steps}
    assert steps["instance"] == "ok" and steps["guest_ram"] == "ok", steps
    assert rec.ram is not None and rec.ram.verified and rec.ram.method == "overwrite-verify"
    assert rec.ram.bytes_total == 256 << 20 and rec.ram.bytes_scrubbed > 0


async def _running(admin: Any, job_id: str) -> bool:
    return any(isinstance(e.payload, InstanceRunning) for e in await events_of(admin, subject=f"qvm.jobs.{job_id}.>"))


@pytest.mark.parametrize("way", ["exited", "cancelled", "run_deadline", "revoked"])
async def test_each_end_of_a_job_has_a_complete_record(stack: Stack, tmp_path: Path, way: str) -> None:
    build_test_image(tmp_path / "images")
    settings = _settings(stack, tmp_path)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    agent = NodeAgent(await stack.bus("node-agent", "node-a"), settings, vmm=QemuMicrovm(accel=settings.vm_accel))
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    job = {"exited": _job("true"), "cancelled": _job("sleep", "300"), "revoked": _job("sleep", "300"),
           "run_deadline": _job("sleep", "300", runtime_s=2)}[way]
    async with running(sched, agent, Janitor(await stack.bus("janitor"), settings)):
        await market.publish(job, job_id=f"td-{way}")
        if way == "cancelled":
            await eventually(lambda: _running(admin, "td-cancelled"), timeout=120, what="the VM to run")
            await market.publish(JobCancelRequested(reason="client_request"), job_id="td-cancelled")
        if way == "revoked":  # the node failed a re-attestation: the verifier withdraws its trust
            await eventually(lambda: _running(admin, "td-revoked"), timeout=120, what="the VM to run")
            verifier = await stack.bus("attestation-verifier")
            await verifier.publish(NodeRevoked(reason="attestation_failed", detail="pcr mismatch"), node_id="node-a")
        rec = await _recorded(admin, f"td-{way}")
    _assert_complete(rec, {"exited": "done", "cancelled": "cancelled", "run_deadline": "failed",
                           "revoked": "failed"}[way])
    if way == "revoked":
        assert rec.reason == "node_revoked"
    view = (await job_book(admin)).get(f"td-{way}")
    assert view is not None and view.terminal
    assert not any((tmp_path / "instances").iterdir())


async def test_failed_attestation_ends_with_a_complete_record(stack: Stack, swtpm: Swtpm, tmp_path: Path) -> None:
    """The verifier's policy does not know the image: the quote fails, the workload never runs, the
    instance is still torn down and its RAM scrubbed."""
    policy = local_policy(tmp_path / "no-images", ek_ca=swtpm.state.ek_ca)  # no image approved
    (tmp_path / "policy.json").write_text(policy.model_dump_json())
    build_test_image(tmp_path / "images")
    settings = _settings(stack, tmp_path, tpm=swtpm.tcti, attest_policy=tmp_path / "policy.json",
                         measurement_log=tmp_path / "measurements.jsonl", min_trust=TrustState.TRUSTED,
                         attest_interval_s=3600.0, attest_timeout_s=60.0)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    agent = await attested_agent(stack, settings, vmm=QemuMicrovm(accel=settings.vm_accel), cores=2)
    services = (agent, await Verifier.create(await stack.bus("attestation-verifier"), settings),
                await Scheduler.create(await stack.bus("scheduler"), settings),
                Janitor(await stack.bus("janitor"), settings))
    async with running(*services):
        await market.publish(_job("echo", "never printed"), job_id="td-attest")
        rec = await _recorded(admin, "td-attest")
    _assert_complete(rec, "failed")
    assert rec.reason.startswith("attestation_") or rec.reason == "measurement_not_allowed", rec.reason
    events = await events_of(admin, subject="qvm.jobs.td-attest.>")
    assert not [e for e in events if e.spec.type is EventType.INSTANCE_RUNNING]


async def test_node_lost_and_back_ends_with_a_complete_record(stack: Stack, tmp_path: Path) -> None:
    """The agent is killed while the VM runs: the janitor fails the job (node lost); the agent's restart
    finds the orphaned VMM, scrubs the guest RAM through its memfd, kills it and reports; the record is
    complete. The audit over all of it is clean."""
    build_test_image(tmp_path / "images")
    settings = _settings(stack, tmp_path, heartbeat_interval_s=0.3, offline_after_s=2.0)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")

    def start_agent() -> subprocess.Popen[bytes]:
        return agent_process(stack, tmp_path, QVM_HEARTBEAT_INTERVAL_S="0.3")

    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    agent = start_agent()
    try:
        async with running(sched, Janitor(await stack.bus("janitor"), settings)):
            await market.publish(_job("sleep", "600"), job_id="td-lost")
            await eventually(lambda: _running(admin, "td-lost"), timeout=120, what="the VM to run")
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)

            async def failed() -> bool:
                view = (await job_book(admin)).get("td-lost")
                return view is not None and view.terminal
            await eventually(failed, timeout=60, what="the janitor to fail the lost node's job")
            agent = start_agent()
            rec = await _recorded(admin, "td-lost", timeout=90)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(20)
    _assert_complete(rec, "failed")
    assert rec.reason == "node_lost" and "agent_restart" in rec.removed
    report = await audited(admin, stack.pki)
    assert report.ok, report.violations
