"""`qvm attest ...`: check TPM evidence without trusting qvm's servers, show it, write policies.

`check-quote` takes exactly the files `tpm2_quote` writes and `tpm2_checkquote` reads, and checks them with
`shared.tpm.quote.verify_quote`, the code the attestation verifier runs: a client (or an auditor) can
re-check any quote with qvm's rules, and cross-check qvm against tpm2-tools. `show` prints a piece of
evidence readably; `export` writes it as tpm2-tools files, so `tpm2_checkquote` can judge qvm's quotes
without any qvm code at all.

Exit codes: 0 a valid quote (or the requested output), 1 a quote that must not be trusted, 2 input that
cannot be read. Nothing here needs a TPM or a TPM software stack: only `struct`, `hashlib`, `cryptography`.

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

import contextlib
import json
import shlex
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.errors import QvmError
from shared.tpm.measurements import AgentMeasurement, InstanceMeasurement, entry_digest, parse_log, replay
from shared.tpm.quote import AK_REQUIRED, QuoteError, binding, verify_quote
from shared.tpm.structures import (
    CURVES,
    HASH_NAMES,
    HASH_SIZES,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    Alg,
    Attest,
    ObjectAttr,
    PcrSelection,
    PublicArea,
    parse_attest,
    parse_public,
    parse_signature,
)

__all__ = [
    "Evidence",
    "InputError",
    "attest_app",
    "load_evidence",
    "parse_pcr_list",
    "parse_pcr_serialized",
    "parse_pcr_values",
    "public_from_pem",
    "write_pcr_serialized",
]

attest_app = typer.Typer(help="TPM attestation: check quotes, show evidence, write policies.", no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

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


# ---------------------------------------------------------------- plumbing


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    """Every qvm error (unreadable file, unparseable structure or log) is one line and exit 2."""
    try:
        yield
    except QvmError as exc:
        _fail(str(exc))


def _read(path: Path, what: str, limit: int = MAX_INPUT) -> bytes:
    """Read a whole input file, bounded: a client runs this on files it was handed."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(f"{what} {path} is larger than {limit} bytes")
    return data


def _hex(value: str, what: str) -> bytes:
    text = value.strip().lower().removeprefix("0x")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InputError(f"{what} is not hex: {value[:80]!r}") from None


def _hash_alg(name: str) -> Alg:
    try:
        return HASH_BY_NAME[name.strip().lower()]
    except KeyError:
        raise InputError(f"hash algorithm {name!r} (one of {', '.join(HASH_BY_NAME)})") from None


def _alg_name(alg: int) -> str:
    try:
        return Alg(alg).name.lower()
    except ValueError:
        return f"0x{alg:04x}"


def _pcr_text(selections: Sequence[PcrSelection]) -> str:
    return " ".join(f"{_alg_name(s.hash_alg)}:{','.join(map(str, s.pcrs)) or '-'}" for s in selections) or "none"


# ---------------------------------------------------------------- tpm2-tools PCR files


def parse_pcr_list(text: str) -> list[PcrSelection]:
    """A tpm2-tools PCR list (`sha256:0,1,16+sha1:7`), as `tpm2_checkquote -l` takes it."""
    out = []
    for part in text.split("+"):
        bank, sep, indices = part.partition(":")
        if not sep:
            raise InputError(f"PCR list {text!r}: expected BANK:INDEX,INDEX,...")
        alg = _hash_alg(bank)
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
            raise InputError(f"PCR file: {_alg_name(alg)} PCR {i} has a {len(d)}-byte value")
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
            raise InputError(f"PCR list: no digest size known for bank {_alg_name(s.hash_alg)}")
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
                raise InputError(f"no {_alg_name(s.hash_alg)} value for quoted PCR {i}")
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


def _load_public(path: Path) -> bytes:
    """`-u` as tpm2_checkquote takes it: PEM when it looks like PEM, else a TPM2B_PUBLIC."""
    data = _read(path, "AK public key")
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
    return _hex(value, f"evidence {key!r}")


def load_evidence(path: Path) -> Evidence:
    """Read an evidence JSON file; every structural problem is an `InputError` (exit 2)."""
    raw = _read(path, "evidence", MAX_EVIDENCE)
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
        pcrs[index] = _hex(v, f"evidence PCR {index}")
    log = doc.get("log", [])
    if not isinstance(log, list):
        raise InputError("evidence 'log' is not a list")
    expected = _field_hex(doc, "expected_extra", required=False)
    nonce, key = _field_hex(doc, "nonce", required=False), _field_hex(doc, "key", required=False)
    if expected is None and nonce is not None:
        expected = binding(nonce, key) if key is not None else nonce  # qvm's binding, or a bare tpm2-tools nonce
    meta = {k: str(doc[k]) for k in ("challenge_id", "purpose", "instance_id", "job_id") if doc.get(k) is not None}
    return Evidence(ak, attest, sig, pcrs, log, expected, meta)


# ---------------------------------------------------------------- commands


def _verdict_line(attest: Attest, ak: PublicArea) -> str:
    c = attest.clock
    return (f"{ak.algorithm} AK, qualified signer {attest.qualified_signer.hex()}, "
            f"PCRs {_pcr_text(attest.selections)}, clock {c.clock} ms, resetCount {c.reset_count}, "
            f"restartCount {c.restart_count}, safe {'yes' if c.safe else 'no'}, "
            f"firmware {attest.firmware_version:016x}")


@attest_app.command("check-quote")
def check_quote(
    public: Annotated[Path, typer.Option("-u", "--public", help="AK public key: TPM2B_PUBLIC (tpm2_createak -u) "
                                                                "or PEM (the PEM's holder vouches it is an AK)")],
    message: Annotated[Path, typer.Option("-m", "--message", help="TPMS_ATTEST (tpm2_quote -m)")],
    signature: Annotated[Path, typer.Option("-s", "--signature", help="TPMT_SIGNATURE (tpm2_quote -s, tss format)")],
    pcr: Annotated[Path, typer.Option("-f", "--pcr", help="PCR values (tpm2_quote -o)")],
    hash_algorithm: Annotated[str, typer.Option("-g", "--hash-algorithm", help="Signature and PCR bank hash")]
    = "sha256",
    qualification: Annotated[str, typer.Option("-q", "--qualification", help="The expected extraData (hex); "
                                                                             "without it the quote must carry none")]
    = "",
    pcr_list: Annotated[str | None, typer.Option("-l", "--pcr-list", help="Selection for a `-F values` PCR file "
                                                                          "(sha256:0,1,16)")] = None,
) -> None:
    """Check a tpm2_quote's files with qvm's verifier code; exit 0 only for a valid quote."""
    with _clean_errors():
        alg = _hash_alg(hash_algorithm)
        extra = _hex(qualification, "qualification")
        ak_public = _load_public(public)
        attest = _read(message, "message")
        sig = _read(signature, "signature")
        pcr_data = _read(pcr, "PCR file")
        banks = parse_pcr_values(pcr_data, parse_pcr_list(pcr_list)) if pcr_list else parse_pcr_serialized(pcr_data)
    try:
        parsed = verify_quote(ak_public, attest, sig, extra_data=extra, pcr_values=banks.get(alg, {}), hash_alg=alg)
    except QuoteError as exc:
        console.print(f"[red]invalid quote:[/red] {escape(exc.reason)}: {escape(exc.detail)}", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"[green]valid quote[/green]: {escape(_verdict_line(parsed, parse_public(ak_public)))}",
                  soft_wrap=True)


@attest_app.command("show")
def show(
    evidence: Path,
    measurement_pcr: Annotated[int, typer.Option(help="The PCR the node-agent extends its log into")] = 15,
) -> None:
    """Print evidence readably: the quote, its signature, PCR values and the measurement log."""
    with _clean_errors():
        ev = load_evidence(evidence)
        parsed = parse_attest(ev.attest)
        sig = parse_signature(ev.signature)
        entries = parse_log(ev.log)
        ak = parse_public(ev.ak_public)
    about = ", ".join(f"{k} {v}" for k, v in ev.meta.items())
    quote = Table(title=escape(f"quote ({about})" if about else "quote"), show_header=False)
    quote.add_column("field", style="bold")
    quote.add_column("value", overflow="fold")
    generated = "TPM_GENERATED" if parsed.magic == TPM_GENERATED_VALUE else "[red]not TPM_GENERATED[/red]"
    kind = "quote" if parsed.type == TPM_ST_ATTEST_QUOTE else "[red]not a quote[/red]"
    c = parsed.clock
    rows = [
        ("magic", f"0x{parsed.magic:08x} {generated}"),
        ("type", f"0x{parsed.type:04x} {kind}"),
        ("qualified signer", parsed.qualified_signer.hex()),
        ("extraData", parsed.extra_data.hex() or "(empty)"),
        ("clock", f"{c.clock} ms, resetCount {c.reset_count}, restartCount {c.restart_count}, "
                  f"safe {'yes' if c.safe else '[red]no[/red]'}"),
        ("firmware", f"{parsed.firmware_version:016x}"),
        ("PCR selection", _pcr_text(parsed.selections)),
        ("pcrDigest", parsed.pcr_digest.hex()),
        ("signature", f"{_alg_name(sig.sig_alg)} with {_alg_name(sig.hash_alg)}"),
        ("AK", f"{ak.algorithm}, attributes 0x{ak.attributes:08x}, name {ak.name.hex()}"),
    ]
    for name, value in rows:
        quote.add_row(name, value)
    console.print(quote)

    quoted = {i for s in parsed.selections if s.hash_alg == Alg.SHA256 for i in s.pcrs}
    pcr_table = Table(title="PCR values (sha256)")
    for col in ("PCR", "value", "quoted"):
        pcr_table.add_column(col, overflow="fold")
    for i in sorted(ev.pcrs):
        pcr_table.add_row(str(i), ev.pcrs[i].hex(), "yes" if i in quoted else "no")
    console.print(pcr_table)

    log_table = Table(title=f"measurement log ({len(entries)} entries)")
    for col in ("#", "kind", "subject", "digests", "entry digest"):
        log_table.add_column(col, overflow="fold")
    for n, e in enumerate(entries):
        if isinstance(e, AgentMeasurement):
            subject = f"node {e.node_id}, agent {e.agent_version}"
            digests = f"agent {e.agent_sha256[:16]}…, config {e.config_sha256[:16]}…"
        else:
            assert isinstance(e, InstanceMeasurement)
            subject = f"instance {e.instance_id}, job {e.job_id}, vmm {e.vmm}"
            digests = f"image {e.image_manifest_sha256[:16]}…, key {e.public_key[:16]}…"
        log_table.add_row(str(n), e.kind, escape(subject), escape(digests), entry_digest(e).hex()[:16] + "…")
    console.print(log_table)
    if entries or measurement_pcr in ev.pcrs:
        replayed = replay(entries)
        same = ev.pcrs.get(measurement_pcr) == replayed
        console.print(f"log replays to {replayed.hex()}: "
                      + (f"[green]matches PCR {measurement_pcr}[/green]" if same
                         else f"[red]differs from PCR {measurement_pcr}[/red]"), soft_wrap=True)

    expected = ev.expected_extra
    try:
        verify_quote(ev.ak_public, ev.attest, ev.signature, pcr_values=ev.pcrs,
                     extra_data=parsed.extra_data if expected is None else expected)
    except QuoteError as exc:
        console.print(f"[red]invalid quote:[/red] {escape(exc.reason)}: {escape(exc.detail)}", soft_wrap=True)
        return
    note = " (freshness not checked: the file names no nonce or expected_extra)" if expected is None else ""
    console.print(f"[green]valid quote[/green]{escape(note)}", soft_wrap=True)


@attest_app.command("export")
def export(
    evidence: Path,
    directory: Annotated[Path, typer.Option("--dir", help="Where to write ak.pub, quote.msg, quote.sig, pcrs.bin")],
) -> None:
    """Write evidence as tpm2-tools files and print the `tpm2_checkquote` command that checks them."""
    with _clean_errors():
        ev = load_evidence(evidence)
        ak = parse_public(ev.ak_public)
        parsed = parse_attest(ev.attest)
        if parsed.type != TPM_ST_ATTEST_QUOTE:
            raise InputError(f"the attest is of type 0x{parsed.type:04x}, not a quote")
        pcrs = write_pcr_serialized(parsed.selections, {Alg.SHA256: ev.pcrs})
        files = {"ak.pub": ak.tpm2b(), "quote.msg": ev.attest, "quote.sig": ev.signature, "pcrs.bin": pcrs}
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (directory / name).write_bytes(data)
        except OSError as exc:
            raise InputError(f"cannot write to {directory}: {exc.strerror or exc}") from None
    extra = parsed.extra_data if ev.expected_extra is None else ev.expected_extra
    if ev.expected_extra is None:
        err.print("[yellow]warning:[/yellow] the evidence names no nonce or expected_extra; -q below is the "
                  "quote's own extraData, which checks nothing about freshness", soft_wrap=True)
    args = ["tpm2_checkquote", "-u", directory / "ak.pub", "-m", directory / "quote.msg",
            "-s", directory / "quote.sig", "-f", directory / "pcrs.bin", "-g", "sha256"]
    args += ["-q", extra.hex()] if extra else []
    console.print(shlex.join(map(str, args)), soft_wrap=True, markup=False)


@attest_app.command("policy")
def policy(
    images: Annotated[Path, typer.Option(help="Directory of signed image bundles to approve")],
    out: Annotated[Path, typer.Option(help="Where to write the policy (JSON)")],
    ek_ca: Annotated[Path | None, typer.Option(help="PEM bundle of TPM manufacturer CAs (EK certificates)")] = None,
    qemu: Annotated[str, typer.Option(help="QEMU binary to approve")] = "qemu-system-x86_64",
) -> None:
    """Write a policy approving this checkout's node-agent, the images in IMAGES and this machine's QEMU;
    review it before shipping it to the verifiers."""
    from services.attestation_verifier.policy_gen import local_policy

    with _clean_errors():
        if not images.is_dir():
            raise InputError(f"{images} is not a directory of image bundles")
        written = local_policy(images, ek_ca=ek_ca, qemu=qemu)
        try:
            out.write_text(written.model_dump_json(indent=2))
        except OSError as exc:
            raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
    console.print(f"wrote {out}: {len(written.images)} image(s), {len(written.vmms)} VMM binary(ies), "
                  f"EK certificates {'required' if written.require_ek_certificate else 'not required'}")
