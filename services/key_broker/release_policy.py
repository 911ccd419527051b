"""Decide whether an attestation result earns an instance the job's key: a pure function of the stored
job record, the verified result and the clock, with one reason code per refusal.

The result's signature and its producer (an attestation-verifier identity) were already checked by the
codec before this runs; a forged result never gets here (it is dead-lettered with `bad_signature` or
`producer_not_allowed`). What is checked here is what the result claims, against the job's policy:

    result_invalid         not an instance result for this job, or no instance key in it
    keys_destroyed         the job's keys are gone (the job or its instance ended)
    result_expired         the result's validity ended
    result_stale           verified longer ago than the policy's max_result_age_s
    replayed_release       this result (another copy of it) or its challenge already served a release
    node_revoked           the node lost its trust after (or when) the result was made
    wrong_node             the result is about a node other than the one running the job's instance
    instance_unknown       the node never announced this instance for the job
    wrong_instance_key     the attested key is not the key the node announced for the instance
    trust_too_low          the result's trust is below the policy's minimum
    image_not_allowed      the attested image is not among the policy's allowed images
    security_level_not_met the job asks for a confidential VM and the result shows no verified CVM report
                           (the verifier sets `cvm` only when the SEV-SNP report or TDX quote passed: vendor
                           chain to the pinned root, policy, REPORT_DATA bound to the nonce and this key)
    second_instance        another instance of the job already holds the key
"""

from __future__ import annotations

from dataclasses import dataclass

from services.key_broker.store import JobKeys, NodeRevocation
from shared.events import AttestPurpose, InstanceAttested
from shared.models import SecurityLevel

__all__ = ["Decision", "decide_release"]


@dataclass(frozen=True)
class Decision:
    release: bool
    reason: str = ""
    detail: str = ""
    redelivery: bool = False  # the same stream message again (JetStream redelivery): answer as before


def _refuse(reason: str, detail: str) -> Decision:
    return Decision(False, reason, detail)


def decide_release(record: JobKeys, result: InstanceAttested, *, job_id: str, node_id: str, result_id: str,
                   stream_seq: int, now_ns: int, revocation: NodeRevocation | None) -> Decision:
    instance = result.instance_id or ""
    if result.purpose is not AttestPurpose.INSTANCE or result.job_id != job_id or not instance \
            or not result.public_key:
        return _refuse("result_invalid", "not an instance attestation result for this job")
    spent_at = record.spent_results.get(result_id)
    if spent_at is not None:
        if spent_at == stream_seq and record.holder == instance and not record.destroyed:
            return Decision(True, redelivery=True)
        return _refuse("replayed_release", f"result {result_id} already served a release")
    if record.destroyed:
        return _refuse("keys_destroyed", f"the job's keys were destroyed ({record.destroyed_reason})")
    if result.challenge_id in record.spent_challenges:
        return _refuse("replayed_release", f"challenge {result.challenge_id} already served a release")
    if result.expires_ns <= now_ns:
        return _refuse("result_expired", "the attestation result has expired")
    if now_ns - result.verified_ns > record.policy.max_result_age_s * 1_000_000_000:
        return _refuse("result_stale", f"verified more than {record.policy.max_result_age_s}s ago")
    if revocation is not None and revocation.revoked_ns >= result.verified_ns:
        return _refuse("node_revoked", f"node {node_id} lost its trust: {revocation.reason}"[:300])
    if record.node_id and record.node_id != node_id:
        return _refuse("wrong_node", f"the job's instance runs on {record.node_id}, not {node_id}")
    announced = record.instance_keys.get(instance)
    if announced is None:
        return _refuse("instance_unknown", f"node {node_id} never announced instance {instance} for this job")
    if announced != result.public_key:
        return _refuse("wrong_instance_key", "the attested key is not the key the node announced for the instance")
    if result.trust.rank < record.policy.min_trust.rank:
        return _refuse("trust_too_low", f"trust {result.trust} is below {record.policy.min_trust}")
    if record.policy.allowed_images and result.image_manifest_sha256 not in record.policy.allowed_images:
        return _refuse("image_not_allowed", f"image {result.image_manifest_sha256[:16]}… is not allowed for this job")
    if record.security is SecurityLevel.CONFIDENTIAL and (result.cvm is None or not result.cvm_measurement):
        return _refuse("security_level_not_met", "the job needs a confidential VM; the result shows a TPM-attested "
                                                 "micro VM only (no verified SEV-SNP or TDX report)")
    if record.holder and record.holder != instance:
        return _refuse("second_instance", f"instance {record.holder} already holds the job's key")
    return Decision(True)
