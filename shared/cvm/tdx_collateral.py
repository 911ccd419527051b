"""Intel TDX collateral, the part of a TDX quote's trust that does not come from the quote's own signatures: the
PCK certificate chain (pinned to the shipped Intel SGX Root CA, checked against Intel's CRLs), the PCK leaf's SGX
extension (FMSPC, PCE-ID, TCB components), the signed TCB info and QE identity JSON of Intel PCS, and Intel's TCB
appraisal over them. `tdx.py` orchestrates; this module never sees a whole quote.

Expensive work that depends only on bytes (certificate and CRL signatures, collateral signatures) is cached on
those exact bytes; anything that depends on the verification time is re-checked on every call, so a cached result
can never outlive its validity window."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from shared.cvm.errors import CvmError

__all__ = [
    "SGX_ROOT_CA_SHA256",
    "TCB_NOT_SUPPORTED",
    "TCB_STATUSES",
    "PckChain",
    "PckExtensions",
    "QeIdentity",
    "SignedCollateral",
    "TcbInfo",
    "TcbLevel",
    "TdxCollateral",
    "TdxModuleIdentity",
    "appraise_platform",
    "appraise_qe",
    "check_platform_match",
    "converge",
    "ecdsa_p256_verify",
    "intel_sgx_root",
    "load_collateral_dir",
    "load_signed_collateral",
    "verify_pck_chain",
]

# The Intel SGX Root CA every PCK and TCB-signing chain must end at (SHA-256 of its DER, as published by Intel).
SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
# Not an Intel JSON status: what appraisal yields when no TCB level of the collateral covers the platform (Intel's
# QVL reports TCB_NOT_SUPPORTED). Never accepted unless a policy names it.
TCB_NOT_SUPPORTED = "TcbNotSupported"

_PCK_LEAF_CN = "Intel SGX PCK Certificate"
_PCK_CA_CNS = {"Intel SGX PCK Platform CA": "platform", "Intel SGX PCK Processor CA": "processor"}
_TCB_SIGNING_CN = "Intel SGX TCB Signing"
_SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX = "1.2.840.113741.1.13.1"


# --- ECDSA helpers -------------------------------------------------------------------------------------------------


def ecdsa_p256_verify(key: ec.EllipticCurvePublicKey, raw_signature: bytes, message: bytes) -> bool:
    """Verify Intel's raw r||s (32+32 bytes, big-endian) ECDSA-P256-SHA256 signature; False rather than raising,
    so each caller names its own reason."""
    if len(raw_signature) != 64:
        return False
    der = utils.encode_dss_signature(
        int.from_bytes(raw_signature[:32], "big"), int.from_bytes(raw_signature[32:], "big")
    )
    try:
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _p256_key(cert: x509.Certificate, reason: str, what: str) -> ec.EllipticCurvePublicKey:
    """The certificate's key, which Intel's profile fixes to P-256: anything else is refused with `reason`."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CvmError(reason, f"{what} does not carry a P-256 key")
    return key


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


# --- pinned roots -----------------------------------------------------------------------------------------------


@functools.cache
def intel_sgx_root() -> x509.Certificate:
    """The shipped Intel SGX Root CA, refused if the file no longer matches its pinned fingerprint (a root is never
    trusted because a quote or a response carries it)."""
    data = resources.files("shared.cvm").joinpath("roots/intel/sgx-root-ca.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(data)
    if cert.fingerprint(hashes.SHA256()).hex() != SGX_ROOT_CA_SHA256:
        raise CvmError("root_not_pinned", "the shipped Intel SGX Root CA does not match its pinned fingerprint")
    return cert


@functools.cache
def _shipped_tcb_signing_chain() -> bytes:
    """Intel SGX TCB Signing certificate as served in the TCB-Info-Issuer-Chain header (valid 2018-05-21 to
    2025-05-21): a convenience for collateral of that period; newer collateral brings its own chain."""
    return resources.files("shared.cvm").joinpath("roots/intel/tcb-signing.pem").read_bytes()


@functools.lru_cache(maxsize=16)
def _anchors(extra_roots: tuple[bytes, ...]) -> tuple[x509.Certificate, ...]:
    """Trust anchors: the pinned Intel root plus roots the caller adds explicitly (tests, private deployments)."""
    try:
        extra = tuple(x509.load_der_x509_certificate(der) for der in extra_roots)
    except ValueError as exc:
        raise CvmError("root_not_pinned", "an extra root is not a DER certificate") from exc
    return (intel_sgx_root(), *extra)


def _pick_anchor(
    presented_root: x509.Certificate | None, issuer: x509.Name, anchors: Sequence[x509.Certificate]
) -> x509.Certificate:
    """The anchor a chain ends at: the one whose key the presented root carries (key pinning), or, when the chain
    stops below the root, the one named as the issuer. Refused with root_not_pinned otherwise."""
    if presented_root is not None:
        spki = _spki(presented_root)
        for anchor in anchors:
            if _spki(anchor) == spki:
                return anchor
        raise CvmError(
            "root_not_pinned", f"chain ends at {presented_root.subject.rfc4514_string()!r}, not a pinned root"
        )
    for anchor in anchors:
        if anchor.subject == issuer:
            return anchor
    raise CvmError("root_not_pinned", f"no pinned root named {issuer.rfc4514_string()!r}")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate, reason: str, what: str) -> None:
    """Name chaining plus the issuer's signature over the certificate (cryptography checks both)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CvmError(reason, f"{what} is not signed by {_cn(issuer.subject)!r}") from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _load_chain(pem: bytes, reason: str, what: str) -> list[x509.Certificate]:
    """PEM certificates, tolerating the NUL padding some quoting libraries leave after the last one."""
    try:
        certs = x509.load_pem_x509_certificates(pem.rstrip(b"\x00"))
    except ValueError as exc:
        raise CvmError(reason, f"{what} is not a PEM certificate chain") from exc
    return certs


# --- CRLs -------------------------------------------------------------------------------------------------------


def _load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    """A CRL as Intel serves it (DER) or as a PEM file."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CvmError("crl_invalid", f"{what} is not a CRL") from exc


@dataclass(frozen=True)
class _Window:
    """A validity window re-checked on every call (cached verification must not freeze time)."""

    what: str
    not_before: datetime
    not_after: datetime
    reason: str

    def check(self, at: datetime) -> None:
        if at < self.not_before:
            raise CvmError(self.reason, f"{self.what} is not valid before {self.not_before.isoformat()}")
        if at > self.not_after:
            raise CvmError(self.reason, f"{self.what} expired at {self.not_after.isoformat()}")


def _cert_window(cert: x509.Certificate, what: str) -> _Window:
    return _Window(what, cert.not_valid_before_utc, cert.not_valid_after_utc, "certificate_expired")


def _check_crl(data: bytes, issuer: x509.Certificate, revoked: x509.Certificate, what: str) -> _Window:
    """Verify a CRL with its issuer's key and refuse `revoked` if listed; returns the CRL's window for `at`."""
    crl = _load_crl(data, what)
    if crl.issuer != issuer.subject:
        raise CvmError(
            "crl_invalid", f"{what} is issued by {crl.issuer.rfc4514_string()!r}, not {_cn(issuer.subject)!r}"
        )
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        raise CvmError("crl_invalid", f"{what} is not signed by {_cn(issuer.subject)!r}")
    if crl.next_update_utc is None:
        raise CvmError("crl_invalid", f"{what} has no nextUpdate")
    if crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None:
        raise CvmError("certificate_revoked", f"{_cn(revoked.subject)!r} serial {revoked.serial_number:x} is revoked")
    return _Window(what, crl.last_update_utc, crl.next_update_utc, "collateral_expired")


# --- minimal DER reader (the SGX extension is a custom structure cryptography does not decode) -----------------


class _DerError(Exception):
    """Internal: malformed DER inside the SGX extension."""


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the DER element at `pos`; every length is bounds-checked against `end`."""
    if pos + 2 > end:
        raise _DerError("truncated header")
    tag, first = buf[pos], buf[pos + 1]
    if tag & 0x1F == 0x1F:
        raise _DerError("high tag numbers are not used by Intel")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 3 or pos + count > end:
            raise _DerError("bad length")
        length = int.from_bytes(buf[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise _DerError("element overruns its parent")
    return tag, pos, pos + length


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        element = _tlv(buf, start, end)
        out.append(element)
        start = element[2]
    return out


def _oid(body: bytes) -> str:
    if not body or body[-1] & 0x80:
        raise _DerError("bad OID")
    arcs: list[int] = []
    value = 0
    for byte in body:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def _uint(body: bytes) -> int:
    if not body or len(body) > 3 or body[0] & 0x80:
        raise _DerError("bad INTEGER")
    return int.from_bytes(body, "big")


def _pairs(buf: bytes, start: int, end: int) -> dict[str, tuple[int, bytes]]:
    """SEQUENCE OF SEQUENCE { OID, value } as {oid: (value tag, value bytes)}; a repeated OID is refused."""
    out: dict[str, tuple[int, bytes]] = {}
    for tag, s, e in _children(buf, start, end):
        if tag != 0x30:
            raise _DerError("expected SEQUENCE")
        parts = _children(buf, s, e)
        if len(parts) != 2 or parts[0][0] != 0x06:
            raise _DerError("expected OID and value")
        oid = _oid(buf[parts[0][1] : parts[0][2]])
        if oid in out:
            raise _DerError(f"{oid} repeated")
        out[oid] = (parts[1][0], buf[parts[1][1] : parts[1][2]])
    return out


@dataclass(frozen=True)
class PckExtensions:
    """What Intel's SGX extension (OID 1.2.840.113741.1.13.1) of a PCK leaf says about the platform."""

    ppid: str
    fmspc: str  # lower-case hex, 6 bytes
    pce_id: str  # lower-case hex, 2 bytes
    cpusvn: bytes
    cpusvn_components: tuple[int, ...]  # SGX TCB components 1..16
    pcesvn: int


def _octets(pairs: dict[str, tuple[int, bytes]], oid: str, size: int) -> bytes:
    tag, value = pairs.get(oid, (0, b""))
    if tag != 0x04 or len(value) != size:
        raise _DerError(f"{oid} is not a {size}-byte OCTET STRING")
    return value


def _integer(pairs: dict[str, tuple[int, bytes]], oid: str) -> int:
    tag, value = pairs.get(oid, (0, b""))
    if tag != 0x02:
        raise _DerError(f"{oid} is not an INTEGER")
    return _uint(value)


def _parse_sgx_extension(der: bytes) -> PckExtensions:
    tag, s, e = _tlv(der, 0, len(der))
    if tag != 0x30 or e != len(der):
        raise _DerError("extension is not one SEQUENCE")
    top = _pairs(der, s, e)
    tcb_tag, tcb = top.get(f"{_SGX}.2", (0, b""))
    if tcb_tag != 0x30:
        raise _DerError("TCB is not a SEQUENCE")
    comps = _pairs(tcb, 0, len(tcb))
    components = tuple(_integer(comps, f"{_SGX}.2.{i}") for i in range(1, 17))
    if any(c > 255 for c in components):
        raise _DerError("a TCB component exceeds a byte")
    return PckExtensions(
        ppid=_octets(top, f"{_SGX}.1", 16).hex(),
        fmspc=_octets(top, f"{_SGX}.4", 6).hex(),
        pce_id=_octets(top, f"{_SGX}.3", 2).hex(),
        cpusvn=_octets(comps, f"{_SGX}.2.18", 16),
        cpusvn_components=components,
        pcesvn=_integer(comps, f"{_SGX}.2.17"),
    )


def _pck_extensions(leaf: x509.Certificate) -> PckExtensions:
    try:
        ext = leaf.extensions.get_extension_for_oid(_SGX_EXTENSION_OID).value
    except (x509.ExtensionNotFound, ValueError) as exc:
        raise CvmError("pck_chain_untrusted", "PCK certificate has no SGX extension") from exc
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise CvmError("pck_chain_untrusted", "PCK certificate SGX extension is not raw DER")
    try:
        return _parse_sgx_extension(ext.value)
    except (_DerError, IndexError) as exc:
        raise CvmError("pck_chain_untrusted", f"PCK certificate SGX extension is malformed ({exc})") from exc


# --- PCK chain ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PckChain:
    """A PCK chain whose signatures, pinning and revocation were checked; only its dates remain per call."""

    leaf_key: ec.EllipticCurvePublicKey
    extensions: PckExtensions
    ca: str  # "platform" or "processor"
    windows: tuple[_Window, ...]

    def check_times(self, at: datetime) -> None:
        for window in self.windows:
            window.check(at)


@functools.lru_cache(maxsize=256)
def verify_pck_chain(
    chain_pem: bytes, extra_roots: tuple[bytes, ...], root_crl: bytes | None, pck_crl: bytes | None
) -> PckChain:
    """PCK leaf -> PCK Platform/Processor CA -> pinned root, each signature checked, then the CRLs (root CRL for
    the CA, PCK CRL for the leaf) and the leaf's SGX extension. Cached on the exact bytes: the chain of one host
    repeats in every quote it makes."""
    certs = _load_chain(chain_pem, "pck_chain_untrusted", "PCK certificate chain")
    if not 2 <= len(certs) <= 3:
        raise CvmError("pck_chain_untrusted", f"PCK chain has {len(certs)} certificates, expected leaf, CA and root")
    leaf, ca = certs[0], certs[1]
    anchor = _pick_anchor(certs[2] if len(certs) == 3 else None, ca.issuer, _anchors(extra_roots))
    ca_kind = _PCK_CA_CNS.get(_cn(ca.subject))
    if ca_kind is None or not _is_ca(ca):
        raise CvmError("pck_chain_untrusted", f"{_cn(ca.subject)!r} is not an Intel PCK CA")
    if _cn(leaf.subject) != _PCK_LEAF_CN or _is_ca(leaf):
        raise CvmError("pck_chain_untrusted", f"{_cn(leaf.subject)!r} is not a PCK leaf certificate")
    _issued_by(ca, anchor, "pck_chain_untrusted", "PCK CA certificate")
    _issued_by(leaf, ca, "pck_chain_untrusted", "PCK certificate")
    leaf_key = _p256_key(leaf, "pck_chain_untrusted", "PCK certificate")
    windows = [_cert_window(leaf, "PCK certificate"), _cert_window(ca, "PCK CA certificate")]
    windows.append(_cert_window(anchor, "root CA certificate"))
    if root_crl is not None:
        windows.append(_check_crl(root_crl, anchor, ca, "root CA CRL"))
    if pck_crl is not None:
        windows.append(_check_crl(pck_crl, ca, leaf, "PCK CRL"))
    return PckChain(leaf_key, _pck_extensions(leaf), ca_kind, tuple(windows))


# --- signed collateral JSON ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TdxCollateral:
    """Intel PCS responses cached by the caller (verification is offline): the TCB info and QE identity bodies
    exactly as served, the TCB-Info-Issuer-Chain header (PEM, URL-encoded or not; None means the shipped TCB
    Signing certificate), and the two CRLs (DER or PEM)."""

    tcb_info: bytes
    qe_identity: bytes
    issuer_chain: bytes | None = None
    root_ca_crl: bytes | None = None
    pck_crl: bytes | None = None

    @classmethod
    def from_files(
        cls,
        tcb_info: Path,
        qe_identity: Path,
        *,
        issuer_chain: Path | None = None,
        root_ca_crl: Path | None = None,
        pck_crl: Path | None = None,
    ) -> TdxCollateral:
        """Load collateral from files (the usual shape of an offline cache)."""

        def read(path: Path | None) -> bytes | None:
            return None if path is None else path.read_bytes()

        return cls(
            tcb_info.read_bytes(), qe_identity.read_bytes(), read(issuer_chain), read(root_ca_crl), read(pck_crl)
        )


def load_collateral_dir(directory: Path) -> TdxCollateral:
    """An offline collateral cache: `tcb_info.json` and `qe_identity.json` (Intel PCS responses as served),
    and optionally `tcb_signing_chain.pem` (the TCB-Info-Issuer-Chain header), `rootcrl.der`, `pckcrl.der`.
    A missing or unreadable required file is `collateral_missing`."""

    def optional(name: str) -> Path | None:
        path = directory / name
        return path if path.is_file() else None

    try:
        return TdxCollateral.from_files(directory / "tcb_info.json", directory / "qe_identity.json",
                                        issuer_chain=optional("tcb_signing_chain.pem"),
                                        root_ca_crl=optional("rootcrl.der"), pck_crl=optional("pckcrl.der"))
    except OSError as exc:
        raise CvmError("collateral_missing", f"{directory}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class TcbLevel:
    """One row of Intel's TCB levels (platform, TDX module or QE); unused component fields stay empty."""

    status: str
    advisory_ids: tuple[str, ...]
    tcb_date: str
    sgx_components: tuple[int, ...] = ()
    pcesvn: int = 0
    tdx_components: tuple[int, ...] = ()
    isvsvn: int = 0


@dataclass(frozen=True)
class TdxModuleIdentity:
    """Who may sign the TDX module (MRSIGNERSEAM, SEAM attributes under mask) and, per major version, its levels."""

    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[TcbLevel, ...] = ()


@dataclass(frozen=True)
class TcbInfo:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: str
    pce_id: str
    tcb_evaluation_data_number: int
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]


@dataclass(frozen=True)
class QeIdentity:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    tcb_levels: tuple[TcbLevel, ...]


class _Bad(Exception):
    """Internal: collateral JSON of the wrong shape."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse duplicate keys: a parser and a signature must never disagree on which value counts."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Bad(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Bad(f"{name} is not JSON")


_T = TypeVar("_T")
_DECODER = json.JSONDecoder(object_pairs_hook=_unique, parse_constant=_no_constant)
_WS = re.compile(r"[ \t\n\r]*")


def _top_level(text: str) -> dict[str, tuple[int, int, Any]]:
    """The top-level members of a JSON object with the exact character span of each value, so the signed inner
    object is verified as the raw text it was signed as, never a re-serialisation."""
    members: dict[str, tuple[int, int, Any]] = {}
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] != "{":
        raise _Bad("not a JSON object")
    pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    while text[pos : pos + 1] != "}":
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if not isinstance(key, str) or text[pos : pos + 1] != ":":
            raise _Bad("expected a member name and ':'")
        start = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
        value, end = _DECODER.raw_decode(text, start)
        if key in members:
            raise _Bad(f"duplicate key {key!r}")
        members[key] = (start, end, value)
        pos = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] == ",":
            pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
        elif text[pos : pos + 1] != "}":
            raise _Bad("expected ',' or '}'")
    if _WS.match(text, pos + 1).end() != len(text):  # type: ignore[union-attr]
        raise _Bad("trailing data after the object")
    return members


def _split_signed(body: bytes, name: str) -> tuple[dict[str, Any], bytes, bytes]:
    """(inner object, its raw bytes, raw r||s signature) of an Intel PCS `{name: {...}, "signature": hex}` body."""
    members = _top_level(body.decode("utf-8"))
    if set(members) != {name, "signature"}:
        raise _Bad(f"expected exactly {name!r} and 'signature', got {sorted(members)}")
    start, end, inner = members[name]
    signature = members["signature"][2]
    if not isinstance(inner, dict) or not isinstance(signature, str) or len(signature) != 128:
        raise _Bad("inner object or 64-byte hex signature missing")
    return inner, body.decode("utf-8")[start:end].encode("utf-8"), bytes.fromhex(signature)


def _field(obj: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Bad(f"{key!r} is not a {kind.__name__}")
    return value


def _hex(obj: dict[str, Any], key: str, size: int) -> bytes:
    value = bytes.fromhex(_field(obj, key, str))
    if len(value) != size:
        raise _Bad(f"{key!r} is not {size} bytes")
    return value


def _date(obj: dict[str, Any], key: str) -> datetime:
    value = datetime.fromisoformat(_field(obj, key, str))
    if value.tzinfo is None:
        raise _Bad(f"{key!r} has no time zone")
    return value


def _svns(obj: dict[str, Any], key: str) -> tuple[int, ...]:
    items = _field(obj, key, list)
    svns = tuple(_field(item, "svn", int) if isinstance(item, dict) else -1 for item in items)
    if len(svns) != 16 or not all(0 <= s <= 255 for s in svns):
        raise _Bad(f"{key!r} is not 16 byte-sized components")
    return svns


def _level(obj: Any, kind: str) -> TcbLevel:
    """A TCB level of the given kind: 'platform' (SGX + TDX components, PCESVN) or 'isv' (ISVSVN only)."""
    if not isinstance(obj, dict):
        raise _Bad("a TCB level is not an object")
    status = _field(obj, "tcbStatus", str)
    if status not in TCB_STATUSES:
        raise _Bad(f"unknown TCB status {status!r}")
    advisories = tuple(str(a) for a in obj.get("advisoryIDs", []))
    tcb = _field(obj, "tcb", dict)
    date = _field(obj, "tcbDate", str)
    if kind == "isv":
        return TcbLevel(status, advisories, date, isvsvn=_field(tcb, "isvsvn", int))
    return TcbLevel(
        status,
        advisories,
        date,
        sgx_components=_svns(tcb, "sgxtcbcomponents"),
        pcesvn=_field(tcb, "pcesvn", int),
        tdx_components=_svns(tcb, "tdxtcbcomponents"),
    )


def _levels(obj: dict[str, Any], kind: str) -> tuple[TcbLevel, ...]:
    levels = tuple(_level(item, kind) for item in _field(obj, "tcbLevels", list))
    if not levels:
        raise _Bad("no TCB levels")
    return levels


def _module(obj: Any) -> TdxModuleIdentity:
    if not isinstance(obj, dict):
        raise _Bad("a TDX module entry is not an object")
    levels = _levels(obj, "isv") if "tcbLevels" in obj else ()
    return TdxModuleIdentity(
        id=str(obj.get("id", "")),
        mrsigner=_hex(obj, "mrsigner", 48),
        attributes=_hex(obj, "attributes", 8),
        attributes_mask=_hex(obj, "attributesMask", 8),
        tcb_levels=levels,
    )


def _tcb_info(obj: dict[str, Any]) -> TcbInfo:
    module = obj.get("tdxModule")
    return TcbInfo(
        id=_field(obj, "id", str),
        version=_field(obj, "version", int),
        issue_date=_date(obj, "issueDate"),
        next_update=_date(obj, "nextUpdate"),
        fmspc=_hex(obj, "fmspc", 6).hex(),
        pce_id=_hex(obj, "pceId", 2).hex(),
        tcb_evaluation_data_number=_field(obj, "tcbEvaluationDataNumber", int),
        tdx_module=None if module is None else _module(module),
        tdx_module_identities=tuple(_module(m) for m in obj.get("tdxModuleIdentities", [])),
        tcb_levels=_levels(obj, "platform"),
    )


def _qe_identity(obj: dict[str, Any]) -> QeIdentity:
    return QeIdentity(
        id=_field(obj, "id", str),
        version=_field(obj, "version", int),
        issue_date=_date(obj, "issueDate"),
        next_update=_date(obj, "nextUpdate"),
        miscselect=int.from_bytes(_hex(obj, "miscselect", 4), "little"),
        miscselect_mask=int.from_bytes(_hex(obj, "miscselectMask", 4), "little"),
        attributes=_hex(obj, "attributes", 16),
        attributes_mask=_hex(obj, "attributesMask", 16),
        mrsigner=_hex(obj, "mrsigner", 32),
        isvprodid=_field(obj, "isvprodid", int),
        tcb_levels=_levels(obj, "isv"),
    )


_MALFORMED = (_Bad, ValueError, TypeError, AttributeError, UnicodeDecodeError)


def _authentic(body: bytes, name: str, key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The inner object of a PCS body, once its signature verifies over the exact bytes it was served as."""
    try:
        inner, raw, signature = _split_signed(body, name)
    except _MALFORMED as exc:
        raise CvmError("collateral_invalid", f"{name} collateral is malformed ({exc})") from exc
    if not ecdsa_p256_verify(key, signature, raw):
        raise CvmError("collateral_signature_invalid", f"{name} signature does not verify with the TCB signing key")
    return inner


def _interpret(inner: dict[str, Any], name: str, kind: tuple[str, int], build: Callable[[dict[str, Any]], _T]) -> _T:
    """Typed view of authenticated collateral, refused if it is not the kind a TDX quote needs."""
    if (inner.get("id"), inner.get("version")) != kind:
        raise CvmError("collateral_mismatch", f"{name} is {inner.get('id')!r} v{inner.get('version')}, not {kind}")
    try:
        return build(inner)
    except _MALFORMED as exc:
        raise CvmError("collateral_invalid", f"{name} collateral is malformed ({exc})") from exc


@dataclass(frozen=True)
class SignedCollateral:
    """TCB info and QE identity whose signatures chain to a pinned root; dates are still checked per call."""

    tcb_info: TcbInfo
    qe_identity: QeIdentity
    windows: tuple[_Window, ...]

    def check_times(self, at: datetime) -> None:
        for window in self.windows:
            window.check(at)


def _tcb_signer(
    issuer_chain: bytes, extra_roots: tuple[bytes, ...], root_crl: bytes | None
) -> tuple[ec.EllipticCurvePublicKey, list[_Window]]:
    """The Intel SGX TCB Signing key, trusted only once its certificate chains to a pinned root (and is not on the
    root CRL)."""
    if b"-----BEGIN%20" in issuer_chain:
        issuer_chain = unquote_to_bytes(issuer_chain)  # the header as Intel PCS sends it
    certs = _load_chain(issuer_chain, "collateral_signature_invalid", "TCB signing chain")
    if not 1 <= len(certs) <= 2 or _cn(certs[0].subject) != _TCB_SIGNING_CN:
        raise CvmError("collateral_signature_invalid", "TCB signing chain is not Intel SGX TCB Signing (+ root)")
    signer = certs[0]
    anchor = _pick_anchor(certs[1] if len(certs) == 2 else None, signer.issuer, _anchors(extra_roots))
    _issued_by(signer, anchor, "collateral_signature_invalid", "TCB signing certificate")
    windows = [_cert_window(signer, "TCB signing certificate")]
    if root_crl is not None:
        windows.append(_check_crl(root_crl, anchor, signer, "root CA CRL"))
    return _p256_key(signer, "collateral_signature_invalid", "TCB signing certificate"), windows


@functools.lru_cache(maxsize=64)
def load_signed_collateral(
    tcb_info: bytes,
    qe_identity: bytes,
    issuer_chain: bytes | None,
    extra_roots: tuple[bytes, ...],
    root_crl: bytes | None,
) -> SignedCollateral:
    """Verify both PCS bodies' signatures over the exact inner-object bytes with the TCB Signing key, then parse
    them (authenticate first, interpret second). Cached on the bytes: collateral changes once a month, quotes
    arrive continuously."""
    key, windows = _tcb_signer(issuer_chain or _shipped_tcb_signing_chain(), extra_roots, root_crl)
    info = _interpret(_authentic(tcb_info, "tcbInfo", key), "tcbInfo", ("TDX", 3), _tcb_info)
    identity = _interpret(
        _authentic(qe_identity, "enclaveIdentity", key), "enclaveIdentity", ("TD_QE", 2), _qe_identity
    )
    windows.append(_Window("TCB info", info.issue_date, info.next_update, "collateral_expired"))
    windows.append(_Window("QE identity", identity.issue_date, identity.next_update, "collateral_expired"))
    return SignedCollateral(info, identity, tuple(windows))


# --- Intel's TCB appraisal ----------------------------------------------------------------------------------------


def converge(status: str, other: str) -> str:
    """Fold a TDX-module or QE status into the platform status the way Intel's QVL does: an out-of-date component
    makes the whole TCB out of date (keeping a configuration hint), a revoked one revokes it."""
    if TCB_NOT_SUPPORTED in (status, other):
        return TCB_NOT_SUPPORTED
    if other == "Revoked" or status == "Revoked":
        return "Revoked"
    if other == "OutOfDate":
        if status in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return status


def _covers(have: Sequence[int], need: Sequence[int], start: int = 0) -> bool:
    return all(have[i] >= need[i] for i in range(start, len(need)))


def _first_isv_level(levels: Sequence[TcbLevel], isvsvn: int) -> TcbLevel | None:
    return next((level for level in levels if level.isvsvn <= isvsvn), None)


def _check_module(module: TdxModuleIdentity, mrsignerseam: bytes, seam_attributes: bytes) -> None:
    if module.mrsigner != mrsignerseam:
        raise CvmError("collateral_mismatch", f"MRSIGNERSEAM is not the TDX module signer of {module.id or 'TCB info'}")
    masked = bytes(a & m for a, m in zip(seam_attributes, module.attributes_mask, strict=True))
    if masked != module.attributes:
        raise CvmError("collateral_mismatch", "SEAM attributes do not match the TCB info's TDX module")


def _module_level(info: TcbInfo, tee_tcb_svn: bytes, mrsignerseam: bytes, seam_attributes: bytes) -> TcbLevel | None:
    """The TDX module's own level: TEE_TCB_SVN[1] is the module's major version, [0] its SVN. Major version 0
    (TDX 1.0 modules) is appraised only through the platform levels and the tdxModule signer."""
    major = tee_tcb_svn[1]
    if major == 0 or not info.tdx_module_identities:
        if info.tdx_module is None:
            raise CvmError("collateral_mismatch", "TCB info has no tdxModule")
        _check_module(info.tdx_module, mrsignerseam, seam_attributes)
        return None
    wanted = f"TDX_{major:02d}"
    module = next((m for m in info.tdx_module_identities if m.id.upper() == wanted), None)
    if module is None:
        raise CvmError("collateral_mismatch", f"TCB info has no TDX module identity {wanted}")
    _check_module(module, mrsignerseam, seam_attributes)
    level = _first_isv_level(module.tcb_levels, tee_tcb_svn[0])
    return level or TcbLevel(TCB_NOT_SUPPORTED, (), "")


def check_platform_match(info: TcbInfo, pck: PckExtensions) -> None:
    """TCB info is per platform family: its FMSPC and PCE-ID must be the PCK certificate's."""
    if info.fmspc != pck.fmspc or info.pce_id != pck.pce_id:
        raise CvmError(
            "collateral_mismatch",
            f"TCB info is for FMSPC {info.fmspc}/PCEID {info.pce_id}, PCK for {pck.fmspc}/{pck.pce_id}",
        )


def appraise_platform(
    info: TcbInfo, pck: PckExtensions, tee_tcb_svn: bytes, mrsignerseam: bytes, seam_attributes: bytes
) -> tuple[str, tuple[str, ...]]:
    """(status, advisory IDs) of the platform: the first TCB level whose SGX components and PCESVN the PCK
    certificate reaches and whose TDX components TEE_TCB_SVN reaches (from index 2 when the TDX module's major
    version is non-zero and a module identity appraised those two bytes), converged with the module's status."""
    check_platform_match(info, pck)
    module = _module_level(info, tee_tcb_svn, mrsignerseam, seam_attributes)
    start = 0 if module is None else 2  # without a module identity, bytes 0..1 are compared here (conservative)
    for level in info.tcb_levels:
        if (
            _covers(pck.cpusvn_components, level.sgx_components)
            and pck.pcesvn >= level.pcesvn
            and _covers(tee_tcb_svn, level.tdx_components, start)
        ):
            if level.tdx_components[1] != tee_tcb_svn[1]:
                raise CvmError("collateral_mismatch", "TEE_TCB_SVN[1] differs from the matching TCB level's")
            if module is None:
                return level.status, level.advisory_ids
            return converge(level.status, module.status), _merge(level.advisory_ids, module.advisory_ids)
    return TCB_NOT_SUPPORTED, ()


def appraise_qe(
    identity: QeIdentity, miscselect: int, attributes: bytes, mrsigner: bytes, isvprodid: int, isvsvn: int
) -> tuple[str, tuple[str, ...]]:
    """(status, advisory IDs) of the quoting enclave: it must be Intel's TD QE (MISCSELECT and ATTRIBUTES under
    mask, MRSIGNER, ISVPRODID), and its ISVSVN picks the first level it reaches (none: out of date)."""
    if miscselect & identity.miscselect_mask != identity.miscselect:
        raise CvmError("qe_identity_mismatch", "QE MISCSELECT does not match the QE identity")
    if bytes(a & m for a, m in zip(attributes, identity.attributes_mask, strict=True)) != identity.attributes:
        raise CvmError("qe_identity_mismatch", "QE ATTRIBUTES do not match the QE identity")
    if mrsigner != identity.mrsigner or isvprodid != identity.isvprodid:
        raise CvmError("qe_identity_mismatch", "QE MRSIGNER/ISVPRODID are not Intel's TD QE")
    level = _first_isv_level(identity.tcb_levels, isvsvn)
    return ("OutOfDate", ()) if level is None else (level.status, level.advisory_ids)


def _merge(*groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a for group in groups for a in group))
