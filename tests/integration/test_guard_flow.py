"""The runtime guard end to end, every part real: nats-server, swtpm, the verifier, the key-broker, the scheduler,
the janitor, and a node-agent with its eBPF guard over a QEMU microvm.

A normal job runs to its end with no finding. Then, while a second job runs, a host process (not the agent)
opens the VMM's /proc/<pid>/mem: the guard reports `host_ptrace_vmm` (denied where the BPF LSM attaches,
observed through tracepoints where it cannot, as on these machines), the job fails with
`suspicious_activity` and is torn down with its record and its key destroyed, and the node is revoked and
refused enrollment until the operator clears it; then it attests again.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from services.attestation_verifier.service import Verifier
from services.janitor.service import Janitor
from services.key_broker.service import KeyBroker
from services.key_broker.store import BUCKET
from services.node_agent.service import NodeAgent, attester_for
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from services.scheduler.service import Scheduler
from shared.crypto.kek import PassphraseFileSource, create_kek_file
from shared.events import (
    AttestationFailed,
    AttestationResult,
    Domain,
    GuardAction,
    InstanceFailed,
    InstanceSuspicious,
    JobSubmitted,
    NodeCleared,
    NodeRevoked,
    Severity,
)
from shared.guard import available, build_guard
from shared.kv import Kv
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from shared.tpm.policy_gen import local_policy
from shared.tpm.swtpm import Swtpm
from tests.framework.flow import events_of, eventually, gpu_inventory, job_book, running
from tests.framework.images import IMAGE, build_test_image
from tests.framework.stack import Stack

pytestmark = pytest.mark.nats

USABLE, WHY = available()
if not USABLE:
    pytest.skip(f"the runtime guard cannot run here: {WHY}", allow_module_level=True)


def _settings(stack: Stack, tmp_path: Path, swtpm: Swtpm) -> Any:
    images = tmp_path / "images"
    policy = local_policy(images, ek_ca=swtpm.state.ek_ca, guard_digest=build_guard().digest)
    assert policy.require_guard and policy.guards
    path = tmp_path / "policy.json"
    path.write_text(policy.model_dump_json())
    return stack.settings.model_copy(update={
        "tpm": swtpm.tcti, "attest_policy": path, "measurement_log": tmp_path / "measurements.jsonl",
        "images_dir": images, "instances_dir": tmp_path / "instances", "min_trust": TrustState.TRUSTED,
        "attest_interval_s": 2.0, "attest_jitter_s": 0.5, "sweep_interval_s": 0.3, "attest_timeout_s": 60.0,
        "key_release_timeout_s": 60.0, "guard": "required"})


def _job(command: str) -> JobSubmitted:
    return JobSubmitted(owner="alice", image=IMAGE, command=("sh", "-c", command), max_runtime_s=300,
                        profile=HardwareProfile(cpu_cores=1, ram_mib=256), volume_mib=16)


async def test_a_host_process_reading_a_vmm_stops_the_job_and_revokes_the_node(
        stack: Stack, swtpm: Swtpm, tmp_path: Path) -> None:
    build_test_image(tmp_path / "images")
    settings = _settings(stack, tmp_path, swtpm)
    create_kek_file(tmp_path / "kek.json", bytearray(b"test passphrase"))
    ring = PassphraseFileSource(tmp_path / "kek.json", bytearray(b"test passphrase")).load()
    kb_bus = await stack.bus("key-broker")
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    agent_bus = await stack.bus("node-agent", "node-a")
    agent = NodeAgent(agent_bus, settings, inventory=gpu_inventory("node-a", gpus=0, cores=2, ram_mib=4096),
                      read_gpus=lambda: (), vmm=QemuMicrovm(accel=settings.vm_accel),
                      attester=attester_for(agent_bus, settings))
    services = (agent, await Verifier.create(await stack.bus("attestation-verifier"), settings),
                await Scheduler.create(await stack.bus("scheduler"), settings),
                Janitor(await stack.bus("janitor"), settings),
                KeyBroker(kb_bus, settings, ring, Kv(await kb_bus.js.key_value(BUCKET))))

    async def state(job: str) -> JobState | None:
        view = (await job_book(admin)).get(job)
        return view.state if view else None

    async with running(*services):
        # 1. a normal job, watched from its launch to its teardown: no finding at all
        await market.publish(_job("echo calm && ls /data >/dev/null"), job_id="calm")
        await eventually(lambda: _is(state("calm"), JobState.DONE), timeout=240, what="the calm job done")
        assert agent.guard is not None and agent.guard_responder is not None
        assert agent.guard_responder.findings == 0

        # 2. the hoster looks inside a running job's VMM
        await market.publish(_job("echo running && sleep 120"), job_id="peek")
        await eventually(lambda: _is(state("peek"), JobState.RUNNING), timeout=240, what="the peek job running")
        running_job = agent.runtime.jobs["peek"] if agent.runtime else None
        assert running_job is not None and running_job.instance is not None and running_job.instance.vm is not None
        vmm_pid = running_job.instance.vm.pid
        # a host process, not the agent (the agent runs in this test's process)
        peek = await asyncio.create_subprocess_exec(sys.executable, "-c", f"open('/proc/{vmm_pid}/mem', 'rb')",
                                                    stderr=asyncio.subprocess.DEVNULL)
        await peek.wait()
        await eventually(lambda: _is(state("peek"), JobState.FAILED), timeout=60, what="the peek job failed")
        await eventually(lambda: _revoked(admin), timeout=30, what="the node revoked")
        # held: the agent's re-enrollment is refused until the operator clears the node
        await eventually(lambda: _enroll_refused(admin), timeout=60, what="a refused re-enrollment")
        await admin.publish(NodeCleared(reason="test: the attacker was this test"), node_id="node-a")
        await eventually(lambda: _verified_after_clear(admin), timeout=90, what="the node attested again")

    peek = await events_of(admin, subject="qvm.jobs.peek.>")
    found = [e.payload for e in peek if isinstance(e.payload, InstanceSuspicious)]
    assert found and found[0].rule == "host_ptrace_vmm" and found[0].severity is Severity.CRITICAL
    assert found[0].action is GuardAction.REVOKE_NODE and found[0].target_pid == vmm_pid
    assert found[0].enforced == (agent.guard is not None and agent.guard.mode == "enforce")
    failed = [e.payload for e in peek if isinstance(e.payload, InstanceFailed)]
    assert failed and failed[0].reason == "suspicious_activity" and "host_ptrace_vmm" in failed[0].detail
    view = (await job_book(admin)).get("peek")
    assert view is not None and view.reason in ("suspicious_activity", "node_revoked")
    calm = await events_of(admin, subject="qvm.jobs.calm.>")
    assert not any(isinstance(e.payload, InstanceSuspicious) for e in calm)


async def _is(value: Any, want: JobState) -> bool:
    return await value is want


async def _node_events(admin: Any, domain: Domain) -> list[Any]:
    return await events_of(admin, domain, f"qvm.{domain.value}.node-a.>")


async def _revoked(admin: Any) -> bool:
    return any(isinstance(e.payload, NodeRevoked) and e.payload.reason == "host_tampering"
               for e in await _node_events(admin, Domain.ATTESTATION))


async def _enroll_refused(admin: Any) -> bool:
    return any(isinstance(e.payload, AttestationFailed) and e.payload.reason == "held_until_cleared"
               for e in await _node_events(admin, Domain.ATTESTATION))


async def _verified_after_clear(admin: Any) -> bool:
    cleared = [e.envelope.time_ns for e in await _node_events(admin, Domain.NODES) if isinstance(e.payload, NodeCleared)]
    return bool(cleared) and any(isinstance(e.payload, AttestationResult) and e.envelope.time_ns > cleared[0]
                                 for e in await _node_events(admin, Domain.ATTESTATION))
