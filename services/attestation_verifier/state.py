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

import msgpack
from nats.js.errors import KeyDeletedError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import Field, ValidationError

from shared.bus import map_nats_errors
from shared.events import AttestPurpose
from shared.models import Frozen

__all__ = ["BUCKETS", "Challenge", "Kv", "NodeAttestation", "Stale"]

BUCKETS = ("qvm_attest_challenges", "qvm_attest_nodes", "qvm_attest_eks")


class Stale(Exception):
    """A compare-and-set lost to another writer."""


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


def _pack(model: Frozen) -> bytes:
    out: bytes = msgpack.packb(model.model_dump(mode="json"), use_bin_type=True)
    return out


class Kv:
    """Typed get / create / compare-and-set over one bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, key: str, model: type[Frozen]) -> tuple[Frozen | None, int, bool]:
        """(value, revision, deleted). A value that does not decode reads as absent."""
        with map_nats_errors(f"kv get {key}"):
            try:
                entry = await self.kv.get(key)
            except KeyDeletedError:
                return None, 0, True
            except NotFoundError:
                return None, 0, False
        try:
            return model.model_validate(msgpack.unpackb(entry.value or b"", raw=False)), entry.revision or 0, False
        except (ValueError, TypeError, ValidationError, msgpack.UnpackException):
            return None, entry.revision or 0, False

    async def create(self, key: str, value: Frozen) -> bool:
        """Store only if absent; False when the key exists."""
        with map_nats_errors(f"kv create {key}"):
            try:
                await self.kv.create(key, _pack(value))
                return True
            except KeyWrongLastSequenceError:
                return False

    async def update(self, key: str, value: Frozen, revision: int) -> None:
        """Compare-and-set; raises `Stale` when another writer changed the key first."""
        with map_nats_errors(f"kv update {key}"):
            try:
                if revision:
                    await self.kv.update(key, _pack(value), last=revision)
                else:
                    await self.kv.create(key, _pack(value))
            except KeyWrongLastSequenceError:
                raise Stale(key) from None

    async def keys(self) -> list[str]:
        with map_nats_errors("kv keys"):
            try:
                return list(await self.kv.keys())
            except (NoKeysError, NotFoundError):
                return []
