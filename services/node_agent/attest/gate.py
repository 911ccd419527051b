"""The instance gate: measure an instance before its VMM starts, and hold its workload until a verifier
has checked a quote bound to the instance's key.

    runtime --measure--> log entry + PCR extend --launch--> VM boots --attest--> attest.requested
    verifier --attest.challenge--> agent quotes (nonce, instance key) --attest.evidence--> verifier
    verifier --instance.attested / instance.attestation_failed--> `resolve` --> workload runs / never runs

A confidential instance (SEV-SNP, TDX) also answers with its CPU's report, fetched inside the guest over
REPORT_DATA = the same binding as the quote's (nonce, instance key), so the verifier checks both the host's
TPM quote (what was launched, by which agent) and the guest's hardware report (memory encryption, firmware
TCB, launch measurement).
"""

from __future__ import annotations

import asyncio
import contextlib

from services.node_agent.attest.attester import Attester, AttestError
from services.node_agent.attest.measure import file_digest, instance_security_policy, security_policy_digest, vmm_binary
from services.node_agent.instance import Instance, InstanceError
from shared.bus import Bus
from shared.codec import Event
from shared.cvm.errors import expected_report_data
from shared.events import AttestPurpose, AttestRequested, CvmEvidence, InstanceAttestationFailed, InstanceAttested
from shared.ids import derive_event_id
from shared.models import field_or
from shared.tpm.measurements import AssignmentMeasurement, InstanceMeasurement

__all__ = ["InstanceGate"]


class InstanceGate:
    def __init__(self, bus: Bus, attester: Attester, timeout_s: float) -> None:
        self.bus = bus
        self.attester = attester
        self.timeout_s = timeout_s
        self.node_id = bus.identity.node_id or ""
        self._waiting: dict[str, asyncio.Future[InstanceAttested]] = {}
        self._keys: dict[str, bytes] = {}
        self._instances: dict[str, Instance] = {}

    async def measure(self, job_id: str, instance: Instance, manifest_sha256: str) -> InstanceMeasurement:
        m = instance.manifest
        assert m is not None
        binary = vmm_binary(instance.vmm)
        if binary is None:
            raise InstanceError("vmm_missing", f"{instance.vmm.name}: no binary to measure")
        kernel = m.vmlinux if instance.boots_elf() and m.vmlinux else m.kernel
        spec = instance.spec
        entry = InstanceMeasurement(
            instance_id=spec.instance_id, job_id=job_id, image_manifest_sha256=manifest_sha256,
            kernel_sha256=kernel.sha256, initrd_sha256=m.initrd.sha256, rootfs_sha256=m.rootfs.sha256,
            cmdline=instance.guest_cmdline(), vmm=instance.vmm.name,
            vmm_sha256=await asyncio.to_thread(file_digest, binary),
            security_policy_sha256=security_policy_digest(spec.seccomp, spec.cgroups, spec.network),
            security_policy=instance_security_policy(spec.seccomp, spec.cgroups, spec.network),
            public_key=instance.public_key.hex())
        await self._log(entry)
        return entry

    async def assign(self, job_id: str, instance: Instance) -> AssignmentMeasurement:
        """A warm instance (measured at launch with no job) given to `job_id`: the log binds the job to that
        launch and key before the instance is attested for it (a verifier takes one per instance)."""
        entry = AssignmentMeasurement(instance_id=instance.spec.instance_id, job_id=job_id,
                                      public_key=instance.public_key.hex())
        await self._log(entry)
        return entry

    async def _log(self, entry: InstanceMeasurement | AssignmentMeasurement) -> None:
        """Into the TPM log and PCR; the instance cannot go on without it."""
        try:
            await self.attester.measure(entry)
        except AttestError as exc:
            raise InstanceError(exc.reason, exc.detail) from None

    def key_for(self, instance_id: str) -> bytes | None:
        return self._keys.get(instance_id)

    async def cvm_evidence(self, instance_id: str, nonce: bytes) -> CvmEvidence | None:
        """The waiting instance's confidential-VM report for this challenge; None for a plain micro VM.
        A confidential guest that cannot report raises `InstanceError` (the agent then sends no evidence,
        and the instance's attestation times out: it never runs unverified)."""
        instance = self._instances.get(instance_id)
        key = self._keys.get(instance_id)
        if instance is None or key is None or instance.cvm_kind is None:
            return None
        report = await instance.cvm_report(expected_report_data(nonce, key))
        return CvmEvidence(kind=instance.cvm_kind, report=report.report.hex(), certificates=report.aux.hex())

    async def attest(self, job_id: str, instance_id: str, public_key: bytes, cause: Event,
                     instance: Instance | None = None) -> InstanceAttested:
        """Ask for a challenge and wait for the verdict; raises `InstanceError` unless the quote verified."""
        future: asyncio.Future[InstanceAttested] = asyncio.get_running_loop().create_future()
        self._waiting[instance_id] = future
        self._keys[instance_id] = public_key
        if instance is not None:
            self._instances[instance_id] = instance
        try:
            await self.bus.publish(AttestRequested(purpose=AttestPurpose.INSTANCE, instance_id=instance_id,
                                                   job_id=job_id, key=public_key.hex()),
                                   node_id=self.node_id, event_id=derive_event_id(cause.id, "AttestRequested"))
            try:
                return await asyncio.wait_for(future, self.timeout_s)
            except TimeoutError:
                raise InstanceError("attestation_timeout", f"no verdict within {self.timeout_s:g}s") from None
        finally:
            self._waiting.pop(instance_id, None)
            self._keys.pop(instance_id, None)
            self._instances.pop(instance_id, None)

    def resolve(self, event: Event) -> None:
        p = event.payload
        instance_id = field_or(p, "instance_id", None) or ""
        future = self._waiting.get(instance_id)
        if future is None or future.done():
            return  # a verdict for an instance no longer waiting (redelivery, agent restart)
        if isinstance(p, InstanceAttested):
            future.set_result(p)
        elif isinstance(p, InstanceAttestationFailed):
            with contextlib.suppress(asyncio.InvalidStateError):
                future.set_exception(InstanceError("attestation_failed", f"{p.reason}: {p.detail}"[:1024]))
