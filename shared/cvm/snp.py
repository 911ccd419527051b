"""AMD SEV-SNP attestation reports: parse, check the VCEK/VLEK chain up to a pinned AMD root, check the report's
signature, and appraise it against a policy.

Trust comes only from the AMD roots pinned here (the SPKI SHA-256 of each product's ARK, `PINNED_ARK_SPKI_SHA256`)
and from roots a caller passes explicitly (`extra_roots`: a hardware fake in tests, an operator's own root). A chain
file never adds a root: its ARK is only accepted when its key is one of those.

Layout and field meanings follow AMD's "SEV Secure Nested Paging Firmware ABI Specification" (table
ATTESTATION_REPORT structure) and the VCEK certificate specification (the KDS extensions under 1.3.6.1.4.1.3704).

Every failure is a `CvmError` with a stable reason code (see `REASONS`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID
from pydantic import Field, field_validator

from shared.cvm.errors import CvmError
from shared.models import Frozen

__all__ = [
    "PINNED_ARK_SPKI_SHA256",
    "PRODUCTS",
    "REASONS",
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "GuestPolicy",
    "PlatformInfo",
    "SnpPolicy",
    "SnpReport",
    "SnpTcbMinimum",
    "SnpVerified",
    "TcbVersion",
    "VcekEndorsement",
    "VcekExtensions",
    "appraise_snp",
    "check_vcek_binding",
    "decode_tcb",
    "load_certificates",
    "load_report_bytes",
    "parse_report",
    "pinned_roots",
    "product_from_cpuid",
    "read_vcek_extensions",
    "verify_report_signature",
    "verify_snp",
    "verify_vcek_chain",
]

Product = Literal["Milan", "Genoa", "Turin"]
PRODUCTS: tuple[Product, ...] = ("Milan", "Genoa", "Turin")
SigningKey = Literal["VCEK", "VLEK"]

REPORT_SIZE = 0x4A0  # 1184 bytes, every version so far
SIGNED_SIZE = 0x2A0  # the signature covers bytes 0..0x2A0
_SIG_COMPONENT = 72  # r and s: little-endian, zero-padded to 72 bytes each

# Every reason code this module raises (stable: the CLI prints them, the verifier publishes them).
REASONS: frozenset[str] = frozenset(
    {
        "report_malformed",
        "report_signature_invalid",
        "report_product_mismatch",
        "signing_key_mismatch",
        "certificate_malformed",
        "vcek_chain_untrusted",
        "ark_not_pinned",
        "vlek_chain_required",
        "certificate_expired",
        "certificate_revoked",
        "crl_invalid",
        "vcek_tcb_mismatch",
        "vcek_chip_mismatch",
        "vcek_product_mismatch",
        "debug_enabled",
        "migration_agent_enabled",
        "smt_not_allowed",
        "abi_too_old",
        "tcb_too_old",
        "vmpl_mismatch",
        "measurement_not_allowed",
        "host_data_mismatch",
        "report_data_mismatch",
    }
)

# The pins: SHA-256 of each ARK's SubjectPublicKeyInfo (DER). The PEM files in roots/amd/ give the certificate
# around the key (name, validity); they are checked against these at load so that swapping a file cannot swap a
# root. Certificate (DER) SHA-256 fingerprints, for cross-checking against AMD's KDS (/vcek/v1/{product}/cert_chain):
#   ARK-Milan 69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd (from the vectors' Milan chain)
#   ARK-Genoa 4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1 (embedded as PEM in several public
#             SEV-SNP verifiers, identical bytes in each; self-signed RSA-4096, CN=ARK-Genoa, 2022-01-26..2047-01-26)
#   ARK-Turin 1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a (from the vectors' Turin chain)
PINNED_ARK_SPKI_SHA256: dict[Product, str] = {
    "Milan": "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9",
    "Genoa": "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831",
    "Turin": "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08",
}

# AMD signs ARK, ASK/ASVK, VCEK/VLEK and its CRLs with RSASSA-PSS, SHA-384, MGF1-SHA-384, salt 48 (the digest
# length; the certificates' PSS parameters say saltLength=48). Verifying with this exact padding rejects others.
_AMD_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)

# KDS certificate extensions (VCEK/VLEK).
_OID_STRUCT_VERSION = "1.3.6.1.4.1.3704.1.1"
_OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
_OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
_OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
_OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
_OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
_OID_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"
_OID_HWID = "1.3.6.1.4.1.3704.1.4"

_HEX_RE = re.compile(r"[0-9a-f]*")


def _fail(reason: str, detail: str) -> CvmError:
    return CvmError(reason, detail)


# --------------------------------------------------------------------------------------------------- report layout


@dataclass(frozen=True, slots=True)
class TcbVersion:
    """A TCB_VERSION word, decoded for the product that made it: the byte layout changed with Turin, so the same
    u64 means different security patch levels on Milan/Genoa and on Turin. `fmc` exists on Turin only."""

    raw: int
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    def __str__(self) -> str:
        fmc = f"fmc={self.fmc} " if self.fmc is not None else ""
        return f"{fmc}bl={self.bootloader} tee={self.tee} snp={self.snp} ucode={self.microcode}"


def decode_tcb(raw: int, product: Product | None) -> TcbVersion:
    """Milan/Genoa: byte0 bootloader, byte1 tee, bytes2-5 reserved, byte6 snp, byte7 microcode.
    Turin: byte0 fmc, byte1 bootloader, byte2 tee, byte3 snp, bytes4-6 reserved, byte7 microcode.
    An unknown product decodes as Milan/Genoa: only version-2 reports lack CPUID, and those predate Turin."""
    b = raw.to_bytes(8, "little")
    if product == "Turin":
        return TcbVersion(raw=raw, fmc=b[0], bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7])
    return TcbVersion(raw=raw, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])


@dataclass(frozen=True, slots=True)
class GuestPolicy:
    """The guest policy the owner launched with (report offset 0x08); the firmware enforced it at launch."""

    raw: int
    abi_minor: int  # bits 7:0, minimum firmware ABI the guest accepted
    abi_major: int  # bits 15:8
    smt_allowed: bool  # bit 16
    migrate_ma: bool  # bit 18: a migration agent may be associated
    debug: bool  # bit 19: the host may debug (read/write) guest memory
    single_socket: bool  # bit 20
    cxl_allowed: bool  # bit 21
    mem_aes_256_xts: bool  # bit 22
    rapl_disabled: bool  # bit 23
    ciphertext_hiding: bool  # bit 24
    page_swap_disabled: bool  # bit 25

    @classmethod
    def decode(cls, raw: int) -> GuestPolicy:
        def bit(n: int) -> bool:
            return bool(raw >> n & 1)

        return cls(
            raw=raw,
            abi_minor=raw & 0xFF,
            abi_major=raw >> 8 & 0xFF,
            smt_allowed=bit(16),
            migrate_ma=bit(18),
            debug=bit(19),
            single_socket=bit(20),
            cxl_allowed=bit(21),
            mem_aes_256_xts=bit(22),
            rapl_disabled=bit(23),
            ciphertext_hiding=bit(24),
            page_swap_disabled=bit(25),
        )


@dataclass(frozen=True, slots=True)
class PlatformInfo:
    """The platform's state when the report was made (offset 0x40), as opposed to what the guest asked for."""

    raw: int
    smt_enabled: bool  # bit 0
    tsme_enabled: bool  # bit 1
    ecc_enabled: bool  # bit 2
    rapl_disabled: bool  # bit 3
    ciphertext_hiding_enabled: bool  # bit 4
    alias_check_complete: bool  # bit 5
    tio_enabled: bool  # bit 7

    @classmethod
    def decode(cls, raw: int) -> PlatformInfo:
        def bit(n: int) -> bool:
            return bool(raw >> n & 1)

        return cls(
            raw=raw,
            smt_enabled=bit(0),
            tsme_enabled=bit(1),
            ecc_enabled=bit(2),
            rapl_disabled=bit(3),
            ciphertext_hiding_enabled=bit(4),
            alias_check_complete=bit(5),
            tio_enabled=bit(7),
        )


@dataclass(frozen=True, slots=True)
class SnpReport:
    """One ATTESTATION_REPORT, every field of the ABI table. `raw` keeps the exact bytes (the signature covers
    `raw[:SIGNED_SIZE]`); `product` is the one whose TCB layout decoded the TCB fields (None: Milan/Genoa layout)."""

    raw: bytes
    product: Product | None
    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: PlatformInfo
    author_key_en: bool
    mask_chip_key: bool
    signing_key: int  # 0 VCEK, 1 VLEK, 7 none
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None  # version 3+
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: TcbVersion
    launch_mit_vector: int | None  # version 5+
    current_mit_vector: int | None
    signature_r: int
    signature_s: int

    @property
    def signed_body(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def chip_id_masked(self) -> bool:
        """With MASK_CHIP_ID set the firmware writes zeros here, so there is no chip to compare the VCEK to."""
        return not any(self.chip_id)

    @property
    def signing_key_name(self) -> str:
        return {0: "VCEK", 1: "VLEK", 7: "none"}.get(self.signing_key, f"reserved({self.signing_key})")


def load_report_bytes(data: bytes) -> bytes:
    """Reports travel as raw bytes (the ioctl's output) or as hex text (files, logs, JSON): accept both, so no
    caller has to guess. Exactly REPORT_SIZE bytes is raw; anything else must be hex of exactly that size."""
    if len(data) == REPORT_SIZE:
        return bytes(data)
    try:
        raw = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise _fail("report_malformed", f"{len(data)} bytes: neither a raw report nor hex text") from None
    if len(raw) != REPORT_SIZE:
        raise _fail("report_malformed", f"the report is {len(raw)} bytes, expected {REPORT_SIZE}")
    return raw


def product_from_cpuid(family: int | None, model: int | None) -> Product | None:
    """Version-3+ reports carry the CPU's family and model, which name the product without trusting any
    certificate: family 19h models 0-Fh Milan, 10h-1Fh and A0h-AFh Genoa (with Bergamo/Siena); family 1Ah Turin."""
    if family is None or model is None:
        return None
    if family == 0x19 and model <= 0x0F:
        return "Milan"
    if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
        return "Genoa"
    if family == 0x1A and model <= 0x1F:
        return "Turin"
    return None


def _u32(raw: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", raw, off)[0])


def _u64(raw: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", raw, off)[0])


def _check_layout(raw: bytes, version: int) -> None:
    """The checks that make a report well-formed before any of it is believed: size, a known version and signature
    algorithm, the policy bit the ABI requires set, and an all-zero unsigned signature tail (one encoding per report,
    so nothing outside the signed bytes can vary)."""
    if len(raw) != REPORT_SIZE:
        raise _fail("report_malformed", f"the report is {len(raw)} bytes, expected {REPORT_SIZE}")
    if version < 2:
        raise _fail("report_malformed", f"report version {version} is not supported (2 or later)")
    algo = _u32(raw, 0x34)
    if algo != 1:
        raise _fail("report_malformed", f"signature algorithm {algo} is not ECDSA P-384 with SHA-384 (1)")
    if not _u64(raw, 0x08) >> 17 & 1:
        raise _fail("report_malformed", "guest policy bit 17 (reserved, must be one) is clear")
    if any(raw[SIGNED_SIZE + 2 * _SIG_COMPONENT :]):
        raise _fail("report_malformed", "the reserved bytes after the signature's r and s are not zero")


def parse_report(data: bytes, *, product: Product | None = None) -> SnpReport:
    """Parse a report (raw or hex). `product` chooses the TCB layout; without it a version-3+ report names its
    product by CPUID, and a version-2 report (pre-Turin) uses the Milan/Genoa layout. Nothing here is verified:
    `verify_snp` is the entry point that checks the signature and chain."""
    raw = load_report_bytes(data)
    version = _u32(raw, 0x00)
    _check_layout(raw, version)
    fam, mod, step = (raw[0x188], raw[0x189], raw[0x18A]) if version >= 3 else (None, None, None)
    prod = product or product_from_cpuid(fam, mod)
    key_info = _u32(raw, 0x48)
    return SnpReport(
        raw=raw,
        product=prod,
        version=version,
        guest_svn=_u32(raw, 0x04),
        policy=GuestPolicy.decode(_u64(raw, 0x08)),
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=_u32(raw, 0x30),
        signature_algo=_u32(raw, 0x34),
        current_tcb=decode_tcb(_u64(raw, 0x38), prod),
        platform_info=PlatformInfo.decode(_u64(raw, 0x40)),
        author_key_en=bool(key_info & 1),
        mask_chip_key=bool(key_info >> 1 & 1),
        signing_key=key_info >> 2 & 0b111,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        report_id_ma=raw[0x160:0x180],
        reported_tcb=decode_tcb(_u64(raw, 0x180), prod),
        cpuid_fam_id=fam,
        cpuid_mod_id=mod,
        cpuid_step=step,
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=decode_tcb(_u64(raw, 0x1E0), prod),
        current_build=raw[0x1E8],
        current_minor=raw[0x1E9],
        current_major=raw[0x1EA],
        committed_build=raw[0x1EC],
        committed_minor=raw[0x1ED],
        committed_major=raw[0x1EE],
        launch_tcb=decode_tcb(_u64(raw, 0x1F0), prod),
        launch_mit_vector=_u64(raw, 0x1F8) if version >= 5 else None,
        current_mit_vector=_u64(raw, 0x200) if version >= 5 else None,
        signature_r=int.from_bytes(raw[SIGNED_SIZE : SIGNED_SIZE + _SIG_COMPONENT], "little"),
        signature_s=int.from_bytes(raw[SIGNED_SIZE + _SIG_COMPONENT : SIGNED_SIZE + 2 * _SIG_COMPONENT], "little"),
    )


def verify_report_signature(report: SnpReport, key: ec.EllipticCurvePublicKey) -> None:
    """ECDSA P-384/SHA-384 over bytes 0..0x2A0 with the (already chain-verified) VCEK or VLEK key."""
    if report.mask_chip_key:
        raise _fail("report_signature_invalid", "MASK_CHIP_KEY is set: the firmware did not sign this report")
    try:
        signature = encode_dss_signature(report.signature_r, report.signature_s)
        key.verify(signature, report.signed_body, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise _fail("report_signature_invalid", "the report's signature does not verify with the VCEK") from None


# ----------------------------------------------------------------------------------------------------- certificates


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """PEM (one or more certificates) or a single DER certificate. AMD's VCEKs carry serial number 0, which
    `cryptography` parses with a deprecation warning; the warning is silenced here, where it is known and harmless."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if b"-----BEGIN" in data:
                return list(x509.load_pem_x509_certificates(data))
            return [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise _fail("certificate_malformed", f"not a DER or PEM certificate: {e}") from None


def _serial(cert: x509.Certificate) -> int:
    """The serial number, without the warning AMD's serial-0 VCEKs raise each time it is read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cert.serial_number


def _spki_sha256(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _load_resource(name: str) -> x509.Certificate:
    data = resources.files("shared.cvm").joinpath("roots", "amd", name).read_bytes()
    return load_certificates(data)[0]


@functools.cache
def pinned_roots() -> dict[Product, x509.Certificate]:
    """The shipped ARKs, each checked against its hard-coded key pin (a replaced file fails loudly, never trusts)."""
    roots: dict[Product, x509.Certificate] = {}
    for product in PRODUCTS:
        cert = _load_resource(f"ark-{product.lower()}.pem")
        if _spki_sha256(cert) != PINNED_ARK_SPKI_SHA256[product]:
            raise RuntimeError(f"roots/amd/ark-{product.lower()}.pem does not match the pinned ARK-{product} key")
        roots[product] = cert
    return roots


@functools.cache
def _shipped_asks() -> tuple[x509.Certificate, ...]:
    """The shipped ASKs, used when a caller has no chain; they are checked by signature like any other ASK."""
    return tuple(_load_resource(f"ask-{product.lower()}.pem") for product in PRODUCTS)


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """`issuer` issued `cert`: names chain, the issuer is a CA, and the signature is AMD's RSASSA-PSS/SHA-384."""
    if cert.issuer != issuer.subject:
        raise _fail("vcek_chain_untrusted", f"{what}: issuer {cert.issuer.rfc4514_string()} is not the next cert")
    try:
        ca = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise _fail("vcek_chain_untrusted", f"{what}: the issuing certificate is not a CA")
    _check_pss(cert.signature_algorithm_oid, cert.signature, cert.tbs_certificate_bytes, issuer.public_key(), what)


def _check_pss(oid: x509.ObjectIdentifier, sig: bytes, tbs: bytes, key: object, what: str) -> None:
    if oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(key, rsa.RSAPublicKey):
        raise _fail("vcek_chain_untrusted", f"{what}: not signed with RSASSA-PSS by an RSA key")
    try:
        key.verify(sig, tbs, _AMD_PSS, hashes.SHA384())
    except InvalidSignature:
        raise _fail("vcek_chain_untrusted", f"{what}: the signature does not verify") from None


# ---------------------------------------------------------------------------------------------- VCEK extensions


def _der_tlv(data: bytes, tag: int) -> bytes:
    """The value of one DER element with the expected tag that spans all of `data` (definite lengths only)."""
    if len(data) < 2 or data[0] != tag:
        raise ValueError(f"expected DER tag {tag:#x}")
    length, pos = data[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 2 or len(data) < 2 + count:
            raise ValueError("bad DER length")
        length, pos = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
    if pos + length != len(data):
        raise ValueError("DER length does not match the extension's size")
    return data[pos:]


def _der_u8(data: bytes) -> int:
    """A security patch level: a DER INTEGER that must fit a TCB byte (0..255)."""
    body = _der_tlv(data, 0x02)
    if not body or len(body) > 2 or body[0] & 0x80:
        raise ValueError("not a small non-negative INTEGER")
    value = int.from_bytes(body, "big")
    if value > 0xFF:
        raise ValueError("a security patch level above 255")
    return value


@dataclass(frozen=True, slots=True)
class VcekExtensions:
    """What AMD's KDS wrote into a VCEK/VLEK: the TCB it was derived for, the chip (VCEK only) and the product."""

    product_name: str
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None
    hwid: bytes | None

    @property
    def product_family(self) -> str:
        """`Milan-B0` -> `Milan`: the stepping suffix does not change the chain or the TCB layout."""
        return self.product_name.split("-", 1)[0]


def _ext_value(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def _hwid(raw: bytes | None) -> bytes | None:
    """KDS writes the chip id as the raw extension value (64 bytes; 8 on Turin); an OCTET STRING is accepted too."""
    if raw is None or len(raw) in (8, 64):
        return raw
    return _der_tlv(raw, 0x04)


def _spl(cert: x509.Certificate, oid: str) -> int | None:
    raw = _ext_value(cert, oid)
    return None if raw is None else _der_u8(raw)


def _required_spl(cert: x509.Certificate, oid: str) -> int:
    value = _spl(cert, oid)
    if value is None:
        raise ValueError(f"missing extension {oid}")
    return value


def read_vcek_extensions(cert: x509.Certificate) -> VcekExtensions:
    """Parse the KDS extensions minimally: only the ones compared with the report, each with a strict shape."""
    try:
        name_raw = _ext_value(cert, _OID_PRODUCT_NAME)
        if name_raw is None:
            raise ValueError("missing productName")
        return VcekExtensions(
            product_name=_der_tlv(name_raw, 0x16).decode("ascii"),
            bootloader=_required_spl(cert, _OID_BL_SPL),
            tee=_required_spl(cert, _OID_TEE_SPL),
            snp=_required_spl(cert, _OID_SNP_SPL),
            microcode=_required_spl(cert, _OID_UCODE_SPL),
            fmc=_spl(cert, _OID_FMC_SPL),
            hwid=_hwid(_ext_value(cert, _OID_HWID)),
        )
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail("certificate_malformed", f"VCEK extensions: {e}") from None


def check_vcek_binding(report: SnpReport, ext: VcekExtensions) -> None:
    """The VCEK is derived from one chip at one TCB: its extensions must name the report's REPORTED_TCB and CHIP_ID
    (a report claiming another TCB than its key was derived for would let old firmware pose as patched)."""
    tcb = report.reported_tcb
    pairs: list[tuple[str, int | None, int | None]] = [
        ("bootloader", ext.bootloader, tcb.bootloader),
        ("tee", ext.tee, tcb.tee),
        ("snp", ext.snp, tcb.snp),
        ("microcode", ext.microcode, tcb.microcode),
    ]
    if tcb.fmc is not None or ext.fmc is not None:
        pairs.append(("fmc", ext.fmc, tcb.fmc))
    for name, cert_value, report_value in pairs:
        if cert_value != report_value:
            raise _fail(
                "vcek_tcb_mismatch",
                f"{name}: the VCEK is for {cert_value}, the report's REPORTED_TCB says {report_value}",
            )
    if ext.hwid is None or report.chip_id_masked:
        return  # a VLEK names no chip; a masked CHIP_ID gives nothing to compare
    hwid, chip = ext.hwid, report.chip_id
    if not hmac.compare_digest(chip[: len(hwid)], hwid) or any(chip[len(hwid) :]):
        raise _fail("vcek_chip_mismatch", "the VCEK's hwID is not the report's CHIP_ID")


# ------------------------------------------------------------------------------------------------- chain verification


@dataclass(frozen=True, slots=True)
class VcekEndorsement:
    """A VCEK/VLEK whose chain verified to a trusted ARK, minus the time checks (done per call, since `at` moves):
    what `verify_snp` caches, keyed on the exact certificate bytes."""

    key: ec.EllipticCurvePublicKey
    kind: SigningKey
    product: Product
    extensions: VcekExtensions
    ark: x509.Certificate  # the trusted copy (pinned or extra), which signs the CRL
    validity: tuple[tuple[str, datetime, datetime], ...]  # (role, not before, not after) for VCEK, ASK, ARK
    serials: tuple[tuple[str, int], ...]  # (role, serial) for the CRL check

    def check_validity(self, at: datetime) -> None:
        if at.tzinfo is None:
            raise ValueError("`at` must be timezone-aware")
        for role, not_before, not_after in self.validity:
            if not not_before <= at <= not_after:
                raise _fail(
                    "certificate_expired",
                    f"the {role} is valid {not_before:%Y-%m-%d} to {not_after:%Y-%m-%d}, not at {at:%Y-%m-%d %H:%M}",
                )


def _signing_key_kind(cert: x509.Certificate) -> SigningKey:
    cn = _common_name(cert)
    if cn == "SEV-VCEK":
        return "VCEK"
    if cn == "SEV-VLEK":
        return "VLEK"
    raise _fail("certificate_malformed", f"the signing certificate is {cn!r}, neither SEV-VCEK nor SEV-VLEK")


def _split_chain(
    leaf: x509.Certificate, chain: list[x509.Certificate]
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """(ASK or ASVK, self-signed roots offered) from a chain file holding the intermediate and optionally the ARK,
    in either order. Anything else in it is refused: AMD's chain is exactly that."""
    if not 1 <= len(chain) <= 2:
        raise _fail("vcek_chain_untrusted", f"the chain holds {len(chain)} certificates, expected ASK and ARK")
    intermediates = [c for c in chain if c.subject == leaf.issuer and c.subject != c.issuer]
    roots = [c for c in chain if c.subject == c.issuer]
    if len(intermediates) != 1 or len(intermediates) + len(roots) != len(chain):
        raise _fail("vcek_chain_untrusted", f"the chain has no single issuer for {leaf.issuer.rfc4514_string()}")
    return intermediates[0], roots


def _trusted_roots(
    ask: x509.Certificate, offered: list[x509.Certificate], extra: tuple[x509.Certificate, ...]
) -> list[tuple[x509.Certificate, Product | None]]:
    """The trusted copies of the ARK that may have issued `ask`, with their products (None for an extra root that
    names none). An offered ARK counts only when its key is pinned or configured, and must itself be intact; with
    no ARK offered, every trusted root of the ASK's issuer name is a candidate."""
    trusted: dict[str, tuple[x509.Certificate, Product | None]] = {
        _spki_sha256(c): (c, _product_of_root(c)) for c in extra
    }
    for product, cert in pinned_roots().items():
        trusted[PINNED_ARK_SPKI_SHA256[product]] = (cert, product)
    if not offered:
        named = [found for found in trusted.values() if found[0].subject == ask.issuer]
        if not named:
            raise _fail("ark_not_pinned", f"no pinned AMD root is named {ask.issuer.rfc4514_string()}")
        return named
    matches = [(cert, trusted.get(_spki_sha256(cert))) for cert in offered]
    pinned = [(cert, found) for cert, found in matches if found is not None]
    if not pinned:
        raise _fail("ark_not_pinned", "the chain's ARK is not a pinned AMD root (a chain file never adds a root)")
    for cert, _ in pinned:
        _check_signed_by(cert, cert, "ARK (self-signature)")
    return [found for _, found in pinned]


def _anchor(
    ask: x509.Certificate, roots: list[tuple[x509.Certificate, Product | None]]
) -> tuple[x509.Certificate, Product | None]:
    """The trusted root that signed the ASK (its own self-signature checked too)."""
    error = _fail("ark_not_pinned", "no trusted root")
    for ark, product in roots:
        try:
            _check_signed_by(ark, ark, "ARK (self-signature)")
            _check_signed_by(ask, ark, "ASK by ARK")
        except CvmError as e:
            error = e
            continue
        return ark, product
    raise error


def _product_of_root(cert: x509.Certificate) -> Product | None:
    cn = _common_name(cert)
    for product in PRODUCTS:
        if cn == f"ARK-{product}":
            return product
    return None


def _resolve_product(root_product: Product | None, ext: VcekExtensions) -> Product:
    """The product is the one whose root anchors the chain; the VCEK's productName must agree with it."""
    named = next((p for p in PRODUCTS if p.lower() == ext.product_family.lower()), None)
    product = root_product or named
    if product is None or (named is not None and named != product):
        raise _fail(
            "vcek_product_mismatch", f"the VCEK says {ext.product_name!r}, its root is {root_product or 'unknown'}"
        )
    return product


def _default_chain(leaf: x509.Certificate, kind: SigningKey) -> list[x509.Certificate]:
    if kind == "VLEK":
        raise _fail("vlek_chain_required", "a VLEK needs its ASVK chain (not shipped): pass `chain`")
    asks = [c for c in _shipped_asks() if c.subject == leaf.issuer]
    if not asks:
        raise _fail("vcek_chain_untrusted", f"no shipped ASK is named {leaf.issuer.rfc4514_string()}")
    return asks


@functools.lru_cache(maxsize=256)
def _endorse(vcek: bytes, chain: bytes | None, extra_ders: tuple[bytes, ...]) -> VcekEndorsement:
    """The expensive part (three RSA-4096 verifications, certificate and extension parsing), cached on the exact
    input bytes: a VCEK changes only with a TCB update, so a busy verifier sees the same few keys all day.
    Failures are not cached (lru_cache stores only returns)."""
    certs = load_certificates(vcek)
    if len(certs) != 1:
        raise _fail("certificate_malformed", f"expected one VCEK certificate, got {len(certs)}")
    leaf = certs[0]
    kind = _signing_key_kind(leaf)
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise _fail("certificate_malformed", f"the {kind} key is not ECDSA P-384")
    chain_certs = load_certificates(chain) if chain is not None else _default_chain(leaf, kind)
    ask, offered_roots = _split_chain(leaf, chain_certs)
    extra = tuple(x509.load_der_x509_certificate(d) for d in extra_ders)
    ark, root_product = _anchor(ask, _trusted_roots(ask, offered_roots, extra))
    middle = "ASK" if kind == "VCEK" else "ASVK"
    _check_signed_by(leaf, ask, f"{kind} by {middle}")
    ext = read_vcek_extensions(leaf)
    if kind == "VCEK" and ext.hwid is None:
        raise _fail("certificate_malformed", "the VCEK has no hwID: it would bind the report to no chip")
    return VcekEndorsement(
        key=key,
        kind=kind,
        product=_resolve_product(root_product, ext),
        extensions=ext,
        ark=ark,
        validity=tuple(
            (role, c.not_valid_before_utc, c.not_valid_after_utc)
            for role, c in ((kind, leaf), (middle, ask), ("ARK", ark))
        ),
        serials=((kind, _serial(leaf)), (middle, _serial(ask))),
    )


@functools.lru_cache(maxsize=32)
def _revoked_serials(crl_data: bytes, ark_der: bytes) -> tuple[frozenset[int], datetime, datetime | None]:
    """Parse a KDS CRL (DER or PEM) and check it is the ARK's: (revoked serials, this update, next update)."""
    ark = x509.load_der_x509_certificate(ark_der)
    try:
        pem = b"-----BEGIN" in crl_data
        crl = x509.load_pem_x509_crl(crl_data) if pem else x509.load_der_x509_crl(crl_data)
    except ValueError as e:
        raise _fail("crl_invalid", f"not a DER or PEM CRL: {e}") from None
    if crl.issuer != ark.subject:
        raise _fail("crl_invalid", f"the CRL is issued by {crl.issuer.rfc4514_string()}, not the ARK")
    try:
        _check_pss(crl.signature_algorithm_oid, crl.signature, crl.tbs_certlist_bytes, ark.public_key(), "CRL")
    except CvmError as e:
        raise _fail("crl_invalid", e.detail) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        revoked = frozenset(r.serial_number for r in crl)
    return revoked, crl.last_update_utc, crl.next_update_utc


def _check_crl(endorsement: VcekEndorsement, crl: bytes, at: datetime) -> None:
    revoked, this_update, next_update = _revoked_serials(crl, endorsement.ark.public_bytes(serialization.Encoding.DER))
    if at < this_update or (next_update is not None and at > next_update):
        raise _fail("crl_invalid", f"the CRL covers {this_update:%Y-%m-%d} to {next_update or 'open'}, not {at}")
    for role, serial in endorsement.serials:
        if serial in revoked:
            raise _fail("certificate_revoked", f"the {role} (serial {serial:#x}) is on the ARK's CRL")


def verify_vcek_chain(
    vcek: bytes,
    chain: bytes | None = None,
    *,
    at: datetime,
    crl: bytes | None = None,
    extra_roots: Sequence[x509.Certificate] = (),
) -> VcekEndorsement:
    """Verify a VCEK/VLEK (DER or PEM) up to a trusted ARK at time `at`. `chain` is the ASK (or ASVK) and
    optionally the ARK, PEM or DER; None uses the ASK shipped for the product (VCEK only). The ARK must be pinned
    or in `extra_roots` (explicit configuration: tests' hardware fakes, an operator's own root): a chain file
    never adds a root. `crl`, if given, must be signed by the ARK and must not list the ASK or the VCEK."""
    extra_ders = tuple(c.public_bytes(serialization.Encoding.DER) for c in extra_roots)
    endorsement = _endorse(bytes(vcek), None if chain is None else bytes(chain), extra_ders)
    endorsement.check_validity(at)
    if crl is not None:
        _check_crl(endorsement, bytes(crl), at)
    return endorsement


# ------------------------------------------------------------------------------------------------------------ policy


class SnpTcbMinimum(Frozen):
    """The lowest security patch levels accepted in REPORTED_TCB (the TCB the VCEK was derived for)."""

    bootloader: int = Field(0, ge=0, le=255)
    tee: int = Field(0, ge=0, le=255)
    snp: int = Field(0, ge=0, le=255)
    microcode: int = Field(0, ge=0, le=255)
    fmc: int = Field(0, ge=0, le=255, description="Turin only; ignored for Milan/Genoa.")


class SnpPolicy(Frozen):
    """What a verified report must also say. The defaults are the safe ones: no debug, no migration agent, VMPL 0,
    and no measurement trusted at all: an empty `measurements` refuses every report unless `allow_any_measurement`
    is set explicitly (a policy someone forgot to fill in must not accept any guest image)."""

    allow_debug: bool = False
    allow_migration_agent: bool = False
    allow_smt: bool = True
    min_abi_major: int = Field(0, ge=0, le=255, description="Minimum firmware ABI (CURRENT_MAJOR).")
    min_abi_minor: int = Field(0, ge=0, le=255, description="Minimum firmware ABI minor, with min_abi_major.")
    min_tcb: SnpTcbMinimum = SnpTcbMinimum()
    vmpl: int = Field(0, ge=0, le=3, description="The VMPL the report must come from.")
    measurements: tuple[str, ...] = Field((), description="Allowed launch measurements, 96 hex digits each.")
    allow_any_measurement: bool = False
    host_data: str | None = Field(None, description="Required HOST_DATA, 64 hex digits.")

    @field_validator("measurements")
    @classmethod
    def _measurements_hex(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_hex_field(m, 48, "measurement") for m in value)

    @field_validator("host_data")
    @classmethod
    def _host_data_hex(cls, value: str | None) -> str | None:
        return None if value is None else _hex_field(value, 32, "host_data")


def _hex_field(value: str, size: int, name: str) -> str:
    norm = value.strip().lower()
    if len(norm) != 2 * size or not _HEX_RE.fullmatch(norm):
        raise ValueError(f"{name} must be {2 * size} hex digits")
    return norm


def _appraise_guest_policy(report: SnpReport, policy: SnpPolicy) -> None:
    if report.policy.debug and not policy.allow_debug:
        raise _fail("debug_enabled", "the guest policy lets the host debug the guest")
    ma_bound = report.report_id_ma != b"\xff" * 32
    if (report.policy.migrate_ma or ma_bound) and not policy.allow_migration_agent:
        raise _fail("migration_agent_enabled", "the guest policy allows a migration agent")
    # The guest policy bit says SMT may be on; PLATFORM_INFO says it is on. Refuse either when SMT is not allowed.
    if (report.policy.smt_allowed or report.platform_info.smt_enabled) and not policy.allow_smt:
        raise _fail("smt_not_allowed", "SMT is allowed by the guest policy or enabled on the platform")
    firmware = (report.current_major, report.current_minor)
    if firmware < (policy.min_abi_major, policy.min_abi_minor):
        raise _fail(
            "abi_too_old",
            f"firmware ABI {firmware[0]}.{firmware[1]} is below {policy.min_abi_major}.{policy.min_abi_minor}",
        )


def _appraise_tcb(report: SnpReport, minimum: SnpTcbMinimum) -> None:
    tcb = report.reported_tcb
    checks = [
        ("bootloader", tcb.bootloader, minimum.bootloader),
        ("tee", tcb.tee, minimum.tee),
        ("snp", tcb.snp, minimum.snp),
        ("microcode", tcb.microcode, minimum.microcode),
    ]
    if tcb.fmc is not None:
        checks.append(("fmc", tcb.fmc, minimum.fmc))
    for name, have, need in checks:
        if have < need:
            raise _fail("tcb_too_old", f"{name}: the reported TCB has {have}, the policy needs {need}")


def _check_report_data(report: SnpReport, expected: bytes) -> None:
    """REPORT_DATA binds the report to a fresh challenge; a shorter expectation is zero-padded to 64 bytes, the
    way a guest pads what it asks the firmware to sign."""
    if len(expected) > 64 or not hmac.compare_digest(report.report_data, expected.ljust(64, b"\0")):
        raise _fail("report_data_mismatch", "REPORT_DATA is not the expected challenge binding")


def appraise_snp(report: SnpReport, policy: SnpPolicy, *, report_data: bytes | None) -> None:
    """Check a (verified) report against `policy`; one reason code per check, in a fixed order."""
    _appraise_guest_policy(report, policy)
    _appraise_tcb(report, policy.min_tcb)
    if report.vmpl != policy.vmpl:
        raise _fail("vmpl_mismatch", f"the report comes from VMPL {report.vmpl}, the policy needs {policy.vmpl}")
    if not policy.allow_any_measurement and report.measurement.hex() not in policy.measurements:
        raise _fail("measurement_not_allowed", f"measurement {report.measurement.hex()} is not in the allow-list")
    if policy.host_data is not None and report.host_data.hex() != policy.host_data:
        raise _fail("host_data_mismatch", f"HOST_DATA is {report.host_data.hex()}, the policy needs {policy.host_data}")
    if report_data is not None:
        _check_report_data(report, report_data)


# --------------------------------------------------------------------------------------------------------- entry point


@dataclass(frozen=True, slots=True)
class SnpVerified:
    """A report whose signature, chain and binding verified (and, if a policy was given, that passed it)."""

    report: SnpReport
    product: Product
    signing_key: SigningKey

    def summary(self) -> dict[str, str]:
        r = self.report
        return {
            "product": self.product,
            "signing_key": self.signing_key,
            "version": str(r.version),
            "measurement": r.measurement.hex(),
            "policy": f"{r.policy.raw:#x}",
            "debug": str(r.policy.debug).lower(),
            "vmpl": str(r.vmpl),
            "reported_tcb": str(r.reported_tcb),
            "firmware": f"{r.current_major}.{r.current_minor}.{r.current_build}",
            "chip_id_prefix": "masked" if r.chip_id_masked else r.chip_id[:8].hex(),
            "report_data": r.report_data.hex(),
            "host_data": r.host_data.hex(),
        }


def _check_signing_key(report: SnpReport, kind: SigningKey) -> None:
    expected = 0 if kind == "VCEK" else 1
    if report.signing_key != expected:
        raise _fail("signing_key_mismatch", f"the report says it is signed by {report.signing_key_name}, not {kind}")


def verify_snp(
    report: bytes,
    vcek: bytes,
    chain: bytes | None = None,
    *,
    at: datetime,
    policy: SnpPolicy | None = None,
    report_data: bytes | None = None,
    crl: bytes | None = None,
    extra_roots: Sequence[x509.Certificate] = (),
) -> SnpVerified:
    """Verify an SEV-SNP report end to end, at time `at` (production passes now, tz-aware):

    the VCEK/VLEK chain to a pinned ARK (see `verify_vcek_chain`; cached per certificate bytes), the report's
    signature with that key (every call), the key's TCB and chip extensions against the report, the report's CPUID
    product against the chain's, then `report_data` and `policy` if given. Returns what was verified."""
    raw = load_report_bytes(report)
    endorsement = verify_vcek_chain(vcek, chain, at=at, crl=crl, extra_roots=extra_roots)
    parsed = parse_report(raw, product=endorsement.product)
    by_cpuid = product_from_cpuid(parsed.cpuid_fam_id, parsed.cpuid_mod_id)
    if by_cpuid is not None and by_cpuid != endorsement.product:
        raise _fail("report_product_mismatch", f"the report's CPUID is {by_cpuid}, its key is {endorsement.product}")
    _check_signing_key(parsed, endorsement.kind)
    verify_report_signature(parsed, endorsement.key)
    check_vcek_binding(parsed, endorsement.extensions)
    if policy is not None:
        appraise_snp(parsed, policy, report_data=report_data)
    elif report_data is not None:
        _check_report_data(parsed, report_data)
    return SnpVerified(report=parsed, product=endorsement.product, signing_key=endorsement.kind)
