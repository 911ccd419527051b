"""Workload output sealed to the client's own key (`JobSubmitted.output_key`).

The node-agent seals each chunk of a workload's output separately with HPKE (`shared.crypto.hpke`, the
suite key releases and client secrets use) to the X25519 public key the client put in its job. `info`
(`hpke.output_info`) binds the purpose ("output"), the job id, the instance id and the chunk's sequence
number, so a chunk opens only as that chunk of that instance of that job: swapped between jobs or
instances, reordered or altered, it does not open. Only the holder of the private key (the client) reads
the output; the platform, the operator and every other reader of the job stream see ciphertext.

The public digest (`instance.exited.output_sha256`) is `SealedDigest` over the sealed chunks as published,
never over the plaintext: a plaintext digest on the bus would let anyone confirm a guess of a short output,
while HPKE's fresh ephemeral key per chunk makes the sealed bytes unpredictable. The client recomputes it
from the chunks it read and so knows it has every chunk, as the node sent it, in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric import x25519

from shared.crypto import hpke

__all__ = ["SEALED_OVERHEAD", "SealedDigest", "open_chunk", "seal_chunk", "sealed_digest"]

SEALED_OVERHEAD = hpke.ENC_BYTES + hpke.TAG_BYTES  # a sealed chunk is this much longer than its plaintext


def seal_chunk(chunk: bytes | bytearray | memoryview, client_public: bytes, job_id: str, instance_id: str,
               seq: int) -> bytes:
    """`enc || ct` of one output chunk, sealed to the client's raw 32-byte X25519 key (a `CryptoError` if it
    is not a usable key)."""
    return hpke.seal(chunk, client_public, hpke.output_info(job_id, instance_id, seq))


def open_chunk(sealed: bytes, private_key: x25519.X25519PrivateKey, job_id: str, instance_id: str,
               seq: int) -> bytes:
    """The plaintext of one sealed chunk; `CryptoError("unwrap_failed")` for another key, another job,
    instance or seq, or any altered byte (the reasons are deliberately not told apart)."""
    return hpke.open_sealed(sealed, private_key, hpke.output_info(job_id, instance_id, seq))


class SealedDigest:
    """SHA-256 over sealed chunks in seq order, each as its 4-byte big-endian length then its bytes (the
    length prefix keeps chunk boundaries in the digest)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.chunks = 0

    def update(self, sealed: bytes) -> None:
        self._hash.update(len(sealed).to_bytes(4, "big"))
        self._hash.update(sealed)
        self.chunks += 1

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def sealed_digest(chunks: Iterable[bytes]) -> str:
    digest = SealedDigest()
    for sealed in chunks:
        digest.update(sealed)
    return digest.hexdigest()
