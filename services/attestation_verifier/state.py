"""The verifier's shared state, in JetStream KV so that any replica can take any message.

    qvm_attest_challenges  challenge id -> Challenge: what the answer must be bound to, until when, and,
                           once answered, by which evidence event (single use across replicas: the first
                           compare-and-set wins; a redelivery of the same evidence is recognised)
    qvm_attest_nodes       node id -> NodeAttestation: the enrolled AK, the EK fingerprint, the TPM's boot
                           counters at enrollment, the last verification, revocation
    qvm_attest_eks         EK fingerprint -> node id: one EK, one node (Keylime #1820)

Every write is a compare-and-set on the key's revision; replicas never hold state of their own.
"""

from __future__ import annotations

from pydantic import Field

from shared.events import AttestPurpose
from shared.kv import Kv, Stale
from shared.models import Frozen

__all__ = ["BUCKETS", "Challenge", "Kv", "NodeAttestation", "Stale"]

BUCKETS = ("qvm_attest_challenges", "qvm_attest_nodes", "qvm_attest_eks")


class Challenge(Frozen):
    challenge_id: str
    node_id: str
    purpose: AttestPurpose
    instance_id: str | None = None
    job_id: str | None = None
    key: str = ""  # hex: what the quote binds besides the nonce
    expected_extra: str  # hex: the extraData a valid answer carries
    expires_ns: int
    pcrs: tuple[int, ...]
    nonce: str = ""
    # enrollment only: the AK being enrolled and the published credential (ciphertext, safe to keep)
    ak_public: str = ""
    ak_qualified_name: str = ""
    ek_sha256: str = ""
    node_key: str = ""
    credential_blob: str = ""
    encrypted_secret: str = ""
    answered_by: str = Field("", description="Event id of the evidence that used this challenge.")


class NodeAttestation(Frozen):
    node_id: str
    ek_sha256: str
    ak_public: str
    ak_qualified_name: str
    node_key: str
    reset_count: int
    restart_count: int
    clock: int
    enrolled_ns: int
    last_verified_ns: int = 0
    last_result_id: str = ""
    revoked: bool = False
    revoked_reason: str = ""
    # Set by the runtime guard's node.tampered: enrollment is refused until the operator's node.cleared.
    held_until_cleared: bool = False
