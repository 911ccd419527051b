"""Pure-Python parsers for the TPM 2.0 wire structures a verifier reads: TPMS_ATTEST, TPMT_SIGNATURE and
TPM2B_PUBLIC / TPMT_PUBLIC (TCG TPM 2.0 Library, Part 2).

These run on the verifier and in a client's `qvm attest check-quote`, neither of which has (or should
need) a TPM stack, so they use only `struct`, `hashlib` and `cryptography`. Every input is hostile:
lengths are bounded before anything is read, trailing bytes are refused, and every failure is a
`TpmFormatError` with a stable reason (never an IndexError or struct.error).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared.errors import ReasonedError

__all__ = [
    "Alg",
    "Attest",
    "ClockInfo",
    "ObjectAttr",
    "PcrSelection",
    "PublicArea",
    "Signature",
    "TpmFormatError",
    "parse_attest",
    "parse_public",
    "parse_signature",
]

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
MAX_TPM2B = 1024  # no field a quote, signature or public area carries is larger (RSA-8192 modulus: 1024)
MAX_PCR_BANKS = 16  # TPML_PCR_SELECTION holds at most HASH_COUNT entries
MAX_SELECT_BYTES = 4  # 24 PCRs need 3; a few TPMs have 32


class TpmFormatError(ReasonedError):
    """A TPM structure that does not parse; `reason` is malformed_attest / malformed_signature / ..."""


class Alg(IntEnum):
    """TPM_ALG_ID values qvm knows."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    KEYEDHASH = 0x0008
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CFB = 0x0043


HASH_SIZES = {Alg.SHA1: 20, Alg.SHA256: 32, Alg.SHA384: 48, Alg.SHA512: 64}
HASH_NAMES = {Alg.SHA1: "sha1", Alg.SHA256: "sha256", Alg.SHA384: "sha384", Alg.SHA512: "sha512"}
CURVES: dict[int, ec.EllipticCurve] = {0x0003: ec.SECP256R1(), 0x0004: ec.SECP384R1(), 0x0005: ec.SECP521R1()}
CURVE_NAMES = {0x0003: "p256", 0x0004: "p384", 0x0005: "p521"}


class ObjectAttr(IntFlag):
    FIXEDTPM = 0x00000002
    STCLEAR = 0x00000004
    FIXEDPARENT = 0x00000010
    SENSITIVEDATAORIGIN = 0x00000020
    USERWITHAUTH = 0x00000040
    ADMINWITHPOLICY = 0x00000080
    NODA = 0x00000400
    ENCRYPTEDDUPLICATION = 0x00000800
    RESTRICTED = 0x00010000
    DECRYPT = 0x00020000
    SIGN_ENCRYPT = 0x00040000


class _Reader:
    """Bounds-checked big-endian reader over one buffer."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = bytes(buf)
        self.pos = 0
        self.what = what

    def fail(self, detail: str) -> TpmFormatError:
        return TpmFormatError(f"malformed_{self.what}", f"{detail} at byte {self.pos}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"needs {n} more bytes, {len(self.buf) - self.pos} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self, limit: int = MAX_TPM2B) -> bytes:
        n = self.u16()
        if n > limit:
            raise self.fail(f"TPM2B of {n} bytes exceeds {limit}")
        return self.take(n)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise self.fail(f"{len(self.buf) - self.pos} trailing bytes")


# ---------------------------------------------------------------- TPMS_ATTEST


@dataclass(frozen=True, slots=True)
class ClockInfo:
    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a hash bank and the PCR indices selected in it (ascending)."""

    hash_alg: int
    pcrs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Attest:
    """A parsed TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE (`magic`/`type` are checked by the verifier)."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: ClockInfo
    firmware_version: int
    selections: tuple[PcrSelection, ...]
    pcr_digest: bytes


def parse_attest(data: bytes) -> Attest:
    r = _Reader(data, "attest")
    magic, typ = r.u32(), r.u16()
    qualified_signer = r.tpm2b(2 + 64)
    extra = r.tpm2b(64)
    clock = ClockInfo(r.u64(), r.u32(), r.u32(), False)
    safe = r.u8()
    if safe > 1:
        raise r.fail(f"clockInfo.safe is {safe}, not a TPMI_YES_NO")
    clock = ClockInfo(clock.clock, clock.reset_count, clock.restart_count, bool(safe))
    firmware = r.u64()
    if typ != TPM_ST_ATTEST_QUOTE:  # other attestation types have other bodies: not parsed, not accepted
        return Attest(magic, typ, qualified_signer, extra, clock, firmware, (), b"")
    count = r.u32()
    if count > MAX_PCR_BANKS:
        raise r.fail(f"{count} PCR selections (at most {MAX_PCR_BANKS})")
    selections = []
    for _ in range(count):
        alg, size = r.u16(), r.u8()
        if size > MAX_SELECT_BYTES:
            raise r.fail(f"PCR select of {size} bytes")
        bitmap = r.take(size)
        pcrs = tuple(i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)
        selections.append(PcrSelection(alg, pcrs))
    digest = r.tpm2b(64)
    r.end()
    return Attest(magic, typ, qualified_signer, extra, clock, firmware, tuple(selections), digest)


# ---------------------------------------------------------------- TPMT_SIGNATURE


@dataclass(frozen=True, slots=True)
class Signature:
    sig_alg: int
    hash_alg: int
    r: int = 0  # ECDSA
    s: int = 0
    rsa: bytes = b""  # RSASSA / RSAPSS


def parse_signature(data: bytes) -> Signature:
    r = _Reader(data, "signature")
    alg = r.u16()
    if alg == Alg.ECDSA:
        hash_alg = r.u16()
        sig = Signature(alg, hash_alg, int.from_bytes(r.tpm2b(66), "big"), int.from_bytes(r.tpm2b(66), "big"))
    elif alg in (Alg.RSASSA, Alg.RSAPSS):
        hash_alg = r.u16()
        sig = Signature(alg, hash_alg, rsa=r.tpm2b(512))
    else:
        raise r.fail(f"signature algorithm 0x{alg:04x} is not ECDSA, RSASSA or RSAPSS")
    r.end()
    return sig


# ---------------------------------------------------------------- TPM2B_PUBLIC


@dataclass(frozen=True, slots=True)
class PublicArea:
    """A TPMT_PUBLIC of an RSA or ECC key, with the exact bytes it was parsed from (for its Name)."""

    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: int
    scheme: int
    scheme_hash: int
    curve: int  # ECC only
    key_bits: int  # RSA only
    exponent: int  # RSA only
    unique_x: bytes  # ECC x, or the RSA modulus
    unique_y: bytes  # ECC y
    raw: bytes  # the TPMT_PUBLIC bytes

    @property
    def name(self) -> bytes:
        """TPM Name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + hashlib.new(HASH_NAMES[Alg(self.name_alg)], self.raw).digest()

    def has(self, attrs: ObjectAttr) -> bool:
        return self.attributes & attrs == attrs

    @property
    def algorithm(self) -> str:
        """`ecc-p256`, `rsa-2048`, ... (what policies pin)."""
        if self.type == Alg.ECC:
            return f"ecc-{CURVE_NAMES.get(self.curve, hex(self.curve))}"
        return f"rsa-{self.key_bits}"

    def key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        try:
            if self.type == Alg.ECC:
                curve = CURVES[self.curve]
                return ec.EllipticCurvePublicNumbers(int.from_bytes(self.unique_x, "big"),
                                                     int.from_bytes(self.unique_y, "big"), curve).public_key()
            return rsa.RSAPublicNumbers(self.exponent or 65537, int.from_bytes(self.unique_x, "big")).public_key()
        except (KeyError, ValueError) as exc:
            raise TpmFormatError("malformed_public", f"not a usable public key: {exc}") from None

    def tpm2b(self) -> bytes:
        """This area as TPM2B_PUBLIC (what `tpm2_checkquote -u` and tpm2-pytss read)."""
        return struct.pack(">H", len(self.raw)) + self.raw


def parse_public(data: bytes) -> PublicArea:
    """Parse a TPM2B_PUBLIC (size-prefixed) or a bare TPMT_PUBLIC."""
    data = bytes(data)
    if len(data) >= 2 and struct.unpack(">H", data[:2])[0] == len(data) - 2:
        data = data[2:]
    r = _Reader(data, "public")
    typ, name_alg, attrs = r.u16(), r.u16(), r.u32()
    if typ not in (Alg.RSA, Alg.ECC):
        raise r.fail(f"key type 0x{typ:04x} is not RSA or ECC")
    if name_alg not in HASH_NAMES:
        raise r.fail(f"name algorithm 0x{name_alg:04x} is not supported")
    policy = r.tpm2b(64)
    symmetric = r.u16()
    if symmetric != Alg.NULL:
        r.u16()  # keyBits
        r.u16()  # mode
    scheme = r.u16()
    scheme_hash = 0
    if scheme not in (Alg.NULL, Alg.RSAES):  # RSAES is the one scheme without a hash
        scheme_hash = r.u16()
        if scheme == Alg.ECDAA:
            r.u16()  # count
    curve = bits = exponent = 0
    x = y = b""
    if typ == Alg.RSA:
        bits, exponent = r.u16(), r.u32()
        if bits not in (1024, 2048, 3072, 4096):
            raise r.fail(f"RSA key size {bits}")
        x = r.tpm2b(512)
        if len(x) not in (0, bits // 8):  # the declared size is what policies pin: it must be the real one
            raise r.fail(f"RSA modulus of {len(x)} bytes for a {bits}-bit key")
    else:
        curve = r.u16()
        if r.u16() != Alg.NULL:  # kdf scheme
            r.u16()
        x, y = r.tpm2b(66), r.tpm2b(66)
        size = {0x0003: 32, 0x0004: 48, 0x0005: 66}.get(curve)
        if size is not None and (len(x), len(y)) not in ((0, 0), (size, size)):
            raise r.fail(f"ECC point of {len(x)}+{len(y)} bytes for curve 0x{curve:04x}")
    r.end()
    return PublicArea(typ, name_alg, attrs, policy, symmetric, scheme, scheme_hash, curve, bits, exponent, x, y,
                      data)
