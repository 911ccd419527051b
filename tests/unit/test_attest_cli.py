"""`qvm attest check-quote / show / export` without a TPM: real tpm2-tools 5.4 files as golden vectors,
software-signed quotes for the rest, and the tpm2-tools PCR file formats byte for byte."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from shared.cli.attest_files import (
    InputError,
    parse_pcr_list,
    parse_pcr_serialized,
    parse_pcr_values,
    public_from_pem,
    write_pcr_serialized,
)
from shared.cli.main import app
from shared.tpm.quote import verify_quote
from shared.tpm.structures import Alg, ObjectAttr, PcrSelection, parse_public
from tests.unit.test_tpm_fuzz import (
    AK,
    EXTRA,
    FUZZ,
    GOOD_ATTEST,
    GOOD_ENTRY,
    GOOD_SIG,
    KEY,
    NONCE,
    PCR_VALUES,
    REAL_AK,
    REAL_MSG,
    REAL_NONCE,
    REAL_PCRS,
    REAL_SIG,
    mutated,
    quote_attest,
    select,
    tpm2b,
)

# `tpm2_quote -l sha256:0,1,16 -o q.pcrs` (default -F serialized), 668 bytes, zlib + base64
REAL_PCR_FILE = zlib.decompress(base64.b64decode(
    "eNpjZGBg4GZgZmZgZBgwALKaGYgVKDaJGibM+yGyRX/BPqGL04/42vUxu0h5C0ool0WYdS80FZjwNOwtwyigEwAAw0oN3w=="))
REAL_AK_PEM = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEKxbA5fLic2yyY2KPIhB2wsfglPRj
D6MqPrOcwivg849TuosHvL17x/cVhWCnRNZrkQqH2aLebvUz50eJ9ulvcQ==
-----END PUBLIC KEY-----
"""
REAL_SELECTION = [PcrSelection(Alg.SHA256, (0, 1, 16))]


def qvm(*args: str | Path) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["attest", *map(str, args)])
    return result.exit_code, result.output


def write(tmp_path: Path, **files: bytes) -> dict[str, Path]:
    out = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out


# ---------------------------------------------------------------- tpm2-tools PCR files


def test_serialized_pcr_file_matches_tpm2_quote_byte_for_byte() -> None:
    assert len(REAL_PCR_FILE) == 132 + 4 + 532
    assert parse_pcr_serialized(REAL_PCR_FILE) == {Alg.SHA256: REAL_PCRS}
    assert write_pcr_serialized(REAL_SELECTION, {Alg.SHA256: REAL_PCRS}) == REAL_PCR_FILE


def test_more_than_eight_pcrs_span_digest_lists() -> None:
    values = {i: hashlib.sha256(bytes([i])).digest() for i in range(12)}
    data = write_pcr_serialized([PcrSelection(Alg.SHA256, tuple(range(12)))], {Alg.SHA256: values})
    assert len(data) == 132 + 4 + 2 * 532 and struct.unpack_from("<I", data, 132) == (2,)
    assert parse_pcr_serialized(data) == {Alg.SHA256: values}


def test_values_format_and_pcr_list() -> None:
    assert parse_pcr_list("sha256:16,0,1+sha1:7") == [PcrSelection(Alg.SHA256, (0, 1, 16)),
                                                       PcrSelection(Alg.SHA1, (7,))]
    raw = b"".join(REAL_PCRS[i] for i in (0, 1, 16))
    assert parse_pcr_values(raw, REAL_SELECTION) == {Alg.SHA256: REAL_PCRS}
    for bad in ("sha256", "md5:1", "sha256:x", "sha256:40", "sha256:"):
        with pytest.raises(InputError):
            parse_pcr_list(bad)
    with pytest.raises(InputError):
        parse_pcr_values(raw + b"\x00", REAL_SELECTION)


@FUZZ
@given(data=st.binary(max_size=700) | mutated(REAL_PCR_FILE))
def test_pcr_file_parser_only_raises_input_error(data: bytes) -> None:
    try:
        banks = parse_pcr_serialized(data)
    except InputError:
        return
    assert all(isinstance(v, bytes) for bank in banks.values() for v in bank.values())


@FUZZ
@given(pcrs=st.dictionaries(st.integers(0, 23), st.binary(min_size=32, max_size=32), min_size=1, max_size=24))
def test_pcr_file_round_trips(pcrs: dict[int, bytes]) -> None:
    data = write_pcr_serialized([PcrSelection(Alg.SHA256, tuple(sorted(pcrs)))], {Alg.SHA256: pcrs})
    assert parse_pcr_serialized(data) == {Alg.SHA256: pcrs}


# ---------------------------------------------------------------- check-quote


def test_check_quote_accepts_real_tpm2_tools_files(tmp_path: Path) -> None:
    f = write(tmp_path, pub=REAL_AK, pem=REAL_AK_PEM, msg=REAL_MSG, sig=REAL_SIG, pcrs=REAL_PCR_FILE)
    for ak in (f["pub"], f["pem"]):
        code, out = qvm("check-quote", "-u", ak, "-m", f["msg"], "-s", f["sig"], "-f", f["pcrs"], "-g", "sha256",
                        "-q", REAL_NONCE.hex())
        assert code == 0 and "valid quote" in out and "sha256:0,1,16" in out and "resetCount 2" in out, out
    code, out = qvm("check-quote", "-u", f["pub"], "-m", f["msg"], "-s", f["sig"], "-f", f["pcrs"], "-q", "00")
    assert code == 1 and out.startswith("invalid quote: nonce_mismatch: "), out
    code, out = qvm("check-quote", "-u", f["pub"], "-m", f["msg"], "-s", f["sig"], "-f", f["pcrs"],
                    "-q", REAL_NONCE.hex(), "-g", "sha384")
    assert code == 1 and "signature_algorithm_not_allowed" in out, out


@pytest.mark.parametrize(("change", "reason"), [
    ({"msg": REAL_MSG[:-1] + b"\x00"}, "signature_invalid"),
    ({"sig": REAL_SIG[:-1] + bytes([REAL_SIG[-1] ^ 1])}, "signature_invalid"),
    ({"sig": b"\x00\x18"}, "malformed_signature"),
    ({"pub": b"\x00\x02\x00\x23"}, "malformed_public"),
])
def test_check_quote_refuses_changed_files(tmp_path: Path, change: dict[str, bytes], reason: str) -> None:
    f = write(tmp_path, **{"pub": REAL_AK, "msg": REAL_MSG, "sig": REAL_SIG, "pcrs": REAL_PCR_FILE, **change})
    code, out = qvm("check-quote", "-u", f["pub"], "-m", f["msg"], "-s", f["sig"], "-f", f["pcrs"],
                    "-q", REAL_NONCE.hex())
    assert code == 1 and f"invalid quote: {reason}: " in out, out


@pytest.mark.parametrize(("files", "options", "message"), [
    ({}, {"-u": "absent"}, "cannot read AK public key"),
    ({"pcrs": REAL_PCR_FILE[:-1]}, {}, "PCR file is 667 bytes"),
    ({"pem": b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"}, {"-u": "pem"}, "not a PEM public key"),
    ({}, {"-q": "xyz"}, "qualification is not hex"),
    ({}, {"-g": "md5"}, "hash algorithm 'md5'"),
    ({}, {"-l": "sha256:0,1,16"}, "PCR file is 668 bytes; the PCR list needs 96"),
])
def test_check_quote_unreadable_input_is_one_line_exit_2(tmp_path: Path, files: dict[str, bytes],
                                                         options: dict[str, str], message: str) -> None:
    f = write(tmp_path, **{"pub": REAL_AK, "msg": REAL_MSG, "sig": REAL_SIG, "pcrs": REAL_PCR_FILE, **files})
    args: dict[str, str | Path] = {"-u": f["pub"], "-m": f["msg"], "-s": f["sig"], "-f": f["pcrs"],
                                   "-q": REAL_NONCE.hex()}
    for flag, value in options.items():
        args[flag] = f.get(value, tmp_path / value) if flag == "-u" else value
    code, out = qvm("check-quote", *[x for kv in args.items() for x in kv])
    assert code == 2 and out.startswith("error: ") and message in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) == 1, out


# ---------------------------------------------------------------- PEM keys


def test_pem_keys_become_ak_areas_that_verify() -> None:
    """Software keys stand in for TPM keys: ECC P-256 / P-384 (ECDSA) and RSA-2048 (RSASSA and RSA-PSS)."""
    pcrs = {15: PCR_VALUES[15], 16: PCR_VALUES[16]}
    for curve in (ec.SECP256R1(), ec.SECP384R1()):
        key = ec.generate_private_key(curve)
        pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        area = parse_public(public_from_pem(pem))
        assert area.has(ObjectAttr.RESTRICTED | ObjectAttr.SIGN_ENCRYPT | ObjectAttr.FIXEDTPM) and area.scheme == 0x10
        area_key = area.key()
        assert isinstance(area_key, ec.EllipticCurvePublicKey)
        assert area_key.public_numbers() == key.public_key().public_numbers()
        r, s = decode_dss_signature(key.sign(GOOD_ATTEST, ec.ECDSA(hashes.SHA256())))
        size = (curve.key_size + 7) // 8
        sig = struct.pack(">HH", Alg.ECDSA, Alg.SHA256) + tpm2b(r.to_bytes(size, "big")) + tpm2b(s.to_bytes(size, "big"))
        verify_quote(public_from_pem(pem), GOOD_ATTEST, sig, extra_data=EXTRA, pcr_values=pcrs)
    rsa_key = rsa.generate_private_key(65537, 2048)
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    assert parse_public(public_from_pem(pem)).algorithm == "rsa-2048"
    for alg, pad in ((Alg.RSASSA, padding.PKCS1v15()),
                     (Alg.RSAPSS, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH))):
        sig = struct.pack(">HH", alg, Alg.SHA256) + tpm2b(rsa_key.sign(GOOD_ATTEST, pad, hashes.SHA256()))
        verify_quote(public_from_pem(pem), GOOD_ATTEST, sig, extra_data=EXTRA, pcr_values=pcrs)


def test_pem_of_a_key_that_cannot_sign_quotes_is_refused() -> None:
    pem = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(InputError, match="cannot sign TPM quotes"):
        public_from_pem(pem)


# ---------------------------------------------------------------- show and export


def evidence(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "challenge_id": "c" * 32, "purpose": "node", "ak_public": AK.public.hex(), "attest": GOOD_ATTEST.hex(),
        "signature": GOOD_SIG.hex(), "pcrs": {str(i): v.hex() for i, v in PCR_VALUES.items()},
        "log": [GOOD_ENTRY], "nonce": NONCE.hex(), "key": KEY.hex(),
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


def test_show_prints_the_quote_the_log_and_a_verdict(tmp_path: Path) -> None:
    (tmp_path / "ev.json").write_text(json.dumps(evidence()))
    code, out = qvm("show", tmp_path / "ev.json")
    assert code == 0, out
    out = "".join(out.split())  # tables wrap long hex at the terminal's width (xdist workers differ)
    for expected in ("0xff544347 TPM_GENERATED", "0x8018 quote", EXTRA.hex()[:12], "123456 ms", "resetCount 1",
                     "sha256:15,16", "ecdsa with sha256", "ecc-p256", PCR_VALUES[15].hex()[:12], "node node-a",
                     "differs from PCR 15", "valid quote"):
        assert "".join(expected.split()) in out, (expected, out)
    (tmp_path / "ev.json").write_text(json.dumps(evidence(key="33" * 32)))
    code, out = qvm("show", tmp_path / "ev.json")
    assert code == 0 and "invalid quote: nonce_mismatch" in out, out
    (tmp_path / "ev.json").write_text(json.dumps(evidence(nonce=None, key=None)))
    code, out = qvm("show", tmp_path / "ev.json")
    assert code == 0 and "freshness not checked" in out, out


@pytest.mark.parametrize(("doc", "message"), [
    ("not json", "is not JSON"),
    ("[]", "is not a JSON object"),
    (json.dumps(evidence(attest=None)), "evidence has no 'attest'"),
    (json.dumps(evidence(attest="zz")), "evidence 'attest' is not hex"),
    (json.dumps(evidence(attest="ff54")), "malformed_attest"),
    (json.dumps(evidence(signature="0001")), "malformed_signature"),
    (json.dumps(evidence(ak_public="00")), "malformed_public"),
    (json.dumps(evidence(pcrs={"x": "00"})), "PCR index 'x'"),
    (json.dumps(evidence(pcrs=[])), "'pcrs' is not an object"),
    (json.dumps(evidence(log=[{"kind": "agent"}])), "malformed_log"),
    (json.dumps(evidence(log={})), "'log' is not a list"),
])
def test_show_bad_evidence_is_one_line_exit_2(tmp_path: Path, doc: str, message: str) -> None:
    (tmp_path / "ev.json").write_text(doc)
    code, out = qvm("show", tmp_path / "ev.json")
    assert code == 2 and out.startswith("error: ") and message in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) == 1, out


def test_export_writes_tpm2_tools_files_that_check_quote_accepts(tmp_path: Path) -> None:
    (tmp_path / "ev.json").write_text(json.dumps(evidence()))
    code, out = qvm("export", tmp_path / "ev.json", "--dir", tmp_path / "out")
    assert code == 0, out
    d = tmp_path / "out"
    assert parse_public((d / "ak.pub").read_bytes()).tpm2b() == (d / "ak.pub").read_bytes() == AK.public
    assert (d / "quote.msg").read_bytes() == GOOD_ATTEST and (d / "quote.sig").read_bytes() == GOOD_SIG
    assert parse_pcr_serialized((d / "pcrs.bin").read_bytes()) == {Alg.SHA256: PCR_VALUES}
    assert f"tpm2_checkquote -u {d / 'ak.pub'} -m {d / 'quote.msg'} -s {d / 'quote.sig'} -f {d / 'pcrs.bin'} " \
           f"-g sha256 -q {EXTRA.hex()}" in out
    code, out = qvm("check-quote", "-u", d / "ak.pub", "-m", d / "quote.msg", "-s", d / "quote.sig",
                    "-f", d / "pcrs.bin", "-q", EXTRA.hex())
    assert code == 0, out


def test_export_needs_every_quoted_pcr(tmp_path: Path) -> None:
    (tmp_path / "ev.json").write_text(json.dumps(evidence(pcrs={"15": PCR_VALUES[15].hex()})))
    code, out = qvm("export", tmp_path / "ev.json", "--dir", tmp_path / "out")
    assert code == 2 and "no sha256 value for quoted PCR 16" in out, out


def test_export_without_nonce_warns_and_uses_the_quotes_extra_data(tmp_path: Path) -> None:
    attest = quote_attest(b"", [select([15])], hashlib.sha256(PCR_VALUES[15]).digest())
    (tmp_path / "ev.json").write_text(json.dumps(evidence(nonce=None, key=None, attest=attest.hex(),
                                                          signature=AK.sign(attest).hex())))
    code, out = qvm("export", tmp_path / "ev.json", "--dir", tmp_path / "out")
    assert code == 0 and "warning" in out and "-q" not in out.splitlines()[-1], out
