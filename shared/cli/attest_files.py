"""The files `qvm attest` reads and writes: tpm2-tools PCR files, AK public keys, evidence files.

Every problem with an input is an `InputError` (exit code 2: never a verdict on a quote). Inputs are read
bounded: a client runs this on files it was handed. Nothing here needs a TPM or a TPM software stack.

tpm2-tools 5.x PCR files (`tpm2_quote -o`, `tpm2_pcrread -o`), found by experiment and in tpm2-tools' lib/pcr.c:

    serialized (the default, `-F serialized`): raw little-endian C structs of the tss2 headers
        TPML_PCR_SELECTION  132 bytes: u32 count, then 16 x TPMS_PCR_SELECTION of 8 bytes each
                            (u16 hash, u8 sizeofSelect, u8 pcrSelect[4], 1 padding byte)
        u32                 number of TPML_DIGEST blocks that follow (tpm2-tools holds at most 32)
        TPML_DIGEST         532 bytes each: u32 count (<= 8), then 8 x TPM2B_DIGEST of 66 bytes
                            (u16 size, u8 buffer[64])
      the digests, taken in order across the blocks, belong to the selected PCRs bank by bank, ascending.
    values (`-F values`): the selected digests concatenated, same order; only readable with the selection
      at hand (`tpm2_checkquote -l`, here `--pcr-list`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared.errors import QvmError
from shared.tpm.quote import AK_REQUIRED, binding
from shared.tpm.structures import CURVES, HASH_NAMES, HASH_SIZES, Alg, ObjectAttr, PcrSelection

__all__ = [
    "Evidence",
    "InputError",
    "alg_name",
    "hash_alg",
    "load_evidence",
    "load_public",
    "parse_hex",
    "parse_pcr_list",
    "parse_pcr_serialized",
    "parse_pcr_values",
    "public_from_pem",
    "read_input",
    "write_pcr_serialized",
]

MAX_INPUT = 1 << 20  # every tpm2-tools file is a few hundred bytes; evidence with a long log stays well below
MAX_EVIDENCE = 16 << 20
HASH_BY_NAME = {name: Alg(alg) for alg, name in HASH_NAMES.items()}
CURVE_IDS = {curve.name: curve_id for curve_id, curve in CURVES.items()}

# tss2 C struct sizes (tss2_tpm2_types.h: TPM2_NUM_PCR_BANKS 16, TPM2_PCR_SELECT_MAX 4, TPML_DIGEST holds 8)
_BANKS, _SELECT_MAX, _SEL_SIZE = 16, 4, 8
_SELECTION_SIZE = 4 + _BANKS * _SEL_SIZE  # 132
_DIGESTS_PER_LIST, _DIGEST_BUF = 8, 64
_DIGEST_LIST_SIZE = 4 + _DIGESTS_PER_LIST * (2 + _DIGEST_BUF)  # 532
_MAX_DIGEST_LISTS = 32  # tpm2_pcrs.pcr_values[TPM2_MAX_PCRS]


class InputError(QvmError):
    """An input file that cannot be read or parsed: exit code 2, never a verdict on the quote."""


def read_input(path: Path, what: str, limit: int = MAX_INPUT) -> bytes:
    """Read a whole input file, bounded: a client runs this on files it was handed."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(f"{what} {path} is larger than {limit} bytes")
    return data


def parse_hex(value: str, what: str) -> bytes:
    text = value.strip().lower().removeprefix("0x")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InputError(f"{what} is not hex: {value[:80]!r}") from None


def hash_alg(name: str) -> Alg:
    try:
        return HASH_BY_NAME[name.strip().lower()]
    except KeyError:
        raise InputError(f"hash algorithm {name!r} (one of {', '.join(HASH_BY_NAME)})") from None


def alg_name(alg: int) -> str:
    try:
        return Alg(alg).name.lower()
    except ValueError:
        return f"0x{alg:04x}"


# ---------------------------------------------------------------- tpm2-tools PCR files


def parse_pcr_list(text: str) -> list[PcrSelection]:
    """A tpm2-tools PCR list (`sha256:0,1,16+sha1:7`), as `tpm2_checkquote -l` takes it."""
    out = []
    for part in text.split("+"):
        bank, sep, indices = part.partition(":")
        if not sep:
            raise InputError(f"PCR list {text!r}: expected BANK:INDEX,INDEX,...")
        alg = hash_alg(bank)
        try:
            pcrs = sorted({int(i, 0) for i in indices.split(",") if i.strip()})
        except ValueError:
            raise InputError(f"PCR list {text!r}: indices are not numbers") from None
        if not pcrs or any(not 0 <= i < 8 * _SELECT_MAX for i in pcrs):
            raise InputError(f"PCR list {text!r}: indices must be 0..{8 * _SELECT_MAX - 1}")
        out.append(PcrSelection(alg, tuple(pcrs)))
    return out


def _assign(selections: Sequence[PcrSelection], digests: Sequence[bytes]) -> dict[int, dict[int, bytes]]:
    """Digests in file order to {bank: {pcr: digest}}, the order tpm2-tools writes and reads them."""
    slots = [(s.hash_alg, i) for s in selections for i in s.pcrs]
    if len(slots) != len(digests):
        raise InputError(f"PCR file holds {len(digests)} values for {len(slots)} selected PCRs")
    out: dict[int, dict[int, bytes]] = {}
    for (alg, i), d in zip(slots, digests, strict=True):
        if alg in HASH_SIZES and len(d) != HASH_SIZES[Alg(alg)]:
            raise InputError(f"PCR file: {alg_name(alg)} PCR {i} has a {len(d)}-byte value")
        out.setdefault(alg, {})[i] = d
    return out


def parse_pcr_serialized(data: bytes) -> dict[int, dict[int, bytes]]:
    """A PCR file in tpm2-tools' default `serialized` format (module docstring) as {bank: {pcr: digest}}."""
    if len(data) < _SELECTION_SIZE + 4:
        raise InputError(f"PCR file of {len(data)} bytes is too short for a serialized TPML_PCR_SELECTION")
    (count,) = struct.unpack_from("<I", data, 0)
    if not 0 < count <= _BANKS:
        raise InputError(f"PCR file selects {count} banks (1..{_BANKS})")
    selections = []
    for b in range(count):
        alg, size = struct.unpack_from("<HB", data, 4 + b * _SEL_SIZE)
        if size > _SELECT_MAX:
            raise InputError(f"PCR file: sizeofSelect {size} in bank {b}")
        bitmap = data[7 + b * _SEL_SIZE:7 + b * _SEL_SIZE + size]
        pcrs = tuple(i * 8 + bit for i, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1)
        selections.append(PcrSelection(alg, pcrs))
    (lists,) = struct.unpack_from("<I", data, _SELECTION_SIZE)
    if lists > _MAX_DIGEST_LISTS:
        raise InputError(f"PCR file announces {lists} digest lists (at most {_MAX_DIGEST_LISTS})")
    expected = _SELECTION_SIZE + 4 + lists * _DIGEST_LIST_SIZE
    if len(data) != expected:
        raise InputError(f"PCR file is {len(data)} bytes; {lists} digest list(s) make {expected}")
    digests = []
    for n in range(lists):
        base = _SELECTION_SIZE + 4 + n * _DIGEST_LIST_SIZE
        (k,) = struct.unpack_from("<I", data, base)
        if k > _DIGESTS_PER_LIST:
            raise InputError(f"PCR file: digest list {n} holds {k} digests (at most {_DIGESTS_PER_LIST})")
        for j in range(k):
            at = base + 4 + j * (2 + _DIGEST_BUF)
            (size,) = struct.unpack_from("<H", data, at)
            if size > _DIGEST_BUF:
                raise InputError(f"PCR file: digest of {size} bytes")
            digests.append(data[at + 2:at + 2 + size])
    return _assign(selections, digests)


def parse_pcr_values(data: bytes, selections: Sequence[PcrSelection]) -> dict[int, dict[int, bytes]]:
    """A PCR file in tpm2-tools' `values` format: bare digests, in the order of `selections`."""
    digests = []
    at = 0
    for s in selections:
        if s.hash_alg not in HASH_SIZES:
            raise InputError(f"PCR list: no digest size known for bank {alg_name(s.hash_alg)}")
        size = HASH_SIZES[Alg(s.hash_alg)]
        for _ in s.pcrs:
            digests.append(data[at:at + size])
            at += size
    if at != len(data):
        raise InputError(f"PCR file is {len(data)} bytes; the PCR list needs {at}")
    return _assign(selections, digests)


def write_pcr_serialized(selections: Sequence[PcrSelection], values: Mapping[int, Mapping[int, bytes]]) -> bytes:
    """The inverse of `parse_pcr_serialized`: exactly what `tpm2_quote -o` writes, so `tpm2_checkquote -f`
    reads it. `values` is {bank: {pcr: digest}} and must hold every selected PCR."""
    if not 0 < len(selections) <= _BANKS:
        raise InputError(f"{len(selections)} PCR banks selected (1..{_BANKS})")
    head = struct.pack("<I", len(selections))
    digests = []
    for s in selections:
        bitmap = bytearray(3)  # sizeofSelect 3: the 24 PCRs of a PC-client TPM, as tpm2-tools writes it
        for i in s.pcrs:
            if not 0 <= i < 24:
                raise InputError(f"PCR {i} does not fit a 3-byte selection")
            bitmap[i // 8] |= 1 << (i % 8)
            value = values.get(s.hash_alg, {}).get(i)
            if value is None or len(value) > _DIGEST_BUF:
                raise InputError(f"no {alg_name(s.hash_alg)} value for quoted PCR {i}")
            digests.append(value)
        head += struct.pack("<HB", s.hash_alg, 3) + bytes(bitmap) + b"\x00\x00"
    head += b"\x00" * (_SELECTION_SIZE - len(head))
    chunks = [digests[i:i + _DIGESTS_PER_LIST] for i in range(0, len(digests), _DIGESTS_PER_LIST)]
    if len(chunks) > _MAX_DIGEST_LISTS:
        raise InputError(f"{len(digests)} PCR values are more than tpm2-tools reads")
    out = head + struct.pack("<I", len(chunks))
    for chunk in chunks:
        block = struct.pack("<I", len(chunk)) + b"".join(
            struct.pack("<H", len(d)) + d.ljust(_DIGEST_BUF, b"\x00") for d in chunk)
        out += block.ljust(_DIGEST_LIST_SIZE, b"\x00")
    return out


# ---------------------------------------------------------------- keys


def public_from_pem(data: bytes) -> bytes:
    """A PEM public key (SubjectPublicKeyInfo, as `tpm2_readpublic -f pem` writes it) as a TPM2B_PUBLIC.

    A PEM key carries the key's numbers and nothing else: not whether it is restricted, fixedTPM or
    even a TPM key. `verify_quote` insists on an AK's attributes, so this builds the area with the
    attributes of an AK (restricted | sign | fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth)
    and a NULL scheme: whoever hands qvm a PEM key vouches that it is such a TPM-resident AK (the TPM's
    own magic in the quote is only unforgeable if it is). Its Name is not the TPM's Name of the key.
    """
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise InputError(f"not a PEM public key: {str(exc)[:120]}") from None
    attrs = AK_REQUIRED | ObjectAttr.USERWITHAUTH
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = CURVE_IDS.get(key.curve.name)
        if curve is None:
            raise InputError(f"EC curve {key.curve.name} is not a TPM curve qvm knows")
        size = (key.curve.key_size + 7) // 8
        nums = key.public_numbers()
        x, y = nums.x.to_bytes(size, "big"), nums.y.to_bytes(size, "big")
        area = (struct.pack(">HHIH", Alg.ECC, Alg.SHA256, attrs, 0)
                + struct.pack(">HHHH", Alg.NULL, Alg.NULL, curve, Alg.NULL)
                + struct.pack(">H", size) + x + struct.pack(">H", size) + y)
    elif isinstance(key, rsa.RSAPublicKey):
        pub = key.public_numbers()
        modulus = pub.n.to_bytes((key.key_size + 7) // 8, "big")
        exponent = 0 if pub.e == 65537 else pub.e  # the TPM writes 0 for the default exponent
        if exponent >= 1 << 32:
            raise InputError("RSA exponent does not fit a TPM key")
        area = (struct.pack(">HHIH", Alg.RSA, Alg.SHA256, attrs, 0)
                + struct.pack(">HHHI", Alg.NULL, Alg.NULL, key.key_size, exponent)
                + struct.pack(">H", len(modulus)) + modulus)
    else:
        raise InputError(f"{type(key).__name__} keys cannot sign TPM quotes")
    return struct.pack(">H", len(area)) + area


def load_public(path: Path) -> bytes:
    """`-u` as tpm2_checkquote takes it: PEM when it looks like PEM, else a TPM2B_PUBLIC."""
    data = read_input(path, "AK public key")
    if data.lstrip().startswith(b"-----BEGIN"):
        return public_from_pem(data)
    return data


# ---------------------------------------------------------------- evidence files


@dataclass(frozen=True)
class Evidence:
    """One evidence file: an AttestEvidence (hex fields) plus the AK's TPM2B_PUBLIC and, optionally,
    what the verifier expected in extraData (`expected_extra`, or `nonce` and `key` for qvm's binding)."""

    ak_public: bytes
    attest: bytes
    signature: bytes
    pcrs: dict[int, bytes]
    log: list[object]
    expected_extra: bytes | None
    meta: dict[str, str] = field(default_factory=dict)


def _field_hex(doc: Mapping[str, object], key: str, required: bool = True) -> bytes | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise InputError(f"evidence has no {key!r}")
        return None
    if not isinstance(value, str):
        raise InputError(f"evidence {key!r} is not a hex string")
    return parse_hex(value, f"evidence {key!r}")


def load_evidence(path: Path) -> Evidence:
    """Read an evidence JSON file; every structural problem is an `InputError` (exit 2)."""
    raw = read_input(path, "evidence", MAX_EVIDENCE)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"evidence {path} is not JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise InputError(f"evidence {path} is not a JSON object")
    ak, attest, sig = (_field_hex(doc, k) for k in ("ak_public", "attest", "signature"))
    assert ak is not None and attest is not None and sig is not None
    pcrs_doc = doc.get("pcrs", {})
    if not isinstance(pcrs_doc, dict):
        raise InputError("evidence 'pcrs' is not an object of index: hex value")
    pcrs = {}
    for k, v in pcrs_doc.items():
        try:
            index = int(k)
        except ValueError:
            raise InputError(f"evidence PCR index {str(k)[:20]!r} is not a number") from None
        if not isinstance(v, str):
            raise InputError(f"evidence PCR {index} is not a hex string")
        pcrs[index] = parse_hex(v, f"evidence PCR {index}")
    log = doc.get("log", [])
    if not isinstance(log, list):
        raise InputError("evidence 'log' is not a list")
    expected = _field_hex(doc, "expected_extra", required=False)
    nonce, key = _field_hex(doc, "nonce", required=False), _field_hex(doc, "key", required=False)
    if expected is None and nonce is not None:
        expected = binding(nonce, key) if key is not None else nonce  # qvm's binding, or a bare tpm2-tools nonce
    meta = {k: str(doc[k]) for k in ("challenge_id", "purpose", "instance_id", "job_id") if doc.get(k) is not None}
    return Evidence(ak, attest, sig, pcrs, log, expected, meta)
