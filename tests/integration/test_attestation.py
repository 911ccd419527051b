"""Attestation over the bus with a real TPM (swtpm) and a real nats-server: enrollment, node and instance
quotes, trust in the scheduler, replays caught across verifier replicas, EK reuse, revocation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from services.attestation_verifier.service import Verifier
from services.node_agent.service import NodeAgent
from services.scheduler.service import Scheduler
from shared.codec import Event
from shared.events import (
    AttestationFailed,
    AttestationResult,
    AttestEvidence,
    AttestPurpose,
    Domain,
    EventType,
    InstanceAttestationFailed,
    InstanceAttested,
)
from shared.ids import new_event_id
from shared.models import TrustState
from shared.tpm.measurements import InstanceMeasurement
from shared.tpm.policy import AttestationPolicy, ImageReference
from shared.tpm.swtpm import Swtpm, SwtpmState
from tests.framework.flow import attested_agent, events_of, eventually, running
from tests.framework.stack import Stack
from tests.framework.tpm import start_copy

pytestmark = pytest.mark.nats

INSTANCE = dict(image_manifest_sha256="33" * 32, kernel_sha256="44" * 32, initrd_sha256="55" * 32,
                rootfs_sha256="66" * 32, cmdline="console=hvc0", vmm="qemu-microvm", vmm_sha256="77" * 32,
                security_policy_sha256="88" * 32)


def _settings(stack: Stack, tmp_path: Path, swtpm: Swtpm, **extra: Any) -> Any:
    from shared.tpm.digests import code_digest

    policy = AttestationPolicy(
        agents=(code_digest(),), images={"33" * 32: ImageReference(name="img", kernel_sha256="44" * 32,
                                                                   initrd_sha256="55" * 32, rootfs_sha256="66" * 32)},
        vmms={"77" * 32: "qemu-microvm"}, security_policies=("88" * 32,), ek_ca=swtpm.state.ek_ca,
        **extra)
    path = tmp_path / "policy.json"
    path.write_text(policy.model_dump_json())
    return stack.settings.model_copy(update={
        "tpm": swtpm.tcti, "attest_policy": path, "measurement_log": tmp_path / "measurements.jsonl",
        "attest_interval_s": 3600.0, "sweep_interval_s": 0.3, "attest_timeout_s": 20.0})


async def _agent(stack: Stack, settings: Any, node: str = "node-a") -> NodeAgent:
    return await attested_agent(stack, settings, node)


async def _results(admin: Any, etype: EventType, node: str = "node-a") -> list[Event]:
    domain = Domain.JOBS if etype in (EventType.INSTANCE_ATTESTED, EventType.INSTANCE_ATTESTATION_FAILED) \
        else Domain.ATTESTATION
    return [e for e in await events_of(admin, domain) if e.spec.type is etype and e.node_id == node]


async def _trust(admin: Any, node: str) -> str:
    try:
        entry = await (await admin.js.key_value("qvm_nodes")).get(node)
    except Exception:
        return ""
    return str(msgpack.unpackb(entry.value)["trust"])


async def test_enrollment_node_and_instance_quotes(stack: Stack, swtpm: Swtpm, tmp_path: Path) -> None:
    settings = _settings(stack, tmp_path, swtpm)
    admin = await stack.bus("admin")
    agent = await _agent(stack, settings)
    verifier = await Verifier.create(await stack.bus("attestation-verifier"), settings)
    scheduler = await Scheduler.create(await stack.bus("scheduler"), settings)
    async with running(agent, verifier, scheduler):
        await eventually(lambda: _is(admin, "node-a", "trusted"),
                         what="the node to be trusted")
        enrolled = (await _results(admin, EventType.ATTEST_VERIFIED))[0].payload
        assert isinstance(enrolled, AttestationResult) and enrolled.purpose is AttestPurpose.ENROLL
        assert enrolled.trust is TrustState.TRUSTED and enrolled.agent_sha256 and enrolled.expires_ns > time.time_ns()

        # a node-level re-attestation
        assert agent.attester is not None and agent.gate is not None
        await agent.bus.publish(_node_request(agent), node_id="node-a")
        await eventually(lambda: _count(admin, EventType.ATTEST_VERIFIED, 2), what="the node re-attestation")

        # an instance: measured (as before a VMM launch), then its quote gates the workload
        key = bytes(range(32))
        await agent.attester.measure(InstanceMeasurement(instance_id="i-1", job_id="job-1", public_key=key.hex(),
                                                         **INSTANCE))
        cause = _fake_cause()
        verdict = await agent.gate.attest("job-1", "i-1", key, cause)
        assert isinstance(verdict, InstanceAttested) and verdict.public_key == key.hex()
        assert verdict.image_manifest_sha256 == "33" * 32

        # an instance the log does not know (never measured): refused, and the node is revoked
        with pytest.raises(Exception, match="instance_not_measured"):
            await agent.gate.attest("job-2", "i-2", bytes(32), _fake_cause())
        failed = await _results(admin, EventType.INSTANCE_ATTESTATION_FAILED)
        assert isinstance(failed[0].payload, InstanceAttestationFailed)
        await eventually(lambda: _is(admin, "node-a", "untrusted"), what="the node to be untrusted")
        assert await _results(admin, EventType.ATTEST_REVOKED)


async def test_replayed_evidence_is_caught_across_two_replicas(stack: Stack, swtpm: Swtpm, tmp_path: Path) -> None:
    settings = _settings(stack, tmp_path, swtpm)
    admin = await stack.bus("admin")
    agent = await _agent(stack, settings)
    v1 = await Verifier.create(await stack.bus("attestation-verifier"), settings)
    v2 = await Verifier.create(await stack.bus("attestation-verifier"), settings)
    async with running(agent, v1, v2):
        await eventually(lambda: _count(admin, EventType.ATTEST_VERIFIED, 1), what="enrollment")
        for _ in range(8):
            await agent.bus.publish(_node_request(agent), node_id="node-a")
        await eventually(lambda: _count(admin, EventType.ATTEST_VERIFIED, 9), what="eight re-attestations")
        assert v1.verified + v2.verified == 9
        assert v1.verified > 0 and v2.verified > 0, "one work queue: both replicas take a share"

        # replay: the same signed evidence, republished as a new event from the node (a hostile host)
        evidence = [e for e in await events_of(admin, Domain.ATTESTATION)
                    if e.spec.type is EventType.ATTEST_EVIDENCE][-1]
        assert isinstance(evidence.payload, AttestEvidence)
        await agent.bus.publish(evidence.payload, node_id="node-a")
        await eventually(lambda: _count(admin, EventType.ATTEST_FAILED, 1), what="the replay to be refused")
        failed = (await _results(admin, EventType.ATTEST_FAILED))[0].payload
        assert isinstance(failed, AttestationFailed) and failed.reason == "nonce_replayed"


async def test_same_ek_on_a_second_node_is_refused(stack: Stack, swtpm: Swtpm, tmp_path: Path,
                                                   tpm_templates: tuple[SwtpmState, SwtpmState]) -> None:
    settings = _settings(stack, tmp_path, swtpm)
    admin = await stack.bus("admin")
    verifier = await Verifier.create(await stack.bus("attestation-verifier"), settings)
    clone = start_copy(tpm_templates[0], tmp_path / "clone")  # the same TPM identity (EK) again
    try:
        other = settings.model_copy(update={"tpm": clone.tcti, "measurement_log": tmp_path / "b.jsonl"})
        a, b = await _agent(stack, settings), await _agent(stack, other, "node-b")
        async with running(verifier, a):
            await eventually(lambda: _count(admin, EventType.ATTEST_VERIFIED, 1), what="node-a enrollment")
            async with running(b):
                await eventually(lambda: _failed_reason(admin, "node-b"), what="node-b refused")
        assert await _failed_reason(admin, "node-b") == "ek_reused"
    finally:
        clone.stop()


async def test_tampered_log_and_missed_deadline_revoke(stack: Stack, swtpm: Swtpm, tmp_path: Path) -> None:
    settings = _settings(stack, tmp_path, swtpm)
    admin = await stack.bus("admin")
    agent = await _agent(stack, settings)
    verifier = await Verifier.create(await stack.bus("attestation-verifier"), settings)
    async with running(agent, verifier):
        await eventually(lambda: _count(admin, EventType.ATTEST_VERIFIED, 1), what="enrollment")
        assert agent.attester is not None
        agent.attester.entries.append(agent.attester.entries[0])  # claims a measurement never extended
        await agent.bus.publish(_node_request(agent), node_id="node-a")
        await eventually(lambda: _failed_reason(admin, "node-a"), what="the tampered quote")
        assert await _failed_reason(admin, "node-a") == "log_replay_mismatch"
        revoked = await _results(admin, EventType.ATTEST_REVOKED)
        assert revoked and revoked[0].payload.reason == "attestation_failed"  # type: ignore[attr-defined]
        # a revoked node must enroll again before it gets another challenge
        agent.attester.entries.pop()
        await agent.bus.publish(_node_request(agent), node_id="node-a")
        await eventually(lambda: _count(admin, EventType.ATTEST_FAILED, 2), what="the refused request")
        assert (await _results(admin, EventType.ATTEST_FAILED))[1].payload.reason == "not_enrolled"  # type: ignore
        # re-enrollment restores trust; silence past the result lifetime revokes it
        await agent.bus.publish(agent.attester.enroll_request(), node_id="node-a")
        await eventually(lambda: _count(admin, EventType.ATTEST_VERIFIED, 2), what="re-enrollment")
        assert await verifier.sweep_deadlines(time.time_ns() + int(3600e9)) == ["node-a"]
        await eventually(lambda: _count(admin, EventType.ATTEST_REVOKED, 2), what="deadline revocation")
        last = (await _results(admin, EventType.ATTEST_REVOKED))[-1].payload
        assert last.reason == "attestation_deadline_missed"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- helpers

def _node_request(agent: NodeAgent) -> Any:
    from shared.events import AttestRequested

    assert agent.attester is not None
    return AttestRequested(purpose=AttestPurpose.NODE, key=agent.attester.node_key.hex())


def _fake_cause() -> Any:
    class _Cause:
        id = new_event_id()
    return _Cause()


async def _is(admin: Any, node: str, trust: str) -> bool:
    return await _trust(admin, node) == trust


async def _count(admin: Any, etype: EventType, n: int) -> bool:
    return len(await _results(admin, etype)) >= n


async def _failed_reason(admin: Any, node: str) -> str:
    failed = await _results(admin, EventType.ATTEST_FAILED, node)
    return failed[0].payload.reason if failed else ""  # type: ignore[attr-defined]

