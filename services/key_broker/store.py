"""The key-broker's state, in its own JetStream KV bucket (`qvm_keys`), so any replica takes any message.

    job.<job_id>    JobKeys: the job's volume key wrapped under a KEK (never in the clear), the release
                    policy, the instance keys its node announced, who holds the key, which attestation
                    results and challenges were already spent, and whether the key was destroyed
    node.<node_id>  NodeRevocation: when the node lost its trust (results verified before that count for nothing)

Nothing the store removes is gone until it is erased (`shared.kv`): the bucket is erasable (message deletes
allowed, 64 revisions per key, so the server never drops a superseded revision itself). Superseded
revisions that hold the same wrapped copy wait for the destruction (an erase is a synchronous overwrite in
the store, kept off the release path); a rewrap under a new KEK erases every copy under the old one at once.
Destroying a key writes a tombstone (no wrapped copy), erases every stored revision before it,
checks none is left, and only then publishes `key.destroyed`; the tombstone keeps what that evidence says
(so a redelivery or a second replica publishes the same evidence once).
"""

from __future__ import annotations

from pydantic import Field

from shared.buckets import KEYS
from shared.events import KeyReleasePolicy
from shared.models import Frozen, SecurityLevel

__all__ = ["BUCKET", "JobKeys", "NodeRevocation", "job_key", "node_key"]

BUCKET = KEYS
MAX_SPENT = 64  # results/challenges remembered per job (a job sees a handful of attestations)


def job_key(job_id: str) -> str:
    return f"job.{job_id}"


def node_key(node_id: str) -> str:
    return f"node.{node_id}"


class JobKeys(Frozen):
    job_id: str
    submitted_id: str = Field(description="The job.submitted event id (ids of the broker's events derive from it).")
    policy: KeyReleasePolicy
    security: SecurityLevel
    wrapped: str = Field("", description="The wrapped volume key (hex); empty once destroyed.")
    kek_version: int = 0
    wrapped_sha256: str = ""
    node_id: str = ""
    instance_keys: dict[str, str] = Field(default_factory=dict, description="Instance id -> announced public key.")
    holder: str = Field("", description="The instance the key is released to (one at a time).")
    spent_results: dict[str, int] = Field(default_factory=dict, description="Result event id -> stream sequence "
                                                                            "it was used at.")
    spent_challenges: tuple[str, ...] = ()
    plaintext_buffers_zeroed: int = 0
    destroyed: bool = False
    destroyed_reason: str = ""
    destroyed_ns: int = 0
    wrapped_revisions: tuple[int, ...] = Field((), description="Once destroyed: the store revisions of this record "
                                                              "that still held the wrapped key (all erased before "
                                                              "key.destroyed is published).")
    destruction_reported: bool = Field(False, description="key.destroyed was published.")


class NodeRevocation(Frozen):
    node_id: str
    revoked_ns: int
    reason: str = ""
