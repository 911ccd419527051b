"""Development PKI: one CA, a TLS server certificate, and per identity a TLS client certificate and an
Ed25519 event-signing certificate.

The TLS client certificate's SAN (DNS) is the identity; NATS maps it to a user (`verify_and_map`), so the
bus knows who is connected without passwords. The Ed25519 signing certificate binds an identity to the
key that signs its events; consumers only trust signing keys whose certificate our CA issued (the trust
bundle). Private keys are written 0600 and never leave their owner's directory.

Layout under the PKI directory:
    ca.pem, ca-key.pem, server.pem, server-key.pem, trust-bundle.pem
    identities/<identity>/{tls.pem, tls-key.pem, sign.pem, sign-key.pem}
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import PkiError
from shared.identity import SERVICE_ROLES, Identity, Role

__all__ = [
    "DEFAULT_IDENTITIES",
    "Pki",
    "Signer",
    "TrustBundle",
    "check_csr",
    "make_csr",
    "signing_key_digest",
    "write_private",
]

VALIDITY = dt.timedelta(days=825)
DEFAULT_IDENTITIES: tuple[Identity, ...] = tuple(
    Identity(r) for r in (*SERVICE_ROLES, Role.MARKETPLACE, Role.ADMIN) if r is not Role.NODE_AGENT
)


@dataclass(frozen=True)
class Signer:
    """An identity and the private key that signs its events (held in memory).

    `certificate` (DER) travels with every event the identity signs when set: node-agents join while the
    platform runs, so the services that check their events cannot have their keys in a bundle loaded at
    start; the CA's signature on the certificate is what they check instead (`TrustBundle.key_from`)."""

    identity: Identity
    key: ed25519.Ed25519PrivateKey
    certificate: bytes | None = None

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def signing_key_digest(key: ed25519.Ed25519PublicKey) -> bytes:
    """SHA-256 of an identity's raw Ed25519 signing key: what a node's TPM enrollment and node quotes bind,
    tying the TPM to the node's identity on the bus."""
    return hashlib.sha256(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).digest()


class TrustBundle:
    """Signing keys of every identity our CA vouches for, looked up by identity string.

    The bundle loaded at start holds the platform's services (and nodes issued before it); a node that
    joined later is known from the certificate its events carry (`key_from`), checked against the CA once
    and remembered, so `key_for` answers for it afterwards too."""

    def __init__(self, keys: dict[str, ed25519.Ed25519PublicKey], ca: x509.Certificate | None = None) -> None:
        self._keys = keys
        self._ca = ca
        self._checked: dict[bytes, tuple[str, ed25519.Ed25519PublicKey]] = {}

    def key_for(self, identity: str) -> ed25519.Ed25519PublicKey | None:
        return self._keys.get(identity)

    def key_from(self, identity: str, certificate: bytes) -> ed25519.Ed25519PublicKey:
        """The signing key in `certificate` (DER) if our CA issued it for `identity` and it is valid now;
        raises `PkiError` otherwise. Checked certificates are cached by content."""
        cached = self._checked.get(certificate)
        if cached is None:
            if self._ca is None:
                raise PkiError("no CA to check a presented certificate against")
            if len(certificate) > 4096:
                raise PkiError("presented certificate is too large")
            try:
                cert = x509.load_der_x509_certificate(certificate)
            except ValueError:
                raise PkiError("presented certificate is not DER") from None
            try:
                key = _check_signing_cert(cert, self._ca, dt.datetime.now(dt.UTC))
                named = _identity_of(cert)
            except (ValueError, x509.ExtensionNotFound) as exc:
                raise PkiError(f"presented certificate is not a qvm identity: {str(exc)[:200]}") from None
            if len(self._checked) > 65536:  # bounded: a flood of distinct certificates cannot grow it
                self._checked.clear()
            cached = self._checked[certificate] = (named, key)
        named, key = cached
        if named != identity:
            raise PkiError(f"the presented certificate names {named}, not {identity[:128]}")
        self._keys[identity] = key  # the node's current key (a re-joined node replaces its old one)
        return key

    def identities(self) -> list[str]:
        return sorted(self._keys)

    @classmethod
    def load(cls, bundle_pem: bytes, ca_pem: bytes, *, now: dt.datetime | None = None) -> TrustBundle:
        """Load signing certificates, keeping only Ed25519 ones issued by the CA and valid now."""
        ca = x509.load_pem_x509_certificate(ca_pem)
        now = now or dt.datetime.now(dt.UTC)
        keys: dict[str, ed25519.Ed25519PublicKey] = {}
        for cert in x509.load_pem_x509_certificates(bundle_pem) if bundle_pem.strip() else []:
            keys[_identity_of(cert)] = _check_signing_cert(cert, ca, now)
        return cls(keys, ca)


def _check_signing_cert(cert: x509.Certificate, ca: x509.Certificate, now: dt.datetime) -> ed25519.Ed25519PublicKey:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"signing certificate {cert.subject.rfc4514_string()[:200]} not issued by CA") from exc
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError(f"signing certificate {cert.subject.rfc4514_string()[:200]} is expired")
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PkiError("signing certificates must hold Ed25519 keys")
    return key


def _identity_of(cert: x509.Certificate) -> str:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = san.get_values_for_type(x509.DNSName)
    if len(names) != 1:
        raise PkiError("a qvm certificate names exactly one identity")
    Identity.parse(names[0])  # validates
    return names[0]


def check_csr(pem: str | bytes, ident: Identity, key_type: type[ec.EllipticCurvePublicKey] |
              type[ed25519.Ed25519PublicKey]) -> x509.CertificateSigningRequest:
    """A certificate request from untrusted hands: PEM, self-signed by its key, of the expected key type
    (P-256 for TLS), naming exactly `ident`. Raises `PkiError` saying which check failed."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        raise PkiError("the certificate request is not PEM") from None
    if not csr.is_signature_valid:
        raise PkiError("the certificate request's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, key_type) or (isinstance(key, ec.EllipticCurvePublicKey)
                                         and not isinstance(key.curve, ec.SECP256R1)):
        raise PkiError(f"the certificate request holds a {type(key).__name__}, not the expected key type")
    try:
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if names != [str(ident)]:
        raise PkiError(f"the certificate request names {', '.join(names)[:200] or 'nothing'}, not {ident}")
    return csr


def make_csr(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, ident: Identity) -> str:
    """A certificate request for `ident` (the node's side of a join: the key never leaves the node)."""
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(ident))]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(str(ident))]), critical=False))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def _general_name(name: str) -> x509.GeneralName:
    """An IP address SAN for an address, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """A private key (or any secret) to a file only its owner may read: created 0600, never widened.
    `exclusive`: fail if the file exists (two creators racing must not both win)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Pki:
    """A PKI directory: create it, issue identities, and load what services need."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # ---- paths
    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server-key.pem"

    @property
    def trust_bundle(self) -> Path:
        return self.root / "trust-bundle.pem"

    @property
    def ca_der(self) -> bytes:
        """The CA certificate, DER: what a join token's fingerprint is taken over."""
        return x509.load_pem_x509_certificate(self.ca_cert.read_bytes()).public_bytes(serialization.Encoding.DER)

    def identity_dir(self, identity: Identity | str) -> Path:
        return self.root / "identities" / str(identity)

    def exists(self) -> bool:
        return self.ca_cert.exists() and (self.root / "ca-key.pem").exists()

    def identities(self) -> list[Identity]:
        base = self.root / "identities"
        if not base.is_dir():
            return []
        return sorted((Identity.parse(p.name) for p in base.iterdir() if p.is_dir()), key=str)

    # ---- creation
    def init(self, nodes: Iterable[str] = (), extra: Iterable[Identity] = (),
             server_names: Iterable[str] = ()) -> list[Identity]:
        """Create the CA and server certificate once, then issue any identity not yet issued.

        `server_names` (DNS names or IP addresses) are added to the server certificate beside localhost:
        the address nodes dial (a WireGuard address, the control plane's DNS name). The certificate is
        re-issued when a name is missing from it."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        names = list(server_names)
        if not self.exists():
            self._create_ca()
            self._issue_server(names)
        elif names and not self._names_cover(self.server_cert, names):
            self._issue_server(names)
        wanted = [*DEFAULT_IDENTITIES, *(Identity(Role.NODE_AGENT, n) for n in nodes), *extra]
        issued = [i for i in wanted if not (self.identity_dir(i) / "sign.pem").exists()]
        for ident in issued:
            self.issue(ident, write_bundle=False)
        self.write_trust_bundle()
        return issued

    def _create_ca(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qvm development CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        write_private(self.root / "ca-key.pem", _pem_key(key))
        self.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = serialization.load_pem_private_key((self.root / "ca-key.pem").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError("CA key must be ECDSA")
        return cert, key

    def _build(
        self,
        public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
        cn: str,
        san: list[x509.GeneralName],
        eku: list[x509.ObjectIdentifier] | None,
    ) -> bytes:
        ca_cert, ca_key = self._ca()
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
        )
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def server_files(self, server: str | None = None) -> tuple[Path, Path]:
        """(certificate, key) of the NATS server `server` in a cluster (`servers/<name>/`), or of the one
        server (None)."""
        if server is None:
            return self.server_cert, self.server_key
        d = self.root / "servers" / server
        return d / "server.pem", d / "server-key.pem"

    def issue_server(self, server: str, names: Iterable[str] = ()) -> tuple[Path, Path]:
        """A certificate of its own for cluster member `server`, naming it (its route host) and `names`
        beside localhost: routes verify each other's names, so one shared certificate would not do. Kept
        when it names all of them already."""
        cert, key = self.server_files(server)
        wanted = [server, *names]
        if cert.exists() and self._names_cover(cert, wanted):
            return cert, key
        cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._issue_server(wanted, cert, key)
        return cert, key

    def _names_cover(self, cert_path: Path, names: list[str]) -> bool:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = set(san.get_values_for_type(x509.DNSName)) | {str(a) for a in san.get_values_for_type(x509.IPAddress)}
        return all(str(_general_name(n).value) in have for n in names)

    def _issue_server(self, names: Iterable[str] = (), cert_path: Path | None = None,
                      key_path: Path | None = None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.DNSName("nats"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        san += [g for g in map(_general_name, names) if g not in san]
        pem = self._build(key.public_key(), "qvm nats", san, [ExtendedKeyUsageOID.SERVER_AUTH,
                                                                ExtendedKeyUsageOID.CLIENT_AUTH])
        write_private(key_path or self.server_key, _pem_key(key))
        (cert_path or self.server_cert).write_bytes(pem)

    def issue(self, ident: Identity, *, write_bundle: bool = True) -> None:
        """Issue the TLS client and Ed25519 signing certificates for one identity."""
        d = self.identity_dir(ident)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        san: list[x509.GeneralName] = [x509.DNSName(str(ident))]
        tls_key = ec.generate_private_key(ec.SECP256R1())
        tls = self._build(tls_key.public_key(), str(ident), san, [ExtendedKeyUsageOID.CLIENT_AUTH])
        sign_key = ed25519.Ed25519PrivateKey.generate()
        sign = self._build(sign_key.public_key(), str(ident), san, None)
        write_private(d / "tls-key.pem", _pem_key(tls_key))
        (d / "tls.pem").write_bytes(tls)
        write_private(d / "sign-key.pem", _pem_key(sign_key))
        (d / "sign.pem").write_bytes(sign)
        if write_bundle:
            self.write_trust_bundle()

    def issue_from_csrs(self, ident: Identity, tls_csr: x509.CertificateSigningRequest,
                        sign_csr: x509.CertificateSigningRequest) -> tuple[x509.Certificate, x509.Certificate]:
        """Issue `ident`'s TLS (P-256) and signing (Ed25519) certificates for keys made elsewhere (a joining
        node keeps its private keys). Only the certificates are stored here, which is what the NATS config
        (a user per identity directory) and the trust bundle are made from. The CSRs must be checked first
        (`check_csr`)."""
        d = self.identity_dir(ident)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        san: list[x509.GeneralName] = [x509.DNSName(str(ident))]
        tls_key, sign_key = tls_csr.public_key(), sign_csr.public_key()
        if not isinstance(tls_key, ec.EllipticCurvePublicKey) or not isinstance(sign_key, ed25519.Ed25519PublicKey):
            raise PkiError("a node's TLS key is ECDSA P-256 and its signing key Ed25519")
        tls = self._build(tls_key, str(ident), san, [ExtendedKeyUsageOID.CLIENT_AUTH])
        sign = self._build(sign_key, str(ident), san, None)
        (d / "tls.pem").write_bytes(tls)
        (d / "sign.pem").write_bytes(sign)
        self.write_trust_bundle()
        return x509.load_pem_x509_certificate(tls), x509.load_pem_x509_certificate(sign)

    def withdraw(self, ident: Identity) -> bool:
        """Move `ident`'s certificates out of the identities (into `withdrawn/`): the next NATS config has no
        user for it, so its TLS certificate maps to no one. False when it was not there."""
        d = self.identity_dir(ident)
        if not d.is_dir():
            return False
        gone = self.root / "withdrawn"
        gone.mkdir(exist_ok=True, mode=0o700)
        d.rename(gone / f"{ident}.{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}")
        self.write_trust_bundle()
        return True

    def write_trust_bundle(self) -> None:
        certs = [self.identity_dir(i) / "sign.pem" for i in self.identities()]
        self.trust_bundle.write_bytes(b"".join(p.read_bytes() for p in certs if p.exists()))

    # ---- loading
    def signer(self, ident: Identity) -> Signer:
        path = self.identity_dir(ident) / "sign-key.pem"
        if not path.exists():
            raise PkiError(f"no signing key for {ident} under {self.root} (run `qvm pki init`)")
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise PkiError(f"signing key of {ident} is not Ed25519")
        cert = None
        if ident.role is Role.NODE_AGENT:  # nodes join while the platform runs: their events carry the cert
            cert = x509.load_pem_x509_certificate((path.parent / "sign.pem").read_bytes()).public_bytes(
                serialization.Encoding.DER)
        return Signer(ident, key, cert)

    def load_trust(self) -> TrustBundle:
        if not self.trust_bundle.exists() or not self.ca_cert.exists():
            raise PkiError(f"no trust bundle under {self.root} (run `qvm pki init`)")
        return TrustBundle.load(self.trust_bundle.read_bytes(), self.ca_cert.read_bytes())

    def tls_files(self, ident: Identity) -> tuple[Path, Path]:
        d = self.identity_dir(ident)
        if not (d / "tls.pem").exists():
            raise PkiError(f"no TLS client certificate for {ident} under {self.root}")
        return d / "tls.pem", d / "tls-key.pem"
