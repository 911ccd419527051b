"""The join token: what the operator hands a hoster, out of band, to let one node join once.

    qvmjoin1.<node id>.<CA fingerprint>.<secret>

The node id says which identity the token may be used for; the CA fingerprint (SHA-256 of the CA's DER,
base64url) lets the joining node trust the control plane's TLS certificate without anything copied
beforehand (it fetches the CA, checks the fingerprint, then talks TLS verified by it); the secret is 32
random bytes (base64url) of which the control plane keeps only the SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass

from shared.identity import NODE_ID_PATTERN

__all__ = ["JoinToken", "ca_fingerprint"]

PREFIX = "qvmjoin1"
_NODE_RE = re.compile(NODE_ID_PATTERN)
_B64_32 = re.compile(r"^[A-Za-z0-9_-]{43}$")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def ca_fingerprint(ca_der: bytes) -> str:
    """SHA-256 of the CA certificate (DER), base64url: what a token pins."""
    return _b64(hashlib.sha256(ca_der).digest())


@dataclass(frozen=True)
class JoinToken:
    node_id: str
    ca_fingerprint: str
    secret: str

    @classmethod
    def new(cls, node_id: str, ca_der: bytes) -> JoinToken:
        if not _NODE_RE.fullmatch(node_id):
            raise ValueError(f"invalid node id {node_id[:80]!r}: lower-case letters, digits and '-'")
        return cls(node_id, ca_fingerprint(ca_der), _b64(secrets.token_bytes(32)))

    def __str__(self) -> str:
        return f"{PREFIX}.{self.node_id}.{self.ca_fingerprint}.{self.secret}"

    @property
    def digest(self) -> str:
        """What the control plane stores and looks the token up by (never the token itself)."""
        return hashlib.sha256(_unb64(self.secret)).hexdigest()

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """Raises ValueError saying what is wrong (never echoing the secret)."""
        parts = text.strip().split(".")
        if len(text) > 256 or len(parts) != 4 or parts[0] != PREFIX:
            raise ValueError(f"not a qvm join token (expected {PREFIX}.<node>.<ca>.<secret>)")
        _, node_id, fingerprint, secret = parts
        if not _NODE_RE.fullmatch(node_id):
            raise ValueError("the token's node id is invalid")
        if not (_B64_32.fullmatch(fingerprint) and _B64_32.fullmatch(secret)):
            raise ValueError("the token's CA fingerprint or secret is malformed")
        return cls(node_id, fingerprint, secret)
