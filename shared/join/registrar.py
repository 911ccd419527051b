"""The control plane's registrar: admits invited nodes whose TPM proves itself, and withdraws nodes.

decide  a join is admitted only when, in order: the token is ours (CA fingerprint), names this node, and
        its invitation is unused and unexpired; both CSRs are well-formed, self-signed, of the right key
        type and name exactly this node's identity; the EK certificate chains to a trusted TPM vendor CA
        and is for the EK presented; the AK is a restricted signing key; no other node joined with this
        EK; no member holds this node id. Then a credential (TPM2_MakeCredential, `shared.tpm.credential`)
        that only the TPM holding that EK can activate, for that AK.
act     on the activated secret: the invitation is redeemed (compare-and-set: once), the certificates are
        issued from the CSRs (the private keys never left the node), the member is recorded, its
        WireGuard peer added, and the NATS authorization regenerated and reloaded (`grant`): the node's
        user exists from then on, with its own node id only, without restarting NATS or any service.
emit    `node.revoked` when a node is withdrawn (its NATS user removed and reloaded first, so its
        certificate is useless at once); the verifier then withdraws its trust, the janitor fails its jobs
        with teardown and the key-broker destroys their keys.

Why a NATS config reload rather than auth callout: the permissions are already generated as static config
from the catalogue and tested as such (tests/integration/test_permissions.py); a reload keeps that one
representation, changes nothing for connected clients except removed users (whose connections the
server closes), and adds no always-on service that every connection would depend on (with auth callout,
the callout service down means nobody can connect). What it costs: each server in a cluster must be
reloaded, and the config lists every node (fine for thousands).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import Field

from shared.errors import PkiError
from shared.identity import Identity, NodeId, Role
from shared.join.invites import JoinRefused, check_invite, redeem_invite
from shared.join.protocol import JoinChallenge, JoinGrant, JoinProof, JoinRequest, WireGuardGrant, Withdrawn
from shared.join.token import JoinToken, ca_fingerprint
from shared.kv import Kv, Stale
from shared.models import Frozen
from shared.pki import Pki, check_csr
from shared.telemetry import get_logger
from shared.tpm.credential import make_credential
from shared.tpm.ek import check_ek_certificate
from shared.tpm.quote import QuoteError, check_ak
from shared.tpm.structures import PublicArea, TpmFormatError, parse_public

__all__ = ["Member", "Registrar", "Tunnel"]

log = get_logger("qvm.join")


class Member(Frozen):
    """A joined node, as the operator's MEMBERS bucket keeps it."""

    node_id: NodeId
    ek_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tls_serial: str = Field(max_length=64)
    sign_serial: str = Field(max_length=64)
    wg_public_key: str = Field("", max_length=64)
    wg_address: str = Field("", max_length=64)
    joined_ns: int = Field(ge=0)
    withdrawn_ns: int = Field(0, ge=0)
    withdrawn_reason: str = Field("", max_length=64)


class Tunnel(Protocol):
    """The control plane's end of the WireGuard tunnels (`shared.join.tunnel.WireGuardHub`)."""

    def add_peer(self, public_key: str, taken: Iterable[str]) -> WireGuardGrant:
        """Add the node as a peer at an address not in `taken`; what the node needs to set up its end."""
        ...

    def restore(self, public_key: str, node_address: str) -> None:
        """Re-add a member's peer at its recorded address (the control plane restarted)."""
        ...

    def remove_peer(self, public_key: str) -> None: ...


@dataclass
class _Session:
    """A join between its challenge and its proof (in memory: a lost session means joining again)."""

    token: JoinToken
    request: JoinRequest
    tls_csr: x509.CertificateSigningRequest
    sign_csr: x509.CertificateSigningRequest
    ek_sha256: str
    secret: bytes
    expires_ns: int


@dataclass
class Registrar:
    pki: Pki
    invites: Kv
    members: Kv
    grant: Callable[[], Awaitable[None]]  # regenerate the NATS authorization and reload it (waits until done)
    publish_withdrawal: Callable[[str, str, str, int], Awaitable[None]]  # node id, reason, detail, time
    nats_url: str  # what nodes dial (the WireGuard address when tunnelled)
    ek_cas: list[x509.Certificate]
    require_ek_certificate: bool = True
    tunnel: Tunnel | None = None
    session_ttl_s: float = 120.0
    _sessions: dict[str, _Session] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # ================================================================ join, step 1: the checks and a credential
    async def begin(self, req: JoinRequest) -> JoinChallenge:
        token = self._token(req)
        await check_invite(self.invites, token)
        ident = Identity(Role.NODE_AGENT, req.node_id)
        try:
            tls_csr = check_csr(req.tls_csr, ident, ec.EllipticCurvePublicKey)
            sign_csr = check_csr(req.sign_csr, ident, ed25519.Ed25519PublicKey)
        except PkiError as exc:
            reason = "csr_wrong_identity" if "names" in str(exc) else "csr_invalid"
            raise JoinRefused(reason, str(exc)) from None
        ek, ak = await asyncio.to_thread(self._check_tpm, req)
        ek_sha256 = hashlib.sha256(ek.raw).hexdigest()
        await self._check_unique(req.node_id, ek_sha256)
        secret = os.urandom(32)
        blob, encrypted = await asyncio.to_thread(make_credential, ek, ak.name, secret)
        session = secrets.token_hex(16)
        expires = time.time_ns() + int(self.session_ttl_s * 1e9)
        self._prune()
        self._sessions[session] = _Session(token, req, tls_csr, sign_csr, ek_sha256, secret, expires)
        log.info("join challenged", extra={"node_id": req.node_id, "ek": ek_sha256[:16]})
        return JoinChallenge(session=session, credential_blob=blob.hex(), encrypted_secret=encrypted.hex(),
                             expires_ns=expires)

    def _token(self, req: JoinRequest) -> JoinToken:
        try:
            token = JoinToken.parse(req.token)
        except ValueError as exc:
            raise JoinRefused("token_invalid", str(exc)) from None
        if not hmac.compare_digest(token.ca_fingerprint, ca_fingerprint(self.pki.ca_der)):
            raise JoinRefused("token_foreign", "the token was not issued by this control plane's CA")
        if token.node_id != req.node_id:
            raise JoinRefused("token_node_mismatch", f"the token is for node {token.node_id}, not {req.node_id}")
        return token

    def _check_tpm(self, req: JoinRequest) -> tuple[PublicArea, PublicArea]:
        try:
            ek = parse_public(bytes.fromhex(req.ek_public))
            ak = parse_public(bytes.fromhex(req.ak_public))
            check_ak(ak)
            if req.ek_certificate:
                if not self.ek_cas:
                    raise QuoteError("ek_certificate_invalid", "no TPM vendor CA is configured to check it")
                check_ek_certificate(bytes.fromhex(req.ek_certificate), ek, self.ek_cas)
            elif self.require_ek_certificate:
                raise QuoteError("ek_certificate_missing", "the TPM presented no EK certificate")
        except (TpmFormatError, QuoteError) as exc:
            raise JoinRefused(exc.reason, exc.detail) from None
        return ek, ak

    async def _check_unique(self, node_id: str, ek_sha256: str) -> None:
        for member in await self._members():
            if member.withdrawn_ns:
                continue
            if member.node_id == node_id:
                raise JoinRefused("node_exists", f"node {node_id} is a member: revoke it before it joins again")
            if member.ek_sha256 == ek_sha256:
                raise JoinRefused("ek_reused", f"this TPM joined as node {member.node_id} already")
        if self.pki.identity_dir(Identity(Role.NODE_AGENT, node_id)).exists():
            raise JoinRefused("node_exists", f"node {node_id} has an identity: revoke it before it joins again")

    def _prune(self) -> None:
        now = time.time_ns()
        for key in [k for k, s in self._sessions.items() if s.expires_ns < now]:
            del self._sessions[key]

    # ================================================================ join, step 2: the proof, then the grant
    async def finish(self, proof: JoinProof) -> JoinGrant:
        session = self._sessions.pop(proof.session, None)
        if session is None or session.expires_ns < time.time_ns():
            raise JoinRefused("session_unknown", "no join in progress with this session (expired?): join again")
        if not hmac.compare_digest(bytes.fromhex(proof.secret), session.secret):
            raise JoinRefused("activation_failed", "the TPM did not recover the credential: not the TPM of that EK")
        async with self._lock:  # one grant at a time: identities, members and the NATS config change together
            await self._check_unique(session.request.node_id, session.ek_sha256)
            await redeem_invite(self.invites, session.token)
            return await self._admit(session)

    async def _admit(self, session: _Session) -> JoinGrant:
        req = session.request
        ident = Identity(Role.NODE_AGENT, req.node_id)
        tls, sign = await asyncio.to_thread(self.pki.issue_from_csrs, ident, session.tls_csr, session.sign_csr)
        wg = None
        if req.wg_public_key and self.tunnel is not None:
            taken = [m.wg_address for m in await self._members() if m.wg_address and not m.withdrawn_ns]
            wg = await asyncio.to_thread(self.tunnel.add_peer, req.wg_public_key, taken)
        member = Member(node_id=req.node_id, ek_sha256=session.ek_sha256, tls_serial=f"{tls.serial_number:x}",
                        sign_serial=f"{sign.serial_number:x}", wg_public_key=req.wg_public_key if wg else "",
                        wg_address=wg.node_address if wg else "", joined_ns=time.time_ns())
        await self.members.put(req.node_id, member)
        await self.grant()
        log.info("node joined", extra={"node_id": req.node_id, "tunnel": bool(wg)})
        return JoinGrant(
            node_id=req.node_id, tls_certificate=tls.public_bytes(serialization.Encoding.PEM).decode(),
            sign_certificate=sign.public_bytes(serialization.Encoding.PEM).decode(),
            ca_certificate=self.pki.ca_cert.read_text(), trust_bundle=self._service_bundle(),
            nats_url=self.nats_url, wireguard=wg)

    def _service_bundle(self) -> str:
        """The signing certificates of the platform's services (what a node checks events against)."""
        parts = []
        for ident in self.pki.identities():
            path = self.pki.identity_dir(ident) / "sign.pem"
            if ident.role is not Role.NODE_AGENT and path.exists():
                parts.append(path.read_text())
        return "".join(parts)

    async def _members(self) -> list[Member]:
        out = []
        for key in await self.members.keys():
            member, _, _ = await self.members.get(key, Member)
            if isinstance(member, Member):
                out.append(member)
        return out

    async def restore_tunnels(self) -> int:
        """Every current member's WireGuard peer, as recorded (a restarted control plane's interface is new)."""
        if self.tunnel is None:
            return 0
        members = [m for m in await self._members() if m.wg_public_key and not m.withdrawn_ns]
        for m in members:
            await asyncio.to_thread(self.tunnel.restore, m.wg_public_key, m.wg_address)
        return len(members)

    # ================================================================ withdrawal
    async def leave(self, identity: str, tls_serial: int) -> Withdrawn:
        """The node itself leaves (uninstall), proven by its current TLS client certificate."""
        ident = Identity.parse(identity)
        if ident.role is not Role.NODE_AGENT or ident.node_id is None:
            raise JoinRefused("not_a_node", "only a node may leave")
        member, _, _ = await self.members.get(ident.node_id, Member)
        if isinstance(member, Member) and member.tls_serial != f"{tls_serial:x}":
            raise JoinRefused("certificate_superseded", "this certificate is not the node's current one")
        return await self.withdraw(ident.node_id, "node_left", "the hoster uninstalled the node")

    async def withdraw(self, node_id: str, reason: str, detail: str) -> Withdrawn:
        """Cut the node off the bus at once (its NATS user goes, the server reloads and closes its
        connections), remove its tunnel, then announce it (`node.revoked`). Idempotent."""
        ident = Identity(Role.NODE_AGENT, node_id)
        now = time.time_ns()
        async with self._lock:
            member: Member | None = None
            for _ in range(5):
                found, revision, _ = await self.members.get(node_id, Member)
                member = found if isinstance(found, Member) else None
                if member is None or member.withdrawn_ns:
                    break
                with contextlib.suppress(Stale):
                    await self.members.update(node_id, member.model_copy(update={
                        "withdrawn_ns": now, "withdrawn_reason": reason}), revision)
                    break
            had_identity = await asyncio.to_thread(self.pki.withdraw, ident)
            if had_identity:
                await self.grant()
            if member is not None and member.wg_public_key and self.tunnel is not None:
                await asyncio.to_thread(self.tunnel.remove_peer, member.wg_public_key)
        was_member = had_identity or member is not None
        when = member.withdrawn_ns if member is not None and member.withdrawn_ns else now
        if was_member:  # again on a repeat: the event id derives from (node, time), so it is stored once
            await self.publish_withdrawal(node_id, reason, detail, when)
            log.warning("node withdrawn", extra={"node_id": node_id, "reason": reason})
        already = not had_identity and member is not None and bool(member.withdrawn_ns)
        return Withdrawn(node_id=node_id, withdrawn_ns=when, was_member=was_member, already=already)
