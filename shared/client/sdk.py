"""The client's face of qvm: submit a confidential job, verify its instance, release secrets to it, read
its output.

    output_key = new_output_key()                           # X25519, in the client's memory only
    job_id = await client.submit(with_output_key(job, output_key))  # client_secrets=True: the workload waits
    verified = await client.verify(job_id, expected_images=[digest])
    await client.release_secrets(verified, {"api-token": b"..."})
    output = await client.open_output(job_id, output_key)   # after the job ended: opened and verified

`verify` gathers the evidence from the bus and checks it with the verifier's own code (see `verify`);
`release_secrets` seals the bundle with HPKE to the key the client just verified, bound to the job and
instance ids, so only that instance's holder can open it. Neither the key-broker nor anyone on the bus
can read it. The same holds for the output: every chunk is sealed to the job's `output_key`
(`shared.client.output`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Collection, Mapping

from cryptography.hazmat.primitives.asymmetric import x25519

from shared.bus import Bus
from shared.client.bundle import pack_bundle
from shared.client.evidence import collect_evidence
from shared.client.output import JobOutput, open_output
from shared.client.verify import CLIENT_CVM_POLICY, VerifiedInstance, verify_instance
from shared.crypto import hpke
from shared.crypto.secret import zeroize
from shared.cvm.evidence import CvmPolicy
from shared.events import JobSubmitted, SecretsReleased
from shared.ids import derive_event_id

__all__ = ["ConfidentialClient"]


class ConfidentialClient:
    def __init__(self, bus: Bus, measurement_pcr: int = 15, cvm_policy: CvmPolicy = CLIENT_CVM_POLICY) -> None:
        """`bus` is connected as the marketplace identity (which publishes jobs on the clients' behalf);
        `cvm_policy` is what this client requires of a confidential VM's hardware report."""
        self.bus = bus
        self.measurement_pcr = measurement_pcr
        self.cvm_policy = cvm_policy

    async def submit(self, job: JobSubmitted, job_id: str | None = None) -> str:
        job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
        await self.bus.publish(job, job_id=job_id)
        return job_id

    async def verify(self, job_id: str, *, expected_images: Collection[str] = (), timeout_s: float = 180.0,
                     expected_measurements: Collection[str] = ()) -> VerifiedInstance:
        """Wait for the instance's attestation, then check all of its evidence here (for a confidential VM
        its hardware report too, and its launch measurement against `expected_measurements` if given)."""
        evidence = await collect_evidence(self.bus, job_id, timeout_s)
        return await asyncio.to_thread(verify_instance, evidence, expected_images=expected_images,
                                       measurement_pcr=self.measurement_pcr, now_ns=time.time_ns(),
                                       cvm_policy=self.cvm_policy, expected_measurements=expected_measurements)

    async def release_secrets(self, verified: VerifiedInstance, files: Mapping[str, bytes | bytearray]) -> str:
        """Seal `files` to the verified instance and publish them; returns the event id."""
        bundle = pack_bundle(files)
        info = hpke.release_info("client-secrets", verified.job_id, verified.instance_id)
        try:
            sealed = await asyncio.to_thread(hpke.seal, bundle, verified.public_key, info)
        finally:
            zeroize(bundle)
        event = SecretsReleased(instance_id=verified.instance_id, suite=hpke.SUITE_NAME, sealed=sealed.hex(),
                                verified=verified.claims)
        event_id = derive_event_id(verified.claims.result_id, "SecretsReleased")
        await self.bus.publish(event, job_id=verified.job_id, node_id=verified.node_id, event_id=event_id)
        return event_id

    async def open_output(self, job_id: str, private_key: x25519.X25519PrivateKey, *,
                          require_complete: bool = True) -> JobOutput:
        """The job's output, opened with the private half of its `output_key` and verified (see
        `shared.client.output.open_output_events`)."""
        return await open_output(self.bus, job_id, private_key, require_complete=require_complete)
