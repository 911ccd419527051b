"""Intel TDX quotes (versions 4 and 5, ECDSA-P256 attestation keys): parsing and verification.

A quote is trusted in layers, each refused with its own stable reason:
  1. the PCK chain it carries ends at the pinned Intel SGX Root CA, is unrevoked and valid at `at`;
  2. the QE report is signed by the PCK leaf and binds the attestation key (REPORTDATA = SHA-256(key || auth data));
  3. header and TD report are signed by that attestation key;
  4. with collateral (Intel PCS TCB info and QE identity, cached by the caller), the platform, TDX module and QE
     TCB levels give a TCB status the policy must accept;
  5. the policy appraises the TD itself (debug, MRTD, RTMRs, MRCONFIGID, attributes, XFAM, REPORTDATA).

Layouts follow Intel's "TDX DCAP Quoting Library API" (appendix A) and google/go-tdx-guest's `abi` package. Parsing
never raises anything but CvmError("quote_malformed"): quotes come from hosts we do not trust."""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import Field, field_validator, model_validator

from shared.cvm.errors import CvmError
from shared.cvm.tdx_collateral import (
    TCB_NOT_SUPPORTED,
    TCB_STATUSES,
    PckExtensions,
    TdxCollateral,
    appraise_platform,
    appraise_qe,
    check_platform_match,
    converge,
    ecdsa_p256_verify,
    load_signed_collateral,
    verify_pck_chain,
)
from shared.models import Frozen

__all__ = [
    "QeReport",
    "QuoteHeader",
    "TdAttributes",
    "TdReport",
    "TdxCollateral",
    "TdxPolicy",
    "TdxQuote",
    "TdxVerified",
    "check_rtmr_log",
    "parse_quote",
    "replay_rtmrs",
    "verify_tdx",
]

_TD_REPORT_10 = 584  # body type 2 (every v4 quote)
_TD_REPORT_15 = 648  # body type 3: adds TEE_TCB_SVN2 and MRSERVICETD
_BODY_SIZES = {2: _TD_REPORT_10, 3: _TD_REPORT_15}
_QE_REPORT_SIZE = 384
_ATT_KEY_ECDSA_P256 = 2
_TEE_TDX = 0x81
_CERT_QE_REPORT = 6
_CERT_PCK_CHAIN = 5


# --- parsing ------------------------------------------------------------------------------------------------------


class _Reader:
    """A cursor over untrusted bytes: every read is bounds-checked and fails as quote_malformed."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, size: int, name: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise CvmError("quote_malformed", f"{self.what} truncated in {name}")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def u16(self, name: str) -> int:
        return int(struct.unpack("<H", self.take(2, name))[0])

    def u32(self, name: str) -> int:
        return int(struct.unpack("<I", self.take(4, name))[0])


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdAttributes:
    """TDATTRIBUTES as the 64-bit value the TDX module defines (little-endian in the report)."""

    value: int

    def bit(self, index: int) -> bool:
        return bool(self.value >> index & 1)

    @property
    def debug(self) -> bool:
        """TUD.DEBUG (bit 0): the host can read and write the TD's state; never trust such a TD."""
        return self.bit(0)

    @property
    def sept_ve_disable(self) -> bool:
        return self.bit(28)

    @property
    def migratable(self) -> bool:
        return self.bit(29)

    @property
    def pks(self) -> bool:
        return self.bit(30)

    @property
    def kl(self) -> bool:
        return self.bit(31)

    @property
    def perfmon(self) -> bool:
        return self.bit(63)

    def names(self) -> tuple[str, ...]:
        flags = ("debug", "sept_ve_disable", "migratable", "pks", "kl", "perfmon")
        return tuple(name for name in flags if getattr(self, name))


@dataclass(frozen=True)
class TdReport:
    """The TD report body (TD report 1.0, or 1.5 with TEE_TCB_SVN2 and MRSERVICETD)."""

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mrservicetd: bytes | None = None

    @property
    def attributes(self) -> TdAttributes:
        return TdAttributes(int.from_bytes(self.td_attributes, "little"))

    @property
    def xfam_value(self) -> int:
        return int.from_bytes(self.xfam, "little")


@dataclass(frozen=True)
class QeReport:
    """The quoting enclave's SGX report (384 bytes), signed by the PCK leaf."""

    raw: bytes = field(repr=False)
    cpusvn: bytes
    miscselect: int
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    isvprodid: int
    isvsvn: int
    report_data: bytes


@dataclass(frozen=True)
class TdxQuote:
    header: QuoteHeader
    body_type: int  # 2: TD report 1.0, 3: TD report 1.5
    report: TdReport
    signed_region: bytes = field(repr=False)  # header (+ v5 body descriptor) + body: what the attestation key signs
    signature: bytes
    attestation_key: bytes  # raw P-256 x || y
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: bytes = field(repr=False)  # PEM, as carried (certification data type 5)
    trailing: int = 0  # bytes after the signed data: unsigned, ignored


def _header(r: _Reader) -> QuoteHeader:
    version, key_type, tee_type = r.u16("version"), r.u16("attestation key type"), r.u32("TEE type")
    if version not in (4, 5):
        raise CvmError("quote_malformed", f"quote version {version} is not 4 or 5")
    if key_type != _ATT_KEY_ECDSA_P256:
        raise CvmError("quote_malformed", f"attestation key type {key_type} is not ECDSA-256-with-P-256")
    if tee_type != _TEE_TDX:
        raise CvmError("quote_malformed", f"TEE type {tee_type:#x} is not TDX")
    qe_svn, pce_svn = r.u16("QE SVN"), r.u16("PCE SVN")
    return QuoteHeader(
        version, key_type, tee_type, qe_svn, pce_svn, r.take(16, "QE vendor ID"), r.take(20, "user data")
    )


def _td_report(data: bytes, body_type: int) -> TdReport:
    r = _Reader(data, "TD report")
    return TdReport(
        tee_tcb_svn=r.take(16, "TEE_TCB_SVN"),
        mrseam=r.take(48, "MRSEAM"),
        mrsignerseam=r.take(48, "MRSIGNERSEAM"),
        seam_attributes=r.take(8, "SEAMATTRIBUTES"),
        td_attributes=r.take(8, "TDATTRIBUTES"),
        xfam=r.take(8, "XFAM"),
        mrtd=r.take(48, "MRTD"),
        mrconfigid=r.take(48, "MRCONFIGID"),
        mrowner=r.take(48, "MROWNER"),
        mrownerconfig=r.take(48, "MROWNERCONFIG"),
        rtmrs=(r.take(48, "RTMR0"), r.take(48, "RTMR1"), r.take(48, "RTMR2"), r.take(48, "RTMR3")),
        report_data=r.take(64, "REPORTDATA"),
        tee_tcb_svn2=r.take(16, "TEE_TCB_SVN2") if body_type == 3 else None,
        mrservicetd=r.take(48, "MRSERVICETD") if body_type == 3 else None,
    )


def _body(r: _Reader, version: int) -> tuple[int, TdReport]:
    if version == 4:
        return 2, _td_report(r.take(_TD_REPORT_10, "TD report"), 2)
    body_type, size = r.u16("body type"), r.u32("body size")
    if _BODY_SIZES.get(body_type) != size:
        raise CvmError("quote_malformed", f"v5 body type {body_type} with size {size} is not a TD report")
    return body_type, _td_report(r.take(size, "TD report"), body_type)


def _qe_report(raw: bytes) -> QeReport:
    """SGX REPORT body layout (offsets from Intel's sgx_report_body_t)."""
    isvprodid, isvsvn = struct.unpack_from("<HH", raw, 256)
    return QeReport(
        raw=raw,
        cpusvn=raw[0:16],
        miscselect=int.from_bytes(raw[16:20], "little"),
        attributes=raw[48:64],
        mrenclave=raw[64:96],
        mrsigner=raw[128:160],
        isvprodid=isvprodid,
        isvsvn=isvsvn,
        report_data=raw[320:384],
    )


def _cert_data(r: _Reader, expected: int, name: str) -> bytes:
    """A certification data element (type, size, data) whose data must fill the rest of its parent exactly."""
    kind, size = r.u16(f"{name} type"), r.u32(f"{name} size")
    if kind != expected:
        raise CvmError("quote_malformed", f"{name} has type {kind}, expected {expected}")
    data = r.take(size, name)
    if r.pos != len(r.data):
        raise CvmError("quote_malformed", f"{name} size {size} does not fill its container")
    return data


def _signed_data(data: bytes) -> tuple[bytes, bytes, QeReport, bytes, bytes, bytes]:
    """Quote signature, attestation key, then QE report certification data (type 6) holding the QE report, its
    signature, QE auth data and the PCK chain (type 5)."""
    r = _Reader(data, "quote signature data")
    signature, key = r.take(64, "quote signature"), r.take(64, "attestation key")
    qe = _Reader(_cert_data(r, _CERT_QE_REPORT, "certification data"), "QE report certification data")
    report, report_sig = qe.take(_QE_REPORT_SIZE, "QE report"), qe.take(64, "QE report signature")
    auth = qe.take(qe.u16("QE auth data size"), "QE auth data")
    chain = _cert_data(qe, _CERT_PCK_CHAIN, "PCK certificate chain")
    return signature, key, _qe_report(report), report_sig, auth, chain


def parse_quote(data: bytes) -> TdxQuote:
    """Parse a TDX quote v4 or v5; anything truncated, oversized or of the wrong type is quote_malformed."""
    r = _Reader(bytes(data), "quote")
    header = _header(r)
    body_type, report = _body(r, header.version)
    signed_end = r.pos
    signed_data = r.take(r.u32("signed data size"), "signed data")
    signature, key, qe_report, qe_sig, auth, chain = _signed_data(signed_data)
    return TdxQuote(
        header=header,
        body_type=body_type,
        report=report,
        signed_region=r.data[:signed_end],
        signature=signature,
        attestation_key=key,
        qe_report=qe_report,
        qe_report_signature=qe_sig,
        qe_auth_data=auth,
        pck_chain=chain,
        trailing=len(r.data) - r.pos,
    )


# --- policy -------------------------------------------------------------------------------------------------------


def _hex48(value: str) -> str:
    value = value.lower().removeprefix("0x")
    if len(value) != 96 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("expected 48 bytes of hex")
    return value


class TdxPolicy(Frozen):
    """What a verifier accepts beyond authenticity. Safe defaults: no debug TD, no MRTD trusted until listed
    (`allow_any_mrtd` is an explicit opt-out for callers that pin the TD elsewhere, e.g. through RTMRs), only
    UpToDate TCBs, collateral and both CRLs required."""

    allow_debug: bool = False
    mrtd: tuple[str, ...] = ()  # allow-list, hex
    allow_any_mrtd: bool = False
    rtmrs: dict[int, str] = {}  # expected RTMR values by index 0..3, hex
    mrconfigid: str | None = None
    xfam: int | None = Field(None, ge=0, lt=1 << 64)  # exact XFAM (64-bit value)
    td_attributes_mask: int = Field(0, ge=0, lt=1 << 64)  # (TDATTRIBUTES & mask) must equal td_attributes
    td_attributes: int = Field(0, ge=0, lt=1 << 64)
    accepted_tcb_status: tuple[str, ...] = ("UpToDate",)
    require_collateral: bool = True
    require_crls: bool = True

    @field_validator("mrtd")
    @classmethod
    def _mrtds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_hex48(v) for v in value)

    @field_validator("mrconfigid")
    @classmethod
    def _mrconfigid(cls, value: str | None) -> str | None:
        return None if value is None else _hex48(value)

    @field_validator("rtmrs")
    @classmethod
    def _rtmrs(cls, value: dict[int, str]) -> dict[int, str]:
        if any(index not in range(4) for index in value):
            raise ValueError("RTMR indexes are 0..3")
        return {index: _hex48(v) for index, v in value.items()}

    @field_validator("accepted_tcb_status")
    @classmethod
    def _statuses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(value) - {*TCB_STATUSES, TCB_NOT_SUPPORTED}
        if unknown:
            raise ValueError(f"unknown TCB status {sorted(unknown)}")
        return value

    @model_validator(mode="after")
    def _attributes_under_mask(self) -> TdxPolicy:
        if self.td_attributes & ~self.td_attributes_mask:
            raise ValueError("td_attributes sets bits outside td_attributes_mask")
        return self


def _appraise_td(report: TdReport, policy: TdxPolicy, report_data: bytes | None) -> None:
    """The TD itself, against the policy; constant-time where a caller-chosen secret could be compared."""
    if report.attributes.debug and not policy.allow_debug:
        raise CvmError("debug_enabled", "the TD runs in debug mode (TDATTRIBUTES.DEBUG)")
    if not policy.allow_any_mrtd and report.mrtd.hex() not in policy.mrtd:
        raise CvmError("mrtd_not_allowed", f"MRTD {report.mrtd.hex()} is not in the allow-list")
    for index, expected in sorted(policy.rtmrs.items()):
        if report.rtmrs[index].hex() != expected:
            raise CvmError("rtmr_mismatch", f"RTMR{index} is {report.rtmrs[index].hex()}, expected {expected}")
    if policy.mrconfigid is not None and report.mrconfigid.hex() != policy.mrconfigid:
        raise CvmError("mrconfigid_mismatch", f"MRCONFIGID is {report.mrconfigid.hex()}")
    if policy.xfam is not None and report.xfam_value != policy.xfam:
        raise CvmError("xfam_mismatch", f"XFAM is {report.xfam_value:#018x}, expected {policy.xfam:#018x}")
    if report.attributes.value & policy.td_attributes_mask != policy.td_attributes:
        raise CvmError("td_attributes_mismatch", f"TDATTRIBUTES {report.attributes.value:#018x} outside policy")
    if report_data is not None and not hmac.compare_digest(report.report_data, report_data):
        raise CvmError("report_data_mismatch", "REPORTDATA does not bind the expected nonce and key")


# --- RTMR event-log replay ------------------------------------------------------------------------------------------


def replay_rtmrs(events: Iterable[tuple[int, bytes]]) -> tuple[bytes, bytes, bytes, bytes]:
    """Replay an event log of (RTMR index, SHA-384 digest): RTMR[i] = SHA384(RTMR[i] || digest) from zeros, the
    way TDG.MR.RTMR.EXTEND accumulates them."""
    rtmrs = [bytes(48)] * 4
    for index, digest in events:
        if index not in range(4) or len(digest) != 48:
            raise CvmError("rtmr_log_mismatch", f"event for RTMR{index} is not a 48-byte SHA-384 digest")
        rtmrs[index] = hashlib.sha384(rtmrs[index] + digest).digest()
    return rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]


def check_rtmr_log(report: TdReport, events: Iterable[tuple[int, bytes]]) -> None:
    """Refuse an event log whose replay is not exactly the quoted RTMRs (the log is then unusable for appraisal)."""
    for index, (replayed, quoted) in enumerate(zip(replay_rtmrs(events), report.rtmrs, strict=True)):
        if replayed != quoted:
            raise CvmError(
                "rtmr_log_mismatch", f"event log replays RTMR{index} to {replayed.hex()}, quote has {quoted.hex()}"
            )


# --- verification -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TdxVerified:
    """A quote that passed every check, with what its collateral said about the platform."""

    quote: TdxQuote
    tcb_status: str | None  # None when verified without collateral (policy.require_collateral=False)
    advisory_ids: tuple[str, ...]
    fmspc: str

    def summary(self) -> dict[str, str]:
        """Printable verified fields (for the CLI and audit logs)."""
        report = self.quote.report
        out = {
            "version": str(self.quote.header.version),
            "tee_tcb_svn": report.tee_tcb_svn.hex(),
            "mrtd": report.mrtd.hex(),
            **{f"rtmr{i}": rtmr.hex() for i, rtmr in enumerate(report.rtmrs)},
            "mrconfigid": report.mrconfigid.hex(),
            "report_data": report.report_data.hex(),
            "td_attributes": f"{report.attributes.value:#018x} ({','.join(report.attributes.names()) or 'none'})",
            "xfam": f"{report.xfam_value:#018x}",
            "tcb_status": self.tcb_status or "not appraised (no collateral)",
            "fmspc": self.fmspc,
        }
        if self.advisory_ids:
            out["advisory_ids"] = ",".join(self.advisory_ids)
        return out


@functools.lru_cache(maxsize=1024)
def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey | None:
    """The raw x||y attestation key as a P-256 point (None off the curve); cached: a QE reuses its key."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        return None


def _check_signatures(quote: TdxQuote, pck_key: ec.EllipticCurvePublicKey) -> None:
    """QE report signed by the PCK, binding the attestation key, which signed header and body. Never cached."""
    if not ecdsa_p256_verify(pck_key, quote.qe_report_signature, quote.qe_report.raw):
        raise CvmError("qe_report_signature_invalid", "QE report is not signed by the PCK certificate's key")
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(quote.qe_report.report_data, binding):
        raise CvmError("qe_report_data_mismatch", "QE report does not bind the attestation key and QE auth data")
    key = _attestation_key(quote.attestation_key)
    if key is None or not ecdsa_p256_verify(key, quote.signature, quote.signed_region):
        raise CvmError("quote_signature_invalid", "quote is not signed by its attestation key")


def _appraise_tcb(
    quote: TdxQuote, collateral: TdxCollateral, roots: tuple[bytes, ...], pck: PckExtensions, at: datetime
) -> tuple[str, tuple[str, ...]]:
    """Platform + TDX module + QE status from signed collateral, converged as Intel's QVL does."""
    signed = load_signed_collateral(
        collateral.tcb_info, collateral.qe_identity, collateral.issuer_chain, roots, collateral.root_ca_crl
    )
    check_platform_match(signed.tcb_info, pck)  # before dates: collateral for another platform is the clearer error
    signed.check_times(at)
    report, qe = quote.report, quote.qe_report
    platform, advisories = appraise_platform(
        signed.tcb_info, pck, report.tee_tcb_svn, report.mrsignerseam, report.seam_attributes
    )
    qe_status, qe_advisories = appraise_qe(
        signed.qe_identity, qe.miscselect, qe.attributes, qe.mrsigner, qe.isvprodid, qe.isvsvn
    )
    return converge(platform, qe_status), tuple(dict.fromkeys(advisories + qe_advisories))


def _roots_key(extra_roots: Sequence[x509.Certificate]) -> tuple[bytes, ...]:
    return tuple(root.public_bytes(serialization.Encoding.DER) for root in extra_roots)


def _crls(collateral: TdxCollateral | None, policy: TdxPolicy) -> tuple[bytes | None, bytes | None]:
    if collateral is None:
        if policy.require_collateral:
            raise CvmError("collateral_missing", "no TCB info / QE identity given and the policy requires them")
        return None, None
    if policy.require_crls and (collateral.root_ca_crl is None or collateral.pck_crl is None):
        raise CvmError("collateral_missing", "the policy requires the root CA CRL and the PCK CRL")
    return collateral.root_ca_crl, collateral.pck_crl


def verify_tdx(
    quote: bytes,
    *,
    at: datetime,
    collateral: TdxCollateral | None = None,
    policy: TdxPolicy | None = None,
    report_data: bytes | None = None,
    extra_roots: Sequence[x509.Certificate] = (),
) -> TdxVerified:
    """Verify a TDX quote at time `at` (timezone-aware; explicit so that cached collateral is judged at a known
    instant) and appraise it with `policy` (default: TdxPolicy()). `report_data` is the 64 bytes the guest must
    have put in REPORTDATA (see `expected_report_data`). `extra_roots` adds trust anchors beside the pinned Intel
    root (tests, private deployments). Returns TdxVerified or raises CvmError with a stable reason."""
    if at.tzinfo is None:
        raise ValueError("verify_tdx needs a timezone-aware `at`")
    policy = policy or TdxPolicy()
    parsed = parse_quote(quote)
    root_crl, pck_crl = _crls(collateral, policy)
    roots = _roots_key(extra_roots)
    chain = verify_pck_chain(parsed.pck_chain, roots, root_crl, pck_crl)
    chain.check_times(at)
    _check_signatures(parsed, chain.leaf_key)
    status: str | None = None
    advisories: tuple[str, ...] = ()
    if collateral is not None:
        status, advisories = _appraise_tcb(parsed, collateral, roots, chain.extensions, at)
        if status not in policy.accepted_tcb_status:
            detail = f"TCB status {status}" + (f" (advisories: {', '.join(advisories)})" if advisories else "")
            raise CvmError("tcb_status_not_accepted", detail)
    _appraise_td(parsed.report, policy, report_data)
    return TdxVerified(parsed, status, advisories, chain.extensions.fmspc)
