"""NVIDIA GPU confidential-computing evidence (Hopper: H100 / H200 in CC mode): is this GPU what it claims, in
the state NVIDIA signed off on, right now?

What a GPU's evidence proves, and how each step is checked here:

1. The report is an SPDM 1.1 GET_MEASUREMENTS request (37 bytes, carrying our 32-byte nonce) followed by the
   GPU's MEASUREMENTS response (measurement blocks, the GPU's own nonce, opaque data with the driver and VBIOS
   versions and the firmware id, and an ECDSA P-384 / SHA-384 signature over request + response). It is parsed
   strictly: every length must add up exactly, or the report is `gpu_report_invalid`.
2. The signing key is the leaf of the device certificate chain NVML hands out. The chain must lead, certificate
   by certificate, to NVIDIA's Device Identity CA pinned below (the node's own copy of a root is dropped, never
   trusted), every certificate valid at `at`. The leaf's firmware id (TCG DICE extension) must equal the one in
   the signed report, or a report from one firmware could be passed off under another's certificate.
3. The signature must verify with the leaf key (`gpu_report_invalid`), and the request's nonce must be the
   challenge's (`gpu_nonce_mismatch`): the report is fresh and from this GPU.
4. The measurements are compared with NVIDIA's reference values (RIMs: signed SWID tags, one for the driver and
   one for the VBIOS), read from a local RIM cache directory under the ids NVIDIA's RIM service uses. Each RIM's
   XML signature must verify (signxml) with a certificate that chains to NVIDIA's CoRIM signing root pinned
   below; its version must be the report's, and every active reference value must match the runtime one.

What is NOT checked, and why: certificate revocation. NVIDIA publishes it by OCSP only and this verifier is
offline (no network from the attestation plane). `detail` says so on every verified verdict.

Why not NVIDIA's own `nv-local-gpu-verifier` (2.7.3, the latest): it pins `cryptography==43.0.1` (qvm needs
>=50), `nvidia-ml-py==12.550.52` and `urllib3==2.6.3`, so pip cannot install it beside qvm; importing it also
deletes and rewrites `verifier.log` in the working directory and keeps per-run state in class attributes; it is
deprecated (end of support 2026-09-15). This module follows its checks (same report layout, same FWID rule,
same RIM ids, same measurement comparison) with `cryptography`, and uses the same pinned roots it ships.

Everything given here is untrusted: no exception escapes `verify_gpu_evidence` (bad input is a verdict). The
RIM step needs the `gpu-cc` extra (signxml, lxml); without it, RIMs present in the cache are refused as
`gpu_verifier_missing` rather than skipped. Blocking (signature checks, file reads): call it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pydantic import Field

from shared.errors import ReasonedError
from shared.events import GpuEvidence
from shared.models import Frozen
from shared.telemetry import get_logger

__all__ = [
    "NONCE_SIZE",
    "REASONS",
    "GpuCcPolicy",
    "GpuEvidenceError",
    "GpuReport",
    "GpuVerdict",
    "parse_report",
    "rim_ids",
    "verify_gpu_evidence",
]

log = get_logger("qvm.attestation_verifier.gpu_cc")

NONCE_SIZE = 32  # SPDM GET_MEASUREMENTS nonce; NVML takes exactly this many bytes

VERIFIED = "verified"
# Every status a verdict can carry besides "verified" (stable: published with the attestation result).
REASONS = (
    "gpu_cc_off",  # the node says CC is off or unsupported on this GPU
    "gpu_cc_devtools",  # CC in devtools mode: the protections a confidential job relies on are lifted
    "gpu_report_missing",  # CC on, but no report or no certificate chain came with it
    "gpu_report_invalid",  # not a well-formed SPDM report, or its signature does not verify
    "gpu_nonce_mismatch",  # signed, but for another challenge
    "gpu_cert_chain_invalid",  # no path to NVIDIA's device root at `at`, or the leaf is not this firmware's
    "gpu_rim_unavailable",  # no RIM cache, or no RIM in it for this driver / VBIOS
    "gpu_rim_invalid",  # a cached RIM is malformed, badly signed or not chained to NVIDIA's RIM root
    "gpu_rim_mismatch",  # the RIM is for another version, or a measurement differs from its reference
    "gpu_verifier_missing",  # RIMs to check but the `gpu-cc` extra (signxml, lxml) is not installed
)

# NVIDIA Device Identity CA: the root of every GPU device certificate chain (Hopper and later), as
# nv-local-gpu-verifier ships it (verifier/certs/verifier_device_root.pem). SHA-256 of the certificate:
# 102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48.
_DEVICE_ROOT_PEM = b"""-----BEGIN CERTIFICATE-----
MIICCzCCAZCgAwIBAgIQLTZwscoQBBHB/sDoKgZbVDAKBggqhkjOPQQDAzA1MSIw
IAYDVQQDDBlOVklESUEgRGV2aWNlIElkZW50aXR5IENBMQ8wDQYDVQQKDAZOVklE
SUEwIBcNMjExMTA1MDAwMDAwWhgPOTk5OTEyMzEyMzU5NTlaMDUxIjAgBgNVBAMM
GU5WSURJQSBEZXZpY2UgSWRlbnRpdHkgQ0ExDzANBgNVBAoMBk5WSURJQTB2MBAG
ByqGSM49AgEGBSuBBAAiA2IABA5MFKM7+KViZljbQSlgfky/RRnEQScW9NDZF8SX
gAW96r6u/Ve8ZggtcYpPi2BS4VFu6KfEIrhN6FcHG7WP05W+oM+hxj7nyA1r1jkB
2Ry70YfThX3Ba1zOryOP+MJ9vaNjMGEwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8B
Af8EBAMCAQYwHQYDVR0OBBYEFFeF/4PyY8xlfWi3Olv0jUrL+0lfMB8GA1UdIwQY
MBaAFFeF/4PyY8xlfWi3Olv0jUrL+0lfMAoGCCqGSM49BAMDA2kAMGYCMQCPeFM3
TASsKQVaT+8S0sO9u97PVGCpE9d/I42IT7k3UUOLSR/qvJynVOD1vQKVXf0CMQC+
EY55WYoDBvs2wPAH1Gw4LbcwUN8QCff8bFmV4ZxjCRr4WXTLFHBKjbfneGSBWwA=
-----END CERTIFICATE-----
"""

# NVIDIA CoRIM signing Root CA: the root of the certificates that sign RIMs (verifier/certs/verifier_RIM_root.pem).
# SHA-256 of the certificate: 12977b5115acb0381179279fffeb5a8c4d264971ebb32298023a465fa41df5d1.
_RIM_ROOT_PEM = b"""-----BEGIN CERTIFICATE-----
MIICKTCCAbCgAwIBAgIQRdrjoA5QN73fh1N17LXicDAKBggqhkjOPQQDAzBFMQsw
CQYDVQQGEwJVUzEPMA0GA1UECgwGTlZJRElBMSUwIwYDVQQDDBxOVklESUEgQ29S
SU0gc2lnbmluZyBSb290IENBMCAXDTIzMDMxNjE1MzczNFoYDzIwNTMwMzA4MTUz
NzM0WjBFMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGTlZJRElBMSUwIwYDVQQDDBxO
VklESUEgQ29SSU0gc2lnbmluZyBSb290IENBMHYwEAYHKoZIzj0CAQYFK4EEACID
YgAEuECyi9vNM+Iw2lfUzyBldHAwaC1HF7TCgp12QcEyUTm3Tagxwr48d55+K2VI
lWYIDk7NlAIQdcV/Ff7euGLI+Qauj93HsSI4WX298PpW54RTgz9tC+Q684caR/BX
WEeZo2MwYTAdBgNVHQ4EFgQUpaXrOPK4ZDAk08DBskn594zeZjAwHwYDVR0jBBgw
FoAUpaXrOPK4ZDAk08DBskn594zeZjAwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8B
Af8EBAMCAQYwCgYIKoZIzj0EAwMDZwAwZAIwHGDyscDP6ihHqRvZlI3eqZ4YkvjE
1duaN84tAHRVgxVMvNrp5Tnom3idHYGW/dskAjATvjIx6VzHm/4e2GiZAyZEIUBD
OKPzp5ei/A0iUZpdvngenDwV8Qa/wGdiTmJ7Bp4=
-----END CERTIFICATE-----
"""

# SPDM 1.1 framing (DMTF DSP0274) as the GPU produces it.
_REQUEST_SIZE = 37  # version, code, param1, param2, nonce[32], slot id
_GET_MEASUREMENTS = 0xE0
_MEASUREMENTS = 0x60
_SIGNATURE_SIZE = 96  # ECDSA P-384: r and s, 48 bytes each, big-endian
_DMTF_SPEC = 1  # MeasurementSpecification bit 0: DMTF-defined measurement blocks
_MAX_REPORT = 0x2000  # NVML_CC_GPU_ATTESTATION_REPORT_SIZE

# Opaque data field ids (nv-local-gpu-verifier's OPAQUE_DATA_TYPES).
_OPAQUE_DRIVER_VERSION = 3
_OPAQUE_VBIOS_VERSION = 6
_OPAQUE_CHIP_SKU = 15
_OPAQUE_PROJECT = 17
_OPAQUE_PROJECT_SKU = 18
_OPAQUE_FWID = 20
_OPAQUE_SINGLE = {_OPAQUE_DRIVER_VERSION, _OPAQUE_VBIOS_VERSION, _OPAQUE_CHIP_SKU, _OPAQUE_PROJECT,
                  _OPAQUE_PROJECT_SKU, _OPAQUE_FWID}  # read here: a second copy would be ambiguous

_FWID_OID = "2.23.133.5.4.1"  # TCG DICE TcbInfo; on Hopper it ends with the FWID digest (OCTET STRING, 48 bytes)
_FWID_SIZE = 48
_MAX_CHAIN = 8  # a GPU chain has 5 certificates, a RIM's 4

_RIM_MAX_BYTES = 1 << 20
_RIM_MAX_RESOURCES = 512
_RIM_MAX_ALTERNATIVES = 16
_SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
_DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"
_SHA384_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
_RIM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RIM_SUFFIXES = ("", ".swidtag", ".xml", ".json")


class GpuCcPolicy(Frozen):
    """What the verifier demands of a node's GPUs."""

    require_cc: bool = Field(True, description="A GPU whose CC mode is not 'on' fails (else it is reported only).")
    allow_rim_unavailable: bool = Field(
        False, description="Accept a GPU whose report and certificate check out when no RIM is cached for its "
                           "driver / VBIOS (measurements then unchecked). Off: an offline verifier without RIMs "
                           "refuses, since an unmeasured GPU could run any firmware NVIDIA ever signed.")
    rim_cache_dir: Path | None = Field(
        None, description="Directory of RIM files named by their NVIDIA RIM service id (NV_GPU_DRIVER_GH100_<ver>, "
                          "NV_GPU_VBIOS_<project>_<sku>_<chip>_<ver>), optionally with .swidtag / .xml / .json: "
                          "the SWID tag itself, or the service's JSON answer ({\"rim\": base64}).")


class GpuVerdict(Frozen):
    """One GPU's outcome. `ok` is the gate (verified, or CC off where the policy does not require it); `status`
    says which, or why not. The versions are the report's, shown once its signature verified (else empty)."""

    uuid: str = Field(max_length=96, description="The node's claim: NVML's UUID is not in the signed report.")
    status: str = Field(max_length=32, examples=[VERIFIED, "gpu_nonce_mismatch"])
    ok: bool
    driver_version: str = Field("", max_length=32)
    vbios_version: str = Field("", max_length=32)
    measurements_checked: bool = Field(False, description="True when RIM reference values were compared.")
    detail: str = Field("", max_length=1024)


@dataclass(frozen=True)
class GpuReport:
    """A parsed SPDM GET_MEASUREMENTS request + response (not yet verified)."""

    raw: bytes
    spdm_version: int
    nonce: bytes  # the requester's (the challenge's) nonce
    responder_nonce: bytes
    measurements: dict[int, bytes]  # 0-based measurement index (SPDM block index - 1) -> value
    opaque: dict[int, bytes]  # opaque field id -> value (first occurrence)
    signature: bytes

    @property
    def signed(self) -> bytes:
        return self.raw[:-_SIGNATURE_SIZE]

    @property
    def driver_version(self) -> str:
        return _ascii_field(self.opaque.get(_OPAQUE_DRIVER_VERSION, b""))

    @property
    def vbios_version(self) -> str:
        """'96.00.9f.00.01': the field is little-endian, the last byte is the OEM byte (nv-local-gpu-verifier's
        format_vbios_version)."""
        raw = self.opaque.get(_OPAQUE_VBIOS_VERSION, b"")
        if len(raw) != 8:
            return ""
        h = raw[::-1].hex()
        digits = h[8:] + h[6:8]
        return ".".join(digits[i:i + 2] for i in range(0, len(digits), 2))

    @property
    def fwid(self) -> bytes:
        return self.opaque.get(_OPAQUE_FWID, b"")


class GpuEvidenceError(ReasonedError):
    """GPU evidence that must not be trusted; `reason` is one of `REASONS`. Raised by the helpers, turned into a
    verdict by `verify_gpu_evidence`."""


def verify_gpu_evidence(ev: GpuEvidence, nonce: bytes, *, at: datetime, rims: Path | None,
                        policy: GpuCcPolicy, extra_rim_roots: Sequence[x509.Certificate] = ()) -> GpuVerdict:
    """Check one GPU's evidence against the challenge `nonce` (32 bytes) at time `at` (naive: UTC).

    `rims` is the RIM cache for this call (None: `policy.rim_cache_dir`). `extra_rim_roots` trusts further RIM
    signing roots beside NVIDIA's (an operator's own RIM signer; a test's): passed explicitly, never read from
    the evidence. Never raises: malformed, forged or stale evidence is a verdict with a failure status.
    """
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    authentic: GpuReport | None = None  # the report once its signature verified: only then are its versions shown
    try:
        if ev.cc_mode != "on":  # judged on the node's claim alone: a report beside it is not read
            status = "gpu_cc_devtools" if ev.cc_mode == "devtools" else "gpu_cc_off"
            why = "devtools mode lifts CC protections" if status == "gpu_cc_devtools" else "no CC protection"
            need = "required by policy" if policy.require_cc else "not required by policy"
            return GpuVerdict(uuid=ev.uuid, status=status, ok=not policy.require_cc,
                              detail=f"the node reports CC mode {ev.cc_mode[:32]!r} ({why}); CC is {need}")
        if not ev.report or not ev.certificate_chain:
            raise GpuEvidenceError("gpu_report_missing",
                                   "CC is on but the evidence has no attestation report or certificate chain")
        if len(nonce) != NONCE_SIZE:
            raise GpuEvidenceError("gpu_nonce_mismatch",
                                   f"the challenge nonce must be {NONCE_SIZE} bytes, not {len(nonce)}")
        try:
            raw = bytes.fromhex(ev.report)
        except ValueError:
            raise GpuEvidenceError("gpu_report_invalid", "the report is not hex") from None
        report = parse_report(raw)
        leaf = _verify_device_chain(ev.certificate_chain, at)
        _verify_signature(report, leaf)
        authentic = report
        if not hmac.compare_digest(report.nonce, nonce):
            raise GpuEvidenceError("gpu_nonce_mismatch", "the report was signed for another nonce")
        _check_fwid(report, leaf)
        if not report.driver_version or not report.vbios_version:
            raise GpuEvidenceError("gpu_report_invalid", "the report carries no driver or VBIOS version")
        checked, rim_note = _check_rims(report, rims if rims is not None else policy.rim_cache_dir, at, policy,
                                        extra_rim_roots)
    except GpuEvidenceError as exc:
        return _verdict(ev, authentic, exc.reason, exc.detail, checked=False)
    except Exception as exc:  # defence in depth: untrusted bytes reached a parser path we did not foresee
        log.exception("GPU evidence check failed unexpectedly", extra={"uuid": ev.uuid[:96]})
        return _verdict(ev, authentic, "gpu_report_invalid",
                        f"evidence could not be checked ({type(exc).__name__})", checked=False)
    detail = (f"report signed by a GPU whose certificate chains to NVIDIA's Device Identity CA, for this nonce; "
              f"{rim_note}; certificate revocation (OCSP) not checked offline")
    return _verdict(ev, authentic, VERIFIED, detail, checked=checked)


def _verdict(ev: GpuEvidence, report: GpuReport | None, status: str, detail: str, *, checked: bool) -> GpuVerdict:
    return GpuVerdict(uuid=ev.uuid, status=status, ok=status == VERIFIED,
                      driver_version=report.driver_version[:32] if report else "",
                      vbios_version=report.vbios_version[:32] if report else "",
                      measurements_checked=checked, detail=detail[:1024])


# ------------------------------------------------------------------------------------------------------ report


def parse_report(raw: bytes) -> GpuReport:
    """Parse the NVML attestation report (SPDM request + response), without judging it. Every length must add
    up to exactly the bytes given, or GpuEvidenceError("gpu_report_invalid")."""
    def bad(why: str) -> GpuEvidenceError:
        return GpuEvidenceError("gpu_report_invalid", f"malformed SPDM report: {why}")

    if not _REQUEST_SIZE + 8 + _SIGNATURE_SIZE <= len(raw) <= _MAX_REPORT:
        raise bad(f"{len(raw)} bytes")
    req, resp = raw[:_REQUEST_SIZE], raw[_REQUEST_SIZE:]
    if req[1] != _GET_MEASUREMENTS or resp[1] != _MEASUREMENTS:
        raise bad("not a GET_MEASUREMENTS request and MEASUREMENTS response")
    if req[0] != resp[0]:
        raise bad("request and response SPDM versions differ")
    count = resp[4]
    record_len = int.from_bytes(resp[5:8], "little")
    pos = 8
    record = resp[pos:pos + record_len]
    pos += record_len
    if len(record) != record_len:
        raise bad("measurement record truncated")
    measurements = _parse_record(record, count, bad)
    responder_nonce = resp[pos:pos + NONCE_SIZE]
    pos += NONCE_SIZE
    opaque_len = int.from_bytes(resp[pos:pos + 2], "little")
    pos += 2
    opaque_raw = resp[pos:pos + opaque_len]
    pos += opaque_len
    if len(opaque_raw) != opaque_len or len(resp) - pos != _SIGNATURE_SIZE:
        raise bad("lengths do not add up to the report size")
    return GpuReport(raw=raw, spdm_version=req[0], nonce=req[4:4 + NONCE_SIZE], responder_nonce=responder_nonce,
                     measurements=measurements, opaque=_parse_opaque(opaque_raw, bad),
                     signature=resp[pos:])


def _parse_record(record: bytes, count: int, bad: Callable[[str], GpuEvidenceError]) -> dict[int, bytes]:
    """Measurement blocks: index(1) spec(1) size(2 LE) then a DMTF measurement: type(1) size(2 LE) value."""
    out: dict[int, bytes] = {}
    pos = 0
    for _ in range(count):
        if pos + 4 > len(record):
            raise bad("measurement block truncated")
        index, spec, size = record[pos], record[pos + 1], int.from_bytes(record[pos + 2:pos + 4], "little")
        body = record[pos + 4:pos + 4 + size]
        pos += 4 + size
        if spec != _DMTF_SPEC or len(body) != size or size < 3:
            raise bad(f"measurement block {index} is not a DMTF measurement")
        value_size = int.from_bytes(body[1:3], "little")
        if 3 + value_size != size:
            raise bad(f"measurement block {index} has an inconsistent size")
        if index == 0 or index - 1 in out:
            raise bad(f"measurement block index {index} is invalid or repeated")
        out[index - 1] = body[3:]
    if pos != len(record):
        raise bad("measurement record has trailing bytes")
    return out


def _parse_opaque(data: bytes, bad: Callable[[str], GpuEvidenceError]) -> dict[int, bytes]:
    """Opaque data: (type(2 LE), size(2 LE), value) fields back to back."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise bad("opaque field truncated")
        kind, size = int.from_bytes(data[pos:pos + 2], "little"), int.from_bytes(data[pos + 2:pos + 4], "little")
        value = data[pos + 4:pos + 4 + size]
        pos += 4 + size
        if len(value) != size:
            raise bad(f"opaque field {kind} truncated")
        if kind in out:
            if kind in _OPAQUE_SINGLE:
                raise bad(f"opaque field {kind} repeated")
            continue
        out[kind] = value
    return out


def _ascii_field(value: bytes) -> str:
    text = value.split(b"\x00", 1)[0].strip()
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        return ""


def _verify_signature(report: GpuReport, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise GpuEvidenceError("gpu_cert_chain_invalid", "the device leaf key is not ECDSA P-384")
    r = int.from_bytes(report.signature[:48], "big")
    s = int.from_bytes(report.signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), report.signed, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise GpuEvidenceError("gpu_report_invalid",
                               "the report's signature does not verify with the device leaf key") from None


def _check_fwid(report: GpuReport, leaf: x509.Certificate) -> None:
    """The leaf certificate names the firmware it was issued to; the signed report says which firmware runs.
    A report without the field is accepted, as NVIDIA's verifier does (older firmware omits it)."""
    if not report.fwid:
        return
    ext = next((e for e in leaf.extensions if e.oid.dotted_string == _FWID_OID), None)
    value = ext.value.value if ext is not None and isinstance(ext.value, x509.UnrecognizedExtension) else b""
    cert_fwid = value[-_FWID_SIZE:] if value[-_FWID_SIZE - 2:-_FWID_SIZE] == b"\x04\x30" else b""
    if not cert_fwid or not hmac.compare_digest(cert_fwid, report.fwid):
        raise GpuEvidenceError("gpu_cert_chain_invalid",
                               "the firmware id in the device certificate is not the report's")


# -------------------------------------------------------------------------------------------------- certificates


def _verify_device_chain(pem: str, at: datetime) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise GpuEvidenceError("gpu_cert_chain_invalid", "the certificate chain is not PEM certificates") from None
    why = _chain_error(certs, (x509.load_pem_x509_certificate(_DEVICE_ROOT_PEM),), at)
    if why:
        raise GpuEvidenceError("gpu_cert_chain_invalid", f"device certificate chain: {why}")
    return certs[0]


def _chain_error(certs: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], at: datetime) -> str:
    """'' when certs[0] (the leaf) leads through certs[1:] to one of `roots`, each certificate issued by the next,
    every issuer a CA allowed to sign certificates, nothing unknown marked critical, all valid at `at`. The
    chain's own self-signed certificates are dropped: only `roots` are trusted. Done by hand, not with
    cryptography's PolicyBuilder, whose web-PKI profile rejects NVIDIA's RIM certificates (GeneralizedTime
    before 2050)."""
    if not certs or certs[0].issuer == certs[0].subject:
        return "no leaf certificate first"
    chain = [c for c in certs if c.issuer != c.subject]
    if len(chain) > _MAX_CHAIN:
        return f"{len(chain)} certificates"
    top = chain[-1]
    named = [r for r in roots if r.subject == top.issuer]
    if not named:
        return f"{top.issuer.rfc4514_string()[:120]} is not a pinned root"
    anchor = next((r for r in named if _issued(top, r)), None)
    if anchor is None:
        return f"{top.subject.rfc4514_string()[:120]} is not signed by the pinned {top.issuer.rfc4514_string()[:120]}"
    path = [*chain, anchor]
    for i, cert in enumerate(path):
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            return f"{cert.subject.rfc4514_string()[:120]} is not valid at {at.isoformat()}"
        if any(e.critical and isinstance(e.value, x509.UnrecognizedExtension) for e in cert.extensions):
            return f"{cert.subject.rfc4514_string()[:120]} has an unknown critical extension"
        if i == 0:
            continue
        if i < len(path) - 1 and not _issued(path[i - 1], cert):
            return f"{path[i - 1].subject.rfc4514_string()[:120]} is not signed by its issuer"
        if not _may_sign_certificates(cert, below=i - 1):
            return f"{cert.subject.rfc4514_string()[:120]} may not issue certificates"
    return ""


def _issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _may_sign_certificates(cert: x509.Certificate, *, below: int) -> bool:
    """A CA (basicConstraints cA, path length not exceeded by the `below` intermediates under it) whose key
    usage, where stated, includes keyCertSign."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca or (bc.path_length is not None and below > bc.path_length):
        return False
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


# ----------------------------------------------------------------------------------------------------------- RIMs


def rim_ids(report: GpuReport) -> tuple[str, str]:
    """The NVIDIA RIM service ids of the driver and VBIOS RIMs for this report (Hopper naming, as
    nv-local-gpu-verifier builds them): file names in the RIM cache. GpuEvidenceError("gpu_report_invalid") when
    the report's fields cannot form a safe file name (they come from the GPU, and reach the file system)."""
    driver = f"NV_GPU_DRIVER_GH100_{report.driver_version}"
    parts = [_ascii_field(report.opaque.get(k, b"")).upper()
             for k in (_OPAQUE_PROJECT, _OPAQUE_PROJECT_SKU, _OPAQUE_CHIP_SKU)]
    vbios = "NV_GPU_VBIOS_" + "_".join([*parts, report.vbios_version.replace(".", "").upper()])
    for rid in (driver, vbios):
        if not _RIM_ID_RE.fullmatch(rid) or ".." in rid or any(not p for p in parts):
            raise GpuEvidenceError("gpu_report_invalid",
                                   f"the report's version fields do not form a RIM id ({rid[:80]!r})")
    return driver, vbios


def _check_rims(report: GpuReport, cache: Path | None, at: datetime, policy: GpuCcPolicy,
                extra_roots: Sequence[x509.Certificate]) -> tuple[bool, str]:
    """(measurements compared, a phrase for the detail); raises `GpuEvidenceError` on any refusal."""
    driver_id, vbios_id = rim_ids(report)
    found = {rid: p for rid in (driver_id, vbios_id) if cache is not None and (p := _find_rim(cache, rid))}
    missing = [rid for rid in (driver_id, vbios_id) if rid not in found]
    if missing:
        where = "no RIM cache is configured" if cache is None else f"no RIM {', '.join(missing)} in the cache"
        if policy.allow_rim_unavailable:
            return False, f"measurements NOT checked ({where}; allowed by policy)"
        raise GpuEvidenceError("gpu_rim_unavailable", f"{where}; measurements cannot be checked offline")
    xml = _xml_libs()
    roots = (x509.load_pem_x509_certificate(_RIM_ROOT_PEM), *extra_roots)
    golden: dict[int, tuple[str, list[bytes]]] = {}
    for what, rid, version in (("driver", driver_id, report.driver_version),
                               ("VBIOS", vbios_id, report.vbios_version)):
        rim = _load_rim(xml, found[rid], roots, at, what)
        if rim.version.lower() != version.lower():
            raise GpuEvidenceError("gpu_rim_mismatch",
                                   f"the {what} RIM is for version {rim.version[:32]}, the report says {version}")
        for index, values in rim.active.items():
            if index in golden:
                raise GpuEvidenceError("gpu_rim_invalid", f"driver and VBIOS RIMs both claim measurement {index}")
            golden[index] = (what, values)
    mismatched = [f"{i} ({what})" for i, (what, values) in sorted(golden.items())
                  if report.measurements.get(i) not in values]
    if mismatched:
        raise GpuEvidenceError("gpu_rim_mismatch", "measurements differ from NVIDIA's reference values at index "
                                                   f"{', '.join(mismatched[:16])}")
    return True, (f"{len(golden)} measurements match the driver {report.driver_version} and VBIOS "
                  f"{report.vbios_version} RIMs")


def _find_rim(cache: Path, rid: str) -> Path | None:
    for suffix in _RIM_SUFFIXES:
        p = cache / f"{rid}{suffix}"
        if p.is_file():
            return p
    return None


@dataclass(frozen=True)
class _Rim:
    version: str
    active: dict[int, list[bytes]]  # measurement index -> accepted values


@dataclass(frozen=True)
class _XmlLibs:
    etree: ModuleType
    signxml: ModuleType


def _xml_libs() -> _XmlLibs:
    """lxml and signxml, loaded only when there is a RIM to check (the `gpu-cc` extra)."""
    try:
        return _XmlLibs(etree=importlib.import_module("lxml.etree"), signxml=importlib.import_module("signxml"))
    except ImportError:
        raise GpuEvidenceError("gpu_verifier_missing", "RIMs are cached but signxml / lxml (the gpu-cc extra) are "
                                                       "not installed, so their signatures cannot be checked") from None


def _load_rim(xml: _XmlLibs, path: Path, roots: Sequence[x509.Certificate], at: datetime, what: str) -> _Rim:
    """Read, authenticate and parse one RIM. Only the part the XML signature covers is read (signxml's
    `signed_xml`), so nothing can be slipped in beside the signed content."""
    def bad(why: str) -> GpuEvidenceError:
        return GpuEvidenceError("gpu_rim_invalid", f"the {what} RIM {path.name[:80]}: {why}")

    try:
        with path.open("rb") as f:
            data = f.read(_RIM_MAX_BYTES + 1)
    except OSError as exc:
        raise bad(f"unreadable ({exc.strerror})") from None
    if len(data) > _RIM_MAX_BYTES:
        raise bad("too large")
    if data.lstrip()[:1] == b"{":  # the RIM service's answer, saved as is
        try:
            data = base64.b64decode(json.loads(data)["rim"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise bad("JSON without a base64 'rim'") from None
    etree, signxml = xml.etree, xml.signxml
    try:
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
        doc = etree.fromstring(data, parser)
    except (etree.XMLSyntaxError, ValueError):
        raise bad("not XML") from None
    certs = []
    for el in doc.iter(f"{{{_DSIG_NS}}}X509Certificate"):
        try:
            certs.append(x509.load_der_x509_certificate(base64.b64decode("".join((el.text or "").split()))))
        except (ValueError, binascii.Error):
            raise bad("unreadable signing certificate") from None
    why = _chain_error(certs, roots, at)
    if why:
        raise bad(f"signing certificate chain: {why}")
    config = signxml.SignatureConfiguration(
        require_x509=True, expect_references=1, verification_time=at,
        signature_methods=frozenset({signxml.SignatureMethod.ECDSA_SHA384, signxml.SignatureMethod.ECDSA_SHA512}),
        digest_algorithms=frozenset({signxml.DigestAlgorithm.SHA384, signxml.DigestAlgorithm.SHA512}))
    try:
        signed = signxml.XMLVerifier().verify(doc, x509_cert=certs[0], expect_config=config).signed_xml
    except Exception as exc:  # signxml's own errors, and lxml's or cryptography's from inside it: all a refusal
        raise bad(f"signature does not verify ({type(exc).__name__}: {str(exc)[:160]})") from None
    return _parse_rim(signed, bad)


def _parse_rim(root: Any, bad: Callable[[str], GpuEvidenceError]) -> _Rim:
    meta = root.find(f"{{{_SWID_NS}}}Meta")
    payload = root.find(f"{{{_SWID_NS}}}Payload")
    if meta is None or payload is None:
        raise bad("no Meta or Payload")
    version = str(meta.get("colloquialVersion") or "")
    if not version:
        raise bad("no colloquialVersion")
    resources = payload.findall(f"{{{_SWID_NS}}}Resource")
    if not resources or len(resources) > _RIM_MAX_RESOURCES:
        raise bad(f"{len(resources)} measurements")
    active: dict[int, list[bytes]] = {}
    seen: set[int] = set()
    try:
        for r in resources:
            index, size, alternatives = int(r.get("index")), int(r.get("size")), int(r.get("alternatives"))
            if index in seen or not 0 <= index < 256 or not 0 < alternatives <= _RIM_MAX_ALTERNATIVES:
                raise bad(f"measurement {index} repeated or out of range")
            seen.add(index)
            if r.get("active") == "False":
                continue
            values = [bytes.fromhex(r.get(f"{{{_SHA384_NS}}}Hash{k}")) for k in range(alternatives)]
            if any(len(v) != size for v in values):
                raise bad(f"measurement {index} has a value of the wrong size")
            active[index] = values
    except (TypeError, ValueError):
        raise bad("malformed measurement") from None
    return _Rim(version=version, active=active)
