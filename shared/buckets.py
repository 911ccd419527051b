"""Every JetStream KV bucket qvm keeps, in one registry: its name, its owner and how long values live.

A bucket is private to its owner role (the permission generator grants no one else any access to it);
the operator's provisioning makes them (`shared/provision.py`). Code names buckets through these constants,
never by literal.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.identity import Role

__all__ = ["ATTEST_CHALLENGES", "ATTEST_EKS", "ATTEST_NODES", "BUCKETS", "JOIN_INVITES", "KEYS", "MEMBERS", "NODES",
           "PENDING_JOBS", "BucketSpec"]


@dataclass(frozen=True)
class BucketSpec:
    owner: Role  # the only identity that may read or write it
    max_age_s: float  # 0: values never expire
    holds: str


NODES = "qvm_nodes"
PENDING_JOBS = "qvm_jobs"
ATTEST_CHALLENGES = "qvm_attest_challenges"
ATTEST_NODES = "qvm_attest_nodes"
ATTEST_EKS = "qvm_attest_eks"
KEYS = "qvm_keys"
JOIN_INVITES = "qvm_join_invites"
MEMBERS = "qvm_members"

BUCKETS: dict[str, BucketSpec] = {
    NODES: BucketSpec(Role.SCHEDULER, 0.0, "the node registry with free capacity and claims"),
    PENDING_JOBS: BucketSpec(Role.SCHEDULER, 0.0, "jobs waiting for capacity"),
    ATTEST_CHALLENGES: BucketSpec(Role.ATTESTATION_VERIFIER, 3600.0, "single-use challenges (expire on their own)"),
    ATTEST_NODES: BucketSpec(Role.ATTESTATION_VERIFIER, 0.0, "enrolled AKs, boot counters, revocations"),
    ATTEST_EKS: BucketSpec(Role.ATTESTATION_VERIFIER, 0.0, "EK fingerprint -> node (one EK, one node)"),
    KEYS: BucketSpec(Role.KEY_BROKER, 0.0, "wrapped (never plaintext) job keys and their holder; revoked nodes"),
    JOIN_INVITES: BucketSpec(Role.ADMIN, 7 * 86400.0, "join invitations, by the SHA-256 of their token (never the "
                             "token): node id, expiry, use"),
    MEMBERS: BucketSpec(Role.ADMIN, 0.0, "joined nodes: EK fingerprint, certificate serials, WireGuard peer, "
                        "withdrawal"),
}
