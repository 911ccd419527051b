"""The node's side of a join (`qvm node join`), and of leaving (`qvm node uninstall`).

Keys are made here and stay here: a P-256 TLS key and an Ed25519 signing key (only their CSRs travel), the
TPM's AK (re-derived inside the TPM) and a WireGuard key when the node tunnels. They are written (0600,
under `<etc>/pki`) only once the control plane granted the join, next to the certificates it issued; a
refused join leaves nothing behind.

Trust in the control plane comes from the token: its CA fingerprint pins the CA fetched from `/ca`, which
then verifies the control plane's TLS certificate (host name included) for every other request.
"""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import BaseModel, ValidationError

from shared.identity import Identity, Role
from shared.join.invites import JoinRefused
from shared.join.protocol import JoinChallenge, JoinGrant, JoinProof, JoinRequest, Refusal, RevokeRequest, Withdrawn
from shared.join.token import JoinToken, ca_fingerprint
from shared.join.tunnel import new_node_key, save_node_tunnel
from shared.pki import Pki, make_csr, write_private

__all__ = ["JoinResult", "fetch_ca", "join", "leave", "read_env", "revoke", "write_env"]

TIMEOUT_S = 30.0


@dataclass(frozen=True)
class JoinResult:
    node_id: str
    nats_url: str
    pki_dir: Path
    env_file: Path
    wireguard: bool


# ---------------------------------------------------------------- the env file the node-agent's unit reads

def read_env(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.lstrip().startswith("#"):
            out[key.strip()] = value.strip()
    return out


def write_env(path: Path, updates: dict[str, str]) -> None:
    """Merge `updates` into a KEY=VALUE file (what systemd's EnvironmentFile reads), keeping other keys."""
    values = {**read_env(path), **updates}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in sorted(values.items())))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ---------------------------------------------------------------- HTTPS with the pinned CA

def fetch_ca(control_plane: str, fingerprint: str) -> bytes:
    """The control plane's CA (PEM), accepted only if its SHA-256 is the token's fingerprint."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nothing to verify with yet: the fingerprint check below is the trust
    pem = _request(ctx, control_plane, "/ca", None)
    try:
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise JoinRefused("ca_invalid", "the control plane's /ca is not a certificate") from None
    if ca_fingerprint(der) != fingerprint:
        raise JoinRefused("ca_mismatch", "the control plane's CA is not the one the token names: wrong URL, "
                                         "or someone in between")
    return pem


def _context(ca_pem: bytes, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client:
        ctx.load_cert_chain(*client)
    return ctx


def _request(ctx: ssl.SSLContext, base: str, path: str, body: BaseModel | None) -> bytes:
    data = body.model_dump_json().encode() if body is not None else None
    req = urllib.request.Request(base.rstrip("/") + path, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=TIMEOUT_S) as resp:
            return bytes(resp.read(1 << 21))
    except urllib.error.HTTPError as exc:
        raw = exc.read(8192)
        try:
            refusal = Refusal.model_validate_json(raw)
        except ValidationError:
            raise JoinRefused("http_error", f"{path}: HTTP {exc.code}") from None
        raise JoinRefused(refusal.reason, refusal.detail) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JoinRefused("unreachable", f"{base}: {reason}") from None


M = TypeVar("M", bound=BaseModel)


def _post(ctx: ssl.SSLContext, base: str, path: str, body: BaseModel, answer: type[M]) -> M:
    raw = _request(ctx, base, path, body)
    try:
        return answer.model_validate_json(raw)
    except ValidationError:
        raise JoinRefused("bad_answer", f"the control plane's answer to {path} is not a {answer.__name__}") from None


# ---------------------------------------------------------------- join

def join(token: str, control_plane: str, etc_dir: Path, tpm: str, *, ak_algorithm: str = "ecc-p256",
         tunnel: bool = True) -> tuple[JoinResult, JoinGrant]:
    """Join this node. Raises `JoinRefused` (reason, sentence) on any refusal; writes nothing then.

    With `tunnel`, a WireGuard key is made and its public half offered: a control plane that runs the
    WireGuard hub grants an address and its NATS is then reached only through the tunnel."""
    from shared.tpm.device import TpmDevice  # the node's TPM (tpm2-pytss): only a joining node needs it

    try:
        parsed = JoinToken.parse(token)
    except ValueError as exc:
        raise JoinRefused("token_invalid", str(exc)) from None
    ca_pem = fetch_ca(control_plane, parsed.ca_fingerprint)
    ctx = _context(ca_pem)
    ident = Identity(Role.NODE_AGENT, parsed.node_id)
    wg_private, wg_public_key = new_node_key() if tunnel else ("", "")
    tls_key = ec.generate_private_key(ec.SECP256R1())
    sign_key = ed25519.Ed25519PrivateKey.generate()
    device = TpmDevice(tpm, ak_algorithm)
    try:
        device.load_keys()
        request = JoinRequest(token=token, node_id=parsed.node_id, tls_csr=make_csr(tls_key, ident),
                              sign_csr=make_csr(sign_key, ident), ek_public=device.ek_public.hex(),
                              ek_certificate=(device.ek_cert or b"").hex(), ak_public=device.ak_public.hex(),
                              wg_public_key=wg_public_key)
        challenge = _post(ctx, control_plane, "/join", request, JoinChallenge)
        secret = device.activate_credential(bytes.fromhex(challenge.credential_blob),
                                            bytes.fromhex(challenge.encrypted_secret))
    finally:
        device.close()
    grant = _post(ctx, control_plane, "/join/proof", JoinProof(session=challenge.session, secret=secret.hex()),
                  JoinGrant)
    if grant.node_id != parsed.node_id:
        raise JoinRefused("bad_answer", "the control plane granted another node id")
    pki_dir = etc_dir / "pki"
    _store(Pki(pki_dir), ident, grant, ca_pem, tls_key, sign_key)
    if grant.wireguard is not None and wg_private:
        save_node_tunnel(etc_dir, wg_private, grant.wireguard)
    env = etc_dir / "node.env"
    write_env(env, {"QVM_NATS_URL": grant.nats_url, "QVM_NODE_ID": parsed.node_id, "QVM_PKI_DIR": str(pki_dir),
                    "QVM_TPM": tpm, "QVM_CONTROL_PLANE": control_plane})
    return JoinResult(parsed.node_id, grant.nats_url, pki_dir, env, grant.wireguard is not None), grant


def _store(pki: Pki, ident: Identity, grant: JoinGrant, ca_pem: bytes, tls_key: ec.EllipticCurvePrivateKey,
           sign_key: ed25519.Ed25519PrivateKey) -> None:
    for pem, key in ((grant.tls_certificate, tls_key), (grant.sign_certificate, sign_key)):
        cert = x509.load_pem_x509_certificate(pem.encode())
        if cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                                          ) != key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise JoinRefused("bad_answer", "a granted certificate is not for this node's key")
    pki.root.mkdir(parents=True, exist_ok=True)
    os.chmod(pki.root, 0o700)
    pki.ca_cert.write_bytes(ca_pem)
    d = pki.identity_dir(ident)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for name, key in (("tls-key.pem", tls_key), ("sign-key.pem", sign_key)):
        write_private(d / name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    (d / "tls.pem").write_text(grant.tls_certificate)
    (d / "sign.pem").write_text(grant.sign_certificate)
    pki.trust_bundle.write_text(grant.trust_bundle + grant.sign_certificate)


# ---------------------------------------------------------------- leaving and revoking

def leave(etc_dir: Path) -> Withdrawn:
    """This node leaves the platform (its uninstall): proven by its own TLS client certificate."""
    env = read_env(etc_dir / "node.env")
    control_plane, node_id = env.get("QVM_CONTROL_PLANE"), env.get("QVM_NODE_ID")
    if not control_plane or not node_id:
        raise JoinRefused("not_joined", f"{etc_dir / 'node.env'} names no control plane and node: never joined")
    pki = Pki(Path(env.get("QVM_PKI_DIR") or etc_dir / "pki"))
    ctx = _context(pki.ca_cert.read_bytes(), pki.tls_files(Identity(Role.NODE_AGENT, node_id)))
    return _post(ctx, control_plane, "/leave", _Empty(), Withdrawn)


def revoke(control_plane: str, pki: Pki, node_id: str, reason: str = "operator_revoked", detail: str = ""
           ) -> Withdrawn:
    """The operator withdraws a node (its certificate as `admin` proves who asks)."""
    ctx = _context(pki.ca_cert.read_bytes(), pki.tls_files(Identity(Role.ADMIN)))
    return _post(ctx, control_plane, "/revoke", RevokeRequest(node_id=node_id, reason=reason, detail=detail),
                 Withdrawn)


class _Empty(BaseModel):
    pass
