"""The join protocol's messages (JSON over HTTPS), each checked strictly: everything a joining node sends is
untrusted until its TPM answered.

    GET  /ca              the CA certificate (the node checks it against the token's fingerprint)
    POST /join            JoinRequest  -> JoinChallenge  (token, CSRs and TPM keys checked; a credential
                                                          only the node's TPM can activate)
    POST /join/proof      JoinProof    -> JoinGrant      (the activated secret: certificates issued, the
                                                          bus identity granted, the WireGuard peer added)
    POST /leave           (TLS client certificate of the node) -> Withdrawn  (the hoster's uninstall)
    POST /revoke          RevokeRequest, TLS client certificate of the operator -> Withdrawn
Refusals are HTTP 4xx with a `Refusal` body: a stable reason code and a sentence.
"""

from __future__ import annotations

from pydantic import Field

from shared.identity import NodeId
from shared.models import Frozen

__all__ = ["JoinChallenge", "JoinGrant", "JoinProof", "JoinRequest", "Refusal", "RevokeRequest", "WireGuardGrant",
           "Withdrawn"]

_HEX = r"^[0-9a-f]*$"
_PEM_CSR = r"^-----BEGIN CERTIFICATE REQUEST-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE REQUEST-----\s*$"


class JoinRequest(Frozen):
    token: str = Field(max_length=256)
    node_id: NodeId
    tls_csr: str = Field(max_length=4096, pattern=_PEM_CSR, description="P-256 key, SAN = the node's identity.")
    sign_csr: str = Field(max_length=4096, pattern=_PEM_CSR, description="Ed25519 key, SAN = the node's identity.")
    ek_public: str = Field(max_length=2048, pattern=_HEX, description="TPM2B_PUBLIC of the EK.")
    ek_certificate: str = Field("", max_length=8192, pattern=_HEX, description="DER, from the TPM's NV.")
    ak_public: str = Field(max_length=2048, pattern=_HEX, description="TPM2B_PUBLIC of a fresh AK.")
    wg_public_key: str = Field("", max_length=64, description="The node's WireGuard key (base64), if it tunnels.")


class JoinChallenge(Frozen):
    session: str = Field(pattern=r"^[0-9a-f]{32}$")
    credential_blob: str = Field(max_length=4096, pattern=_HEX)
    encrypted_secret: str = Field(max_length=4096, pattern=_HEX)
    expires_ns: int = Field(ge=0)


class JoinProof(Frozen):
    session: str = Field(pattern=r"^[0-9a-f]{32}$")
    secret: str = Field(max_length=128, pattern=_HEX)


class WireGuardGrant(Frozen):
    server_public_key: str = Field(max_length=64)
    endpoint: str = Field(max_length=256, description="host:port of the control plane's WireGuard.")
    node_address: str = Field(max_length=64, description="The node's tunnel address (CIDR).")
    server_address: str = Field(max_length=64, description="The control plane's tunnel address.")


class JoinGrant(Frozen):
    node_id: NodeId
    tls_certificate: str = Field(max_length=8192)
    sign_certificate: str = Field(max_length=8192)
    ca_certificate: str = Field(max_length=8192)
    trust_bundle: str = Field(max_length=1 << 20, description="The platform services' signing certificates.")
    nats_url: str = Field(max_length=512)
    wireguard: WireGuardGrant | None = None


class RevokeRequest(Frozen):
    node_id: NodeId
    reason: str = Field("operator_revoked", max_length=64, pattern=r"^[a-z_]+$")
    detail: str = Field("", max_length=1024)


class Withdrawn(Frozen):
    node_id: NodeId
    withdrawn_ns: int = Field(ge=0)
    was_member: bool
    already: bool = Field(False, description="It had been withdrawn before (this request changed nothing).")


class Refusal(Frozen):
    reason: str = Field(max_length=64)
    detail: str = Field("", max_length=1024)
