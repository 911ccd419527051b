"""The client's own check of an instance, with the verifier's code: a client that trusts only the hardware
does not take the verifier's word for it.

    1. the verifier's result is for this job's instance, trusted, and still valid
    2. the evidence, the challenge and the result belong together (ids, instance, job)
    3. the AK that signed the quote is the node's enrolled AK (its name is the one the result names)
    4. the quote: signature first, then nonce and instance key in extraData, PCR selection and digest
    5. the measurement log replays to the quoted PCR, and it holds this instance's launch, with this key,
       of an image the client expects
    6. a confidential VM (its launch names a CVM VMM, or the result says so): its SEV-SNP report or TDX quote,
       checked here against the vendors' pinned roots, bound to the same nonce and key, with the launch
       measurement the verifier named (and one the client expects, if it says which)
What passed is returned as `VerifiedInstance` (and shown by `qvm client`); the first failure raises
`ClientVerificationError` with a reason code, and nothing is released.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.client.evidence import InstanceEvidence
from shared.cvm.errors import CvmError, expected_report_data
from shared.cvm.evidence import CVM_VMMS, CvmPolicy, CvmVerdict, verify_cvm
from shared.cvm.snp import SnpPolicy
from shared.cvm.tdx import TdxPolicy
from shared.errors import ReasonedError
from shared.events import AttestEvidence, AttestPurpose, InstanceAttested, VerifiedClaims
from shared.models import TrustState
from shared.tpm.measurements import AgentMeasurement, InstanceMeasurement, LogError, parse_log, replay
from shared.tpm.quote import QuoteError, binding, load_ak, verify_quote
from shared.tpm.structures import TpmFormatError

__all__ = ["CLIENT_CVM_POLICY", "ClientVerificationError", "VerifiedInstance", "verify_instance"]


class ClientVerificationError(ReasonedError):
    """A failure with a stable reason code (see `ReasonedError`)."""


@dataclass(frozen=True)
class VerifiedInstance:
    job_id: str
    instance_id: str
    node_id: str
    public_key: bytes
    claims: VerifiedClaims
    launch: InstanceMeasurement
    agent_sha256: str
    ek_sha256: str
    expires_ns: int
    cvm: CvmVerdict | None = None  # what the confidential VM's own hardware report proved


def _fail(reason: str, detail: str) -> ClientVerificationError:
    return ClientVerificationError(reason, detail)


CLIENT_CVM_POLICY = CvmPolicy(snp=SnpPolicy(allow_any_measurement=True),
                              tdx=TdxPolicy(allow_any_mrtd=True, require_collateral=False))
"""A client's default: the hardware signature, the vendor chain and the binding are checked; the launch
measurement is shown, and checked only against the measurements the client names (`expected_measurements`);
the TDX TCB status needs Intel's collateral, which the verifier holds."""


def verify_instance(ev: InstanceEvidence, *, expected_images: Collection[str], measurement_pcr: int,
                    now_ns: int, cvm_policy: CvmPolicy = CLIENT_CVM_POLICY,
                    expected_measurements: Collection[str] = ()) -> VerifiedInstance:
    """Blocking (signature checks, hashing): run it off the event loop."""
    result = ev.attested
    instance = result.instance_id or ""
    if result.purpose is not AttestPurpose.INSTANCE or result.job_id != ev.job_id or not instance:
        raise _fail("result_invalid", "not an instance result for this job")
    if result.trust is not TrustState.TRUSTED:
        raise _fail("not_trusted", f"the result says {result.trust}")
    if result.expires_ns <= now_ns:
        raise _fail("result_expired", "the attestation result has expired")
    proof = ev.evidence.payload
    assert isinstance(proof, AttestEvidence)
    if (ev.evidence.id != result.evidence_id or proof.challenge_id != result.challenge_id
            or ev.challenge.challenge_id != result.challenge_id or proof.instance_id != instance
            or proof.job_id != ev.job_id or ev.evidence.node_id != ev.node_id):
        raise _fail("evidence_mismatch", "the evidence, its challenge and the result do not belong together")
    try:
        ak_area, _ = load_ak(bytes.fromhex(ev.enrollment.ak_public))
    except (TpmFormatError, QuoteError, ValueError) as exc:
        raise _fail("ak_invalid", str(exc)[:200]) from None
    if ak_area.name.hex() != result.ak_name:
        raise _fail("ak_not_enrolled", "the node's enrolled AK is not the AK the verifier accepted")
    try:
        pcrs = {int(i): bytes.fromhex(v) for i, v in proof.pcrs.items()}
        key = bytes.fromhex(result.public_key)
        verify_quote(
            bytes.fromhex(ev.enrollment.ak_public), bytes.fromhex(proof.attest), bytes.fromhex(proof.signature),
            extra_data=binding(bytes.fromhex(ev.challenge.nonce), key), pcr_values=pcrs,
            required_pcrs=(measurement_pcr,), qualified_signer=bytes.fromhex(ev.enrollment.ak_qualified_name))
    except QuoteError as exc:
        raise _fail(f"quote_{exc.reason}"[:64], exc.detail) from None
    except ValueError as exc:
        raise _fail("evidence_invalid", str(exc)[:200]) from None
    try:
        entries = parse_log(proof.log)
    except LogError as exc:
        raise _fail(exc.reason, exc.detail) from None
    pcr = pcrs.get(measurement_pcr, b"")
    if not hmac.compare_digest(replay(entries), pcr):
        raise _fail("log_replay_mismatch", f"the measurement log does not replay to PCR {measurement_pcr}")
    launch = next((e for e in entries if isinstance(e, InstanceMeasurement) and e.instance_id == instance), None)
    if launch is None or launch.job_id != ev.job_id or launch.public_key != result.public_key:
        raise _fail("instance_not_measured", "the log has no launch of this instance with this key")
    if launch.image_manifest_sha256 != result.image_manifest_sha256:
        raise _fail("image_mismatch", "the result names another image than the measured launch")
    if expected_images and launch.image_manifest_sha256 not in expected_images:
        raise _fail("image_not_expected", f"the instance runs image {launch.image_manifest_sha256[:16]}…, "
                                          "not one the client expects")
    cvm = _verify_cvm(proof, result, launch, bytes.fromhex(ev.challenge.nonce), key, cvm_policy, now_ns,
                      expected_measurements)
    agent = next((e for e in reversed(entries) if isinstance(e, AgentMeasurement)), None)
    claims = VerifiedClaims(result_id=ev.result.id, evidence_id=ev.evidence.id, node_id=ev.node_id,
                            image_manifest_sha256=launch.image_manifest_sha256, pcr_sha256=pcr.hex(),
                            ak_name=result.ak_name)
    return VerifiedInstance(ev.job_id, instance, ev.node_id, key, claims, launch,
                            agent.agent_sha256 if agent else "", result.ek_sha256, result.expires_ns, cvm)


def _verify_cvm(proof: AttestEvidence, result: InstanceAttested, launch: InstanceMeasurement, nonce: bytes,
                key: bytes, policy: CvmPolicy, now_ns: int, expected: Collection[str]) -> CvmVerdict | None:
    if proof.cvm is None:
        if launch.vmm in CVM_VMMS or result.cvm is not None:
            raise _fail("cvm_evidence_missing", f"the instance is a confidential VM ({launch.vmm}) but its evidence "
                                                "has no hardware report")
        return None
    if CVM_VMMS.get(launch.vmm) is not proof.cvm.kind or result.cvm is not proof.cvm.kind:
        raise _fail("cvm_mismatch", f"a {proof.cvm.kind} report for a launch by {launch.vmm} (result: {result.cvm})")
    try:
        verdict = verify_cvm(proof.cvm, report_data=expected_report_data(nonce, key), policy=policy,
                             at=datetime.fromtimestamp(now_ns / 1e9, UTC))
    except CvmError as exc:
        raise _fail(f"cvm_{exc.reason}"[:64], exc.detail) from None
    if verdict.measurement != result.cvm_measurement:
        raise _fail("cvm_mismatch", "the result names another launch measurement than the report")
    if expected and verdict.measurement not in expected:
        raise _fail("cvm_measurement_not_expected", f"the guest's launch measurement {verdict.measurement[:16]}… is "
                                                    "not one the client expects")
    return verdict
