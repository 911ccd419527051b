"""Property tests: whatever bytes a node (or anyone) sends, the TPM parsers and `verify_quote` return a
result or raise their own error (TpmFormatError / QuoteError / LogError), never IndexError, struct.error,
ValueError or anything else; and a quote that was changed never verifies.

The structures are built by hand with `struct.pack` (TCG TPM 2.0 Library, Part 2), so these tests need
neither a TPM nor tpm2-pytss. `REAL_*` are bytes that tpm2-tools 5.4 wrote against swtpm.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shared.tpm.measurements import AgentMeasurement, InstanceMeasurement, LogError, entry_digest, parse_log
from shared.tpm.quote import QuoteError, binding, verify_quote
from shared.tpm.structures import (
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    Alg,
    Attest,
    PcrSelection,
    PublicArea,
    Signature,
    TpmFormatError,
    parse_attest,
    parse_public,
    parse_signature,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

AK_ATTRS = 0x00050072  # restricted | sign | userWithAuth | sensitiveDataOrigin | fixedParent | fixedTPM
NULL = 0x0010

# tpm2_createak -G ecc -g sha256 -s ecdsa -u ak.pub -n ak.name; tpm2_pcrextend 16:sha256=aa..aa;
# tpm2_quote -l sha256:0,1,16 -q 0011223344 -m q.msg -s q.sig (swtpm 0.x, tpm2-tools 5.4)
REAL_AK = bytes.fromhex(
    "00580023000b00050072000000100018000b0003001000202b16c0e5f2e2736cb263628f221076c2c7e094f4630fa32a3eb39cc22"
    "be0f38f002053ba8b07bcbd7bc7f7158560a744d66b910a87d9a2de6ef533e74789f6e96f71")
REAL_AK_NAME = bytes.fromhex("000bd246da847e4c31b7d16f4437cbfda926f44d53dafdb6d5521fafd84887920b76")
REAL_MSG = bytes.fromhex(
    "ff54434780180022000b14a7534ebed4425edf438c5613b86dde39108c621b3ad3950a720a7590e5caff00050011223344000000"
    "0000004bae000000020000000001201910230016363600000001000b030300010020ad5b17d50a25958f81c502475962326d1c65"
    "40a1213cf89e21755d3be1eafa96")
REAL_SIG = bytes.fromhex(
    "0018000b002047add305af6880b3da2c31a7477c9ca15dc54b657b3359ab1c44e153bcd326ff002032ef0aca7419d7de6711ba61"
    "3fa0f64484c3429dec18103c8e24c6573738fab9")
REAL_NONCE = bytes.fromhex("0011223344")
REAL_PCRS = {0: bytes(32), 1: bytes(32), 16: hashlib.sha256(bytes(32) + b"\xaa" * 32).digest()}


# ---------------------------------------------------------------- builders


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def select(pcrs: Sequence[int], alg: int = Alg.SHA256, size: int = 3) -> bytes:
    """One TPMS_PCR_SELECTION."""
    bitmap = bytearray(size)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    return struct.pack(">HB", alg, size) + bytes(bitmap)


def quote_attest(extra: bytes, selections: Sequence[bytes], digest: bytes, *,
                 signer: bytes = b"\x00\x0b" + b"\x5a" * 32, clock: int = 123_456, reset: int = 1, restart: int = 2, safe: int = 1,
                 firmware: int = 0x2019102300163636, magic: int = TPM_GENERATED_VALUE,
                 typ: int = TPM_ST_ATTEST_QUOTE) -> bytes:
    """A TPMS_ATTEST for TPM2_Quote: header, clockInfo, firmware, then TPMS_QUOTE_INFO."""
    return (struct.pack(">IH", magic, typ) + tpm2b(signer) + tpm2b(extra)
            + struct.pack(">QIIBQ", clock, reset, restart, safe, firmware)
            + struct.pack(">I", len(selections)) + b"".join(selections) + tpm2b(digest))


def ecc_public(x: bytes, y: bytes, *, attrs: int = AK_ATTRS, scheme: int = Alg.ECDSA, curve: int = 0x0003,
               name_alg: int = Alg.SHA256) -> bytes:
    """A TPMT_PUBLIC of an ECC signing key (no symmetric, the given scheme with SHA-256, no KDF)."""
    scheme_part = struct.pack(">HH", scheme, Alg.SHA256) if scheme != NULL else struct.pack(">H", NULL)
    return (struct.pack(">HHI", Alg.ECC, name_alg, attrs) + tpm2b(b"") + struct.pack(">H", NULL) + scheme_part
            + struct.pack(">HH", curve, NULL) + tpm2b(x) + tpm2b(y))


def ecdsa_signature(r: int, s: int, hash_alg: int = Alg.SHA256, size: int = 32) -> bytes:
    return struct.pack(">HH", Alg.ECDSA, hash_alg) + tpm2b(r.to_bytes(size, "big")) + tpm2b(s.to_bytes(size, "big"))


@dataclass(frozen=True)
class SoftAk:
    """A software stand-in for a TPM's AK: signs whatever attest a test builds, so the checks after the
    signature (magic, nonce, selection, pcrDigest) are reached with arbitrary content."""

    key: ec.EllipticCurvePrivateKey
    public: bytes  # TPM2B_PUBLIC

    def sign(self, attest: bytes) -> bytes:
        r, s = decode_dss_signature(self.key.sign(attest, ec.ECDSA(hashes.SHA256())))
        return ecdsa_signature(r, s)


def soft_ak(secret: int = 0x5EED) -> SoftAk:
    key = ec.derive_private_key(secret, ec.SECP256R1())
    nums = key.public_key().public_numbers()
    return SoftAk(key, tpm2b(ecc_public(nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big"))))


AK = soft_ak()
AK_XY = parse_public(AK.public).unique_x, parse_public(AK.public).unique_y
NONCE, KEY = b"\x11" * 32, b"\x22" * 32
EXTRA = binding(NONCE, KEY)
PCR_VALUES = {15: hashlib.sha256(b"measured").digest(), 16: bytes(32)}
GOOD_ATTEST = quote_attest(EXTRA, [select([15, 16])], hashlib.sha256(PCR_VALUES[15] + PCR_VALUES[16]).digest())
GOOD_SIG = AK.sign(GOOD_ATTEST)
GOOD_ENTRY: dict[str, Any] = AgentMeasurement(node_id="node-a", agent_version="1.0", agent_sha256="a" * 64,
                                              config_sha256="b" * 64, config={"vmm": "qemu"}).model_dump(mode="json")
GOOD_INSTANCE: dict[str, Any] = InstanceMeasurement(
    instance_id="i1", job_id="j1", image_manifest_sha256="1" * 64, kernel_sha256="2" * 64, initrd_sha256="3" * 64,
    rootfs_sha256="4" * 64, cmdline="console=ttyS0", vmm="qemu", vmm_sha256="5" * 64,
    security_policy_sha256="6" * 64, public_key="7" * 64).model_dump(mode="json")


def verify(ak: bytes = AK.public, attest: bytes = GOOD_ATTEST, sig: bytes = GOOD_SIG, *, extra: bytes = EXTRA,
           pcrs: dict[int, bytes] | None = None, required: Sequence[int] = (15,)) -> Attest:
    return verify_quote(ak, attest, sig, extra_data=extra, pcr_values=PCR_VALUES if pcrs is None else pcrs,
                        required_pcrs=required)


# ---------------------------------------------------------------- golden structures


def test_ecc_p256_public_parses_and_names() -> None:
    nums = AK.key.public_key().public_numbers()
    area = ecc_public(nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big"))
    for data in (area, tpm2b(area)):  # bare TPMT_PUBLIC and TPM2B_PUBLIC
        pub = parse_public(data)
        assert (pub.type, pub.name_alg, pub.attributes, pub.curve) == (Alg.ECC, Alg.SHA256, AK_ATTRS, 0x0003)
        assert (pub.scheme, pub.scheme_hash, pub.algorithm) == (Alg.ECDSA, Alg.SHA256, "ecc-p256")
        assert pub.raw == area and pub.tpm2b() == tpm2b(area)
        assert pub.name == b"\x00\x0b" + hashlib.sha256(area).digest()
        key = pub.key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.public_numbers() == nums


def test_real_tpm2_tools_ak_name_matches() -> None:
    """The Name tpm2_createak -n wrote for its key is the one qvm computes from tpm2_createak -u."""
    pub = parse_public(REAL_AK)
    assert pub.name == REAL_AK_NAME
    assert pub.algorithm == "ecc-p256"


def test_quote_attest_parses_to_its_fields() -> None:
    digest = bytes(range(32))
    signer = b"\x00\x0b" + bytes(range(100, 132))
    data = quote_attest(b"\xab" * 32, [select([0, 7, 15, 23])], digest, signer=signer, clock=0x1122334455,
                        reset=7, restart=9, safe=0, firmware=0x0102030405060708)
    a = parse_attest(data)
    assert (a.magic, a.type) == (TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE)
    assert a.qualified_signer == signer and a.extra_data == b"\xab" * 32
    assert (a.clock.clock, a.clock.reset_count, a.clock.restart_count, a.clock.safe) == (0x1122334455, 7, 9, False)
    assert a.firmware_version == 0x0102030405060708
    assert a.selections == (PcrSelection(Alg.SHA256, (0, 7, 15, 23)),)
    assert a.pcr_digest == digest


def test_duplicate_bank_selection_parses_to_two_selections() -> None:
    """Parsing keeps a duplicated bank (the verifier refuses it, with its own reason)."""
    data = quote_attest(EXTRA, [select([15]), select([16])], bytes(32))
    a = parse_attest(data)
    assert a.selections == (PcrSelection(Alg.SHA256, (15,)), PcrSelection(Alg.SHA256, (16,)))
    with pytest.raises(QuoteError) as exc:
        verify(attest=data, sig=AK.sign(data))
    assert exc.value.reason == "pcr_selection_duplicate"


def test_real_tpm2_tools_quote_verifies() -> None:
    a = verify_quote(REAL_AK, REAL_MSG, REAL_SIG, extra_data=REAL_NONCE, pcr_values=REAL_PCRS, required_pcrs=(16,))
    assert a.selections == (PcrSelection(Alg.SHA256, (0, 1, 16)),)
    assert (a.clock.clock, a.clock.reset_count, a.clock.restart_count, a.clock.safe) == (0x4BAE, 2, 0, True)
    sig = parse_signature(REAL_SIG)
    assert (sig.sig_alg, sig.hash_alg) == (Alg.ECDSA, Alg.SHA256)


def test_soft_quote_verifies_and_each_check_has_its_reason() -> None:
    assert verify().extra_data == EXTRA
    cases: list[tuple[str, dict[str, Any]]] = [
        ("nonce_mismatch", {"extra": binding(NONCE, b"\x33" * 32)}),
        ("pcr_digest_mismatch", {"pcrs": {**PCR_VALUES, 16: b"\x01" * 32}}),
        ("pcr_values_missing", {"pcrs": {15: PCR_VALUES[15]}}),
        ("pcr_selection_incomplete", {"required": (15, 17)}),
        ("signature_invalid", {"sig": soft_ak(7).sign(GOOD_ATTEST)}),
        ("signature_invalid", {"attest": GOOD_ATTEST[:-1] + bytes([GOOD_ATTEST[-1] ^ 1])}),
        ("ak_not_restricted", {"ak": tpm2b(ecc_public(*AK_XY, attrs=0x00040072))}),
        ("malformed_public", {"ak": b"\x00\x01\x02"}),
    ]
    for reason, kwargs in cases:
        with pytest.raises(QuoteError) as exc:
            verify(**kwargs)
        assert exc.value.reason == reason, (reason, exc.value)
    other = quote_attest(EXTRA, [select([15, 16]), select([15], Alg.SHA1)], bytes(32))
    with pytest.raises(QuoteError, match="pcr_bank_not_allowed"):
        verify(attest=other, sig=AK.sign(other))
    not_quote = quote_attest(EXTRA, [select([15, 16])], bytes(32), magic=0xFF544348)
    with pytest.raises(QuoteError, match="not_a_quote"):
        verify(attest=not_quote, sig=AK.sign(not_quote))


def test_golden_log_entries_parse() -> None:
    entries = parse_log([GOOD_ENTRY, GOOD_INSTANCE])
    assert [e.kind for e in entries] == ["agent", "instance"]
    assert len(entry_digest(entries[0])) == 32


# ---------------------------------------------------------------- strategies


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` with a few byte-level edits: flips, overwrites (length fields included), cuts and inserts."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "u16", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "u16" and len(data) >= 2:
            at = min(at, len(data) - 2)
            data[at:at + 2] = struct.pack(">H", draw(st.sampled_from([0, 1, 2, 31, 32, 33, 64, 65, 66, 67, 512,
                                                                      1024, 1025, 0xFFFF])))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


GOOD_PUBLIC = AK.public
RSA_PUBLIC = tpm2b(struct.pack(">HHIH", Alg.RSA, Alg.SHA256, AK_ATTRS, 0) + struct.pack(">HHHHI", NULL, Alg.RSASSA,
                   Alg.SHA256, 2048, 0) + tpm2b(b"\xc5" * 256))
RSA_SIG = struct.pack(">HH", Alg.RSASSA, Alg.SHA256) + tpm2b(b"\x01" * 256)


@st.composite
def built_attest(draw: st.DrawFn) -> bytes:
    """A well-formed quote attest with hypothesis-chosen banks, selections, sizes and digest: reaches the
    selection and pcrDigest checks once signed."""
    banks = draw(st.lists(st.tuples(st.sampled_from([Alg.SHA256, Alg.SHA256, Alg.SHA1, Alg.SHA384, 0x1234]),
                                    st.lists(st.integers(0, 23), max_size=4), st.integers(3, 4)), max_size=3))
    selections = [select(pcrs, alg, size) for alg, pcrs, size in banks]
    pcrs = sorted({i for alg, idx, _ in banks[:1] for i in idx})
    right = hashlib.sha256(b"".join(PCR_VALUES.get(i, b"") for i in pcrs)).digest()
    digest = draw(st.sampled_from([right, bytes(32), b""]) | st.binary(max_size=64))
    extra = draw(st.sampled_from([EXTRA, EXTRA, b"", NONCE]))
    return quote_attest(extra, selections, digest, safe=draw(st.integers(0, 1)))


bytes_for = {
    "attest": st.binary(max_size=300) | mutated(GOOD_ATTEST) | mutated(REAL_MSG) | built_attest(),
    "signature": st.binary(max_size=300) | mutated(GOOD_SIG) | mutated(REAL_SIG) | mutated(RSA_SIG),
    "public": st.binary(max_size=400) | mutated(GOOD_PUBLIC) | mutated(REAL_AK) | mutated(RSA_PUBLIC),
}


# ---------------------------------------------------------------- properties


@FUZZ
@given(data=bytes_for["attest"])
def test_parse_attest_only_raises_tpm_format_error(data: bytes) -> None:
    try:
        a = parse_attest(data)
    except TpmFormatError as exc:
        assert exc.reason == "malformed_attest"
        event("rejected")
        return
    event("parsed")
    assert isinstance(a, Attest)
    assert all(0 <= i < 32 for s in a.selections for i in s.pcrs)


@FUZZ
@given(data=bytes_for["signature"])
def test_parse_signature_only_raises_tpm_format_error(data: bytes) -> None:
    try:
        sig = parse_signature(data)
    except TpmFormatError as exc:
        assert exc.reason == "malformed_signature"
        return
    assert isinstance(sig, Signature)
    assert sig.sig_alg in (Alg.ECDSA, Alg.RSASSA, Alg.RSAPSS)


@FUZZ
@given(data=bytes_for["public"])
def test_parse_public_only_raises_tpm_format_error(data: bytes) -> None:
    try:
        pub = parse_public(data)
    except TpmFormatError as exc:
        assert exc.reason == "malformed_public"
        return
    assert isinstance(pub, PublicArea)
    assert pub.name[:2] == struct.pack(">H", pub.name_alg)  # every parsed key has a Name ...
    assert pub.algorithm
    try:  # ... and is either a usable key or refused with the same error
        pub.key()
        event("usable key")
    except TpmFormatError as exc:
        assert exc.reason == "malformed_public"


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c,
                                                                                             max_size=4), max_leaves=12)
entry_fields = sorted(set(GOOD_ENTRY) | set(GOOD_INSTANCE) | {"extra"})


@st.composite
def mutated_entry(draw: st.DrawFn) -> object:
    entry = dict(draw(st.sampled_from([GOOD_ENTRY, GOOD_INSTANCE])))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(entry_fields))
        if draw(st.booleans()):
            entry.pop(name, None)
        else:
            entry[name] = draw(json_values | st.sampled_from(["agent", "instance", "a" * 64, "A" * 64, "x" * 5000]))
    return entry


@FUZZ
@given(raw=st.lists(json_values | mutated_entry(), max_size=5) | st.text(max_size=20))
def test_parse_log_only_raises_log_error(raw: Sequence[object]) -> None:
    try:
        entries = parse_log(raw)
    except LogError as exc:
        assert exc.reason == "malformed_log" and len(exc.detail) <= 300
        event("rejected")
        return
    event("parsed")
    assert all(isinstance(e, AgentMeasurement | InstanceMeasurement) for e in entries)


def test_parse_log_bounds_its_length() -> None:
    with pytest.raises(LogError):
        parse_log([GOOD_ENTRY] * 10_001)


@FUZZ
@given(broken=st.sets(st.sampled_from(["ak", "attest", "sig"]), min_size=1), data=st.data())
def test_verify_quote_only_raises_quote_error(broken: set[str], data: st.DataObject) -> None:
    """A good quote with some of AK, attest and signature replaced: a verdict or a QuoteError, and a quote
    whose signed message changed never verifies."""
    ak = data.draw(bytes_for["public"]) if "ak" in broken else GOOD_PUBLIC
    attest = data.draw(bytes_for["attest"]) if "attest" in broken else GOOD_ATTEST
    sig = data.draw(bytes_for["signature"]) if "sig" in broken else GOOD_SIG
    try:
        verify(ak, attest, sig)
    except QuoteError as exc:
        event(exc.reason)
        return
    event("verified")
    # the AK may differ in what verify_quote does not read (its Name, unchecked attributes), the signature in
    # its encoding; the signed message never
    assert attest == GOOD_ATTEST


@FUZZ
@given(attest=bytes_for["attest"], pcrs=st.dictionaries(st.integers(-2, 40), st.binary(max_size=40), max_size=6),
       required=st.lists(st.integers(0, 31), max_size=4),
       hash_alg=st.sampled_from([Alg.SHA256] * 40 + list(Alg)))
def test_verify_quote_of_signed_garbage(attest: bytes, pcrs: dict[int, bytes], required: list[int],
                                        hash_alg: Alg) -> None:
    """Signed by the AK (as a TPM would sign whatever it was made to): every later check holds up."""
    try:
        parsed = verify_quote(AK.public, attest, AK.sign(attest), extra_data=EXTRA, pcr_values={**PCR_VALUES, **pcrs},
                              required_pcrs=required, hash_alg=hash_alg)
    except QuoteError as exc:
        event(exc.reason)
        return
    event("verified")
    assert parsed.extra_data == EXTRA and parsed.magic == TPM_GENERATED_VALUE
    assert set(required) <= set(parsed.selections[0].pcrs if parsed.selections else ())


@FUZZ
@given(pcrs=st.dictionaries(st.sampled_from([14, 15, 16, 17]), st.binary(min_size=32, max_size=32), min_size=1))
def test_changed_pcr_values_never_verify(pcrs: dict[int, bytes]) -> None:
    values = {**PCR_VALUES, **pcrs}
    try:
        verify(pcrs=values)
    except QuoteError as exc:
        assert exc.reason == "pcr_digest_mismatch"
        assert any(values[i] != PCR_VALUES[i] for i in (15, 16))
        return
    assert values[15] == PCR_VALUES[15] and values[16] == PCR_VALUES[16]
