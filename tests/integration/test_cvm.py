"""A confidential-VM job end to end: placed only on a node that proved it can start a confidential VM, its
instance answering with a hardware report bound to the challenge and its key, the verifier checking that
report (vendor chain, policy, REPORT_DATA) beside the TPM quote, and the key-broker releasing the job's key
only on a verified CVM result.

These machines have no SEV-SNP: the instance is a real QEMU microvm and its report comes from
`FakeSnpFirmware` (tests/framework/fake_cvm.py), a fake at the hardware boundary whose ARK this test's
policy names explicitly. The same job with a forged VCEK (an ARK nobody named), and with the report real
Milan hardware signed (bound to another challenge), never gets its key.
"""

from __future__ import annotations

import hashlib
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
from shared.client.evidence import collect_evidence
from shared.client.sdk import ConfidentialClient
from shared.client.verify import CLIENT_CVM_POLICY, ClientVerificationError
from shared.codec import Event
from shared.crypto.kek import PassphraseFileSource, create_kek_file
from shared.cvm.errors import expected_report_data
from shared.cvm.evidence import CvmPolicy
from shared.cvm.snp import SnpPolicy
from shared.events import (
    CvmKind,
    InstanceAttestationFailed,
    InstanceAttested,
    JobSubmitted,
    KeyReleased,
    KeyReleaseRefused,
)
from shared.kv import Kv
from shared.lifecycle import JobState
from shared.models import HardwareProfile, SecurityLevel, TrustState
from shared.replay import read_stream
from shared.tpm.policy_gen import local_policy
from shared.tpm.swtpm import Swtpm
from tests.framework.fake_cvm import FakeSnpFirmware, FakeSnpMicrovm
from tests.framework.flow import eventually, gpu_inventory, job_book, running
from tests.framework.images import IMAGE, build_test_image
from tests.framework.stack import Stack

pytestmark = pytest.mark.nats

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "cvm" / "snp"
MILAN = bytes.fromhex((VECTORS / "milan-report.hex").read_text().strip()) if VECTORS.is_dir() else b""


class _ReplayedMilanFirmware(FakeSnpFirmware):
    """Answers every report request with the report real Milan hardware signed (and its real VCEK): genuine,
    but bound to someone else's REPORT_DATA."""

    def report(self, report_data: bytes, *, vmpl: int = 0) -> bytes:
        return MILAN

    def certificate_table(self) -> bytes:
        return (VECTORS / "milan-vcek.der").read_bytes()


def _settings(stack: Stack, tmp_path: Path, swtpm: Swtpm, cvm: CvmPolicy) -> Any:
    images = tmp_path / "images"
    policy = local_policy(images, ek_ca=swtpm.state.ek_ca).model_copy(update={"cvm": cvm})
    path = tmp_path / "policy.json"
    path.write_text(policy.model_dump_json())
    return stack.settings.model_copy(update={
        "tpm": swtpm.tcti, "attest_policy": path, "measurement_log": tmp_path / "measurements.jsonl",
        "images_dir": images, "instances_dir": tmp_path / "instances", "min_trust": TrustState.TRUSTED,
        "attest_interval_s": 3600.0, "sweep_interval_s": 0.3, "attest_timeout_s": 60.0,
        "key_release_timeout_s": 60.0})


async def _events(admin: Any, job: str) -> list[Event]:
    out: list[Event] = []
    for stream, subject in (("QVM_JOBS", f"qvm.jobs.{job}.>"), ("QVM_KEYS", f"qvm.keys.{job}.>")):
        async for batch in read_stream(admin.js, stream, subject):
            out += [admin.codec.decode(m.subject, m.data) for m in batch]
    return sorted(out, key=lambda e: e.envelope.time_ns)


def _job(name: str) -> JobSubmitted:
    return JobSubmitted(owner="alice", image=IMAGE, command=("sh", "-c", f"echo {name} && ls /data >/dev/null"),
                        max_runtime_s=300, profile=HardwareProfile(cpu_cores=1, ram_mib=256), volume_mib=32,
                        security=SecurityLevel.CONFIDENTIAL)


async def test_a_confidential_job_gets_its_key_only_on_a_verified_cvm_report(
        stack: Stack, swtpm: Swtpm, tmp_path: Path) -> None:
    build_test_image(tmp_path / "images")
    real = FakeSnpFirmware()
    cvm = CvmPolicy(snp=SnpPolicy(measurements=(real.measurement.hex(), "7a1e5c266c0108dbc9bb94fa926951320940915d0a"
                                                                          "afb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c4"
                                                                          "80cd81841f")),
                    extra_roots=(real.write_root(tmp_path / "fake-ark.pem"),))
    settings = _settings(stack, tmp_path, swtpm, cvm)
    create_kek_file(tmp_path / "kek.json", bytearray(b"test passphrase"))
    ring = PassphraseFileSource(tmp_path / "kek.json", bytearray(b"test passphrase")).load()
    kb_bus = await stack.bus("key-broker")
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    vmm = FakeSnpMicrovm(real, accel=settings.vm_accel)
    agent_bus = await stack.bus("node-agent", "node-a")
    inventory = gpu_inventory("node-a", gpus=0, cores=2, ram_mib=4096).model_copy(update={"confidential": ("sev-snp",)})
    agent = NodeAgent(agent_bus, settings, inventory=inventory, read_gpus=lambda: (), vmm=QemuMicrovm(accel="tcg"),
                      cvm_vmm=vmm, attester=attester_for(agent_bus, settings))
    services = (agent, await Verifier.create(await stack.bus("attestation-verifier"), settings),
                await Scheduler.create(await stack.bus("scheduler"), settings),
                Janitor(await stack.bus("janitor"), settings),
                KeyBroker(kb_bus, settings, ring, Kv(await kb_bus.js.key_value(BUCKET))))

    async def ended(job: str) -> bool:
        view = (await job_book(admin)).get(job)
        return view is not None and view.terminal

    async with running(*services):
        # 1. the hardware fake's firmware, whose root the policy names: attested as SEV-SNP, key released, job done
        await market.publish(_job("cvm-ok"), job_id="cvm-ok")
        # the client checks the report itself: with AMD's roots only, the fake's chain is refused; naming the
        # fake's root (as this test's verifier policy does), it verifies, with the expected measurement
        client = ConfidentialClient(market, settings.measurement_pcr,
                                    cvm_policy=CLIENT_CVM_POLICY.model_copy(update={"extra_roots": cvm.extra_roots}))
        verified = await client.verify("cvm-ok", expected_measurements=[real.measurement.hex()], timeout_s=240)
        assert verified.cvm is not None and verified.cvm.kind is CvmKind.SEV_SNP
        assert verified.cvm.fields["report_data"] == expected_report_data(
            bytes.fromhex((await collect_evidence(market, "cvm-ok")).challenge.nonce), verified.public_key).hex()
        with pytest.raises(ClientVerificationError) as refused:
            await ConfidentialClient(market, settings.measurement_pcr).verify("cvm-ok", timeout_s=30)
        assert refused.value.reason == "cvm_ark_not_pinned"
        await eventually(lambda: ended("cvm-ok"), timeout=240, what="the confidential job to end")
        # 2. a forged VCEK (its ARK is nobody's): refused, no key
        vmm.firmware = FakeSnpFirmware(measurement=real.measurement)
        await market.publish(_job("cvm-forged"), job_id="cvm-forged")
        await eventually(lambda: ended("cvm-forged"), timeout=240, what="the forged job to end")
        # 3. a genuine report from real Milan hardware, replayed: bound to another challenge, refused
        if MILAN:
            vmm.firmware = _ReplayedMilanFirmware()
            await market.publish(_job("cvm-replayed"), job_id="cvm-replayed")
            await eventually(lambda: ended("cvm-replayed"), timeout=240, what="the replayed job to end")

    ok = await _events(admin, "cvm-ok")
    attested = next(e.payload for e in ok if isinstance(e.payload, InstanceAttested))
    assert attested.cvm is CvmKind.SEV_SNP and attested.cvm_measurement == real.measurement.hex()
    assert attested.cvm_tcb.startswith("Milan")
    released = next(e.payload for e in ok if isinstance(e.payload, KeyReleased))
    assert released.instance_id == attested.instance_id
    view = (await job_book(admin)).get("cvm-ok")
    assert view is not None and view.state is JobState.DONE and view.exit_code == 0

    for job, reason in (("cvm-forged", "ark_not_pinned"), ("cvm-replayed", "report_data_mismatch")):
        if job == "cvm-replayed" and not MILAN:
            continue
        events = await _events(admin, job)
        failed = [e.payload for e in events if isinstance(e.payload, InstanceAttestationFailed)]
        assert failed and failed[0].reason == reason, [str(e.spec.type) for e in events]
        assert not any(isinstance(e.payload, (KeyReleased, InstanceAttested)) for e in events)
        view = (await job_book(admin)).get(job)
        assert view is not None and view.state is JobState.FAILED
    assert not any(isinstance(e.payload, KeyReleaseRefused) for e in ok)
    assert hashlib.sha256(MILAN).hexdigest()  # the vector was read (the replay case ran) when present
