"""Intel TDX quote verification (shared/cvm/tdx.py) against real vectors from google/go-tdx-guest's test data, plus
a synthetic world (self-made root, PCK chain, TCB signing key) for the collateral paths the real sample cannot reach.

Real-vector facts these tests pin down:
- v4 SPR quote: FMSPC 50806f000000 (matches the sample TCB info), PCK CPUSVN components (3,3,2,2,2,1,0,2,...),
  PCESVN 11, TEE_TCB_SVN 03000400...; both sample TCB levels need SGX component 1 >= 5 and TDX component 2 >= 5,
  so Intel's appraisal finds no level: TcbNotSupported (go-tdx-guest's own test zeroes the SVNs for that reason).
- Everything in the v4 set is valid in [2023-06-18T08:42:58Z, 2023-07-08T07:24:59Z]; AT = 2023-07-01T01:00Z.
- v5 sample: body type 3 (TD report 1.5), FMSPC 90c06f000000, PCK leaf valid from 2026-01-27. No collateral or
  CRLs for it exist in the vectors, so it is verified for signatures, QE binding and PCK chain to the pinned root
  only; the sample (SPR) collateral is refused for it as collateral_mismatch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

from shared.cvm.errors import CvmError
from shared.cvm.tdx import (
    TdxCollateral,
    TdxPolicy,
    check_rtmr_log,
    parse_quote,
    replay_rtmrs,
    verify_tdx,
)
from shared.cvm.tdx_collateral import (
    SGX_ROOT_CA_SHA256,
    converge,
    intel_sgx_root,
    load_signed_collateral,
    verify_pck_chain,
)

VECTORS = Path(__file__).resolve().parents[3] / "shared/vectors/cvm"
TDX = VECTORS / "tdx"
if not (TDX / "tdx_prod_quote_SPR_E4.dat").is_file():
    pytest.skip(f"TDX vectors not found under {VECTORS}", allow_module_level=True)

AT = datetime(2023, 7, 1, 1, 0, tzinfo=UTC)
AT_V5 = datetime(2026, 6, 1, tzinfo=UTC)
Q4 = (TDX / "tdx_prod_quote_SPR_E4.dat").read_bytes()
Q5 = (TDX / "quote_v5_sample.dat").read_bytes()
MRTD4 = "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb"
OPEN = TdxPolicy(allow_any_mrtd=True, require_collateral=False)  # authenticity only
REPO_ROOTS = Path(__file__).resolve().parents[2] / "shared/cvm/roots/intel"


def real_collateral(**changes: Any) -> TdxCollateral:
    col = TdxCollateral.from_files(
        TDX / "sample_tcbInfo_response",
        TDX / "sample_qeIdentity_response",
        root_ca_crl=TDX / "rootcrl.der",
        pck_crl=TDX / "pckcrl",
    )
    return replace(col, **changes)


def reason(quote: bytes, **kwargs: Any) -> str:
    with pytest.raises(CvmError) as info:
        verify_tdx(quote, **kwargs)
    return info.value.reason


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


# --- pinned roots -------------------------------------------------------------------------------------------------


def test_shipped_roots_are_pinned_and_the_tcb_signer_chains_to_the_root() -> None:
    root = intel_sgx_root()
    assert root.fingerprint(hashes.SHA256()).hex() == SGX_ROOT_CA_SHA256
    assert (REPO_ROOTS / "sgx-root-ca.pem").read_bytes() == (TDX / "intel-sgx-root-ca.pem").read_bytes()
    signer = x509.load_pem_x509_certificate((REPO_ROOTS / "tcb-signing.pem").read_bytes())
    signer.verify_directly_issued_by(root)
    assert signer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Intel SGX TCB Signing"


# --- parsing ------------------------------------------------------------------------------------------------------


def test_v4_quote_parses() -> None:
    q = parse_quote(Q4)
    assert (q.header.version, q.header.att_key_type, q.header.tee_type, q.body_type) == (4, 2, 0x81, 2)
    assert q.header.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    assert q.report.mrtd.hex() == MRTD4
    assert q.report.tee_tcb_svn.hex() == "03000400000000000000000000000000"
    assert q.report.rtmrs[3] == bytes(48)
    assert q.report.attributes.value == 0x40000000
    assert not q.report.attributes.debug
    assert q.report.attributes.names() == ("pks",)
    assert q.report.xfam_value == 0x61AE7
    assert (q.qe_report.isvprodid, q.qe_report.isvsvn) == (2, 4)
    assert len(q.qe_auth_data) == 32 and len(q.signed_region) == 48 + 584
    assert q.trailing == 39  # go-tdx-guest appended "extra bytes(only for testing purpose)": unsigned, ignored


def test_v5_quote_parses_as_td_report_15() -> None:
    q = parse_quote(Q5)
    assert (q.header.version, q.body_type) == (5, 3)
    assert len(q.signed_region) == 48 + 6 + 648  # header, body descriptor, TD report 1.5
    assert q.report.tee_tcb_svn.hex() == "0b010400000000000000000000000000"
    assert q.report.tee_tcb_svn2 is not None and q.report.tee_tcb_svn2.hex().startswith("0d0104")
    assert q.report.mrservicetd == bytes(48)
    assert q.report.attributes.names() == ("sept_ve_disable",)
    assert not q.report.attributes.debug
    assert q.pck_chain.endswith(b"\x00")  # NUL padding after the PEM chain, tolerated
    assert q.trailing == 0


@pytest.mark.parametrize("quote", [Q4, Q5], ids=["v4", "v5"])
def test_truncation_at_every_length_is_quote_malformed(quote: bytes) -> None:
    signed_end = len(quote) - parse_quote(quote).trailing
    for cut in range(signed_end):
        with pytest.raises(CvmError) as info:
            parse_quote(quote[:cut])
        assert info.value.reason == "quote_malformed", cut
        if cut % 211 == 0:  # the full verifier goes through the same parser first
            assert reason(quote[:cut], at=AT, policy=OPEN) == "quote_malformed"
    for cut in range(signed_end, len(quote) + 1):  # only unsigned trailing bytes cut: still a quote
        assert parse_quote(quote[:cut]).report == parse_quote(quote).report


def _patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (0, struct.pack("<H", 3)),  # version
        (2, struct.pack("<H", 3)),  # attestation key type
        (4, struct.pack("<I", 0)),  # TEE type (SGX)
        (632, struct.pack("<I", 0xFFFFFFFF)),  # signed data size
        (632, struct.pack("<I", 0x10)),
        (764, struct.pack("<H", 5)),  # certification data type
        (766, struct.pack("<I", 0x7FFFFFFF)),  # certification data size
        (1218, struct.pack("<H", 0xFFFF)),  # QE auth data size
        (1252, struct.pack("<H", 6)),  # PCK chain type
        (1254, struct.pack("<I", 1)),  # PCK chain size
    ],
)
def test_bad_types_and_lengths_are_quote_malformed(offset: int, value: bytes) -> None:
    assert reason(_patch(Q4, offset, value), at=AT, policy=OPEN) == "quote_malformed"


def test_v5_bad_body_descriptor_is_quote_malformed() -> None:
    assert reason(_patch(Q5, 48, struct.pack("<H", 2)), at=AT_V5, policy=OPEN) == "quote_malformed"  # size 648
    assert reason(_patch(Q5, 48, struct.pack("<H", 4)), at=AT_V5, policy=OPEN) == "quote_malformed"


# --- the real v4 quote ---------------------------------------------------------------------------------------------


def test_v4_quote_verifies_without_collateral() -> None:
    verified = verify_tdx(Q4, at=AT, policy=TdxPolicy(mrtd=(MRTD4,), require_collateral=False))
    assert verified.tcb_status is None and verified.fmspc == "50806f000000"
    summary = verified.summary()
    assert summary["mrtd"] == MRTD4 and summary["version"] == "4" and summary["fmspc"] == "50806f000000"
    assert summary["td_attributes"] == "0x0000000040000000 (pks)"
    assert set(summary) >= {"rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data", "xfam", "tcb_status"}


def test_v4_with_real_collateral_derives_tcb_not_supported() -> None:
    """Signatures of TCB info and QE identity verify, CRLs verify and list neither certificate, FMSPC matches, the
    QE is Intel's TD QE at an UpToDate ISVSVN, but no platform TCB level covers this (older) platform."""
    policy = TdxPolicy(mrtd=(MRTD4,), accepted_tcb_status=("TcbNotSupported",))
    verified = verify_tdx(Q4, at=AT, collateral=real_collateral(), policy=policy)
    assert verified.tcb_status == "TcbNotSupported" and verified.advisory_ids == ()
    with pytest.raises(CvmError) as info:
        verify_tdx(Q4, at=AT, collateral=real_collateral(), policy=TdxPolicy(mrtd=(MRTD4,)))
    assert info.value.reason == "tcb_status_not_accepted" and "TcbNotSupported" in info.value.detail


def test_real_collateral_signatures_and_contents() -> None:
    signed = load_signed_collateral(
        (TDX / "sample_tcbInfo_response").read_bytes(),
        (TDX / "sample_qeIdentity_response").read_bytes(),
        None,  # the shipped Intel SGX TCB Signing certificate
        (),
        (TDX / "rootcrl.der").read_bytes(),
    )
    signed.check_times(AT)
    assert signed.tcb_info.fmspc == "50806f000000" and signed.tcb_info.tcb_evaluation_data_number == 15
    assert [level.status for level in signed.tcb_info.tcb_levels] == ["UpToDate", "OutOfDate"]
    assert "INTEL-SA-00106" in signed.tcb_info.tcb_levels[1].advisory_ids
    assert signed.qe_identity.isvprodid == 2 and signed.qe_identity.tcb_levels[0].isvsvn == 4


def test_issuer_chain_from_the_pcs_header_url_encoded() -> None:
    pem = (REPO_ROOTS / "tcb-signing.pem").read_bytes() + (TDX / "intel-sgx-root-ca.pem").read_bytes()
    header = pem.replace(b" ", b"%20").replace(b"\n", b"%0A").replace(b"+", b"%2B").replace(b"/", b"%2F")
    policy = TdxPolicy(mrtd=(MRTD4,), accepted_tcb_status=("TcbNotSupported",))
    for chain in (pem, header):
        assert verify_tdx(Q4, at=AT, collateral=real_collateral(issuer_chain=chain), policy=policy).tcb_status


def test_v4_tampering_reasons() -> None:
    q = parse_quote(Q4)
    qe_at, auth_at = Q4.index(q.qe_report.raw), Q4.index(q.qe_auth_data)
    assert reason(flip(Q4, 48 + 136), at=AT, policy=OPEN) == "quote_signature_invalid"  # MRTD
    assert reason(flip(Q4, 3), at=AT, policy=OPEN) == "quote_malformed"  # key type byte
    assert reason(flip(Q4, 20), at=AT, policy=OPEN) == "quote_signature_invalid"  # QE vendor ID
    assert reason(flip(Q4, 636 + 10), at=AT, policy=OPEN) == "quote_signature_invalid"  # quote signature
    assert reason(flip(Q4, qe_at + 64), at=AT, policy=OPEN) == "qe_report_signature_invalid"  # MRENCLAVE
    assert reason(flip(Q4, qe_at + 384 + 5), at=AT, policy=OPEN) == "qe_report_signature_invalid"  # its signature
    assert reason(flip(Q4, auth_at + 7), at=AT, policy=OPEN) == "qe_report_data_mismatch"
    assert reason(flip(Q4, 636 + 64 + 9), at=AT, policy=OPEN) == "qe_report_data_mismatch"  # attestation key


def test_v4_flipped_pck_certificate_is_untrusted() -> None:
    chain_at = Q4.index(parse_quote(Q4).pck_chain)
    for offset in (300, 700, 900):  # in the leaf's base64: TBS or signature bytes change
        pos = chain_at + offset
        swapped = b"B" if Q4[pos : pos + 1] != b"B" else b"C"
        assert reason(_patch(Q4, pos, swapped), at=AT, policy=OPEN) == "pck_chain_untrusted"


def test_v4_validity_windows() -> None:
    assert reason(Q4, at=datetime(2022, 1, 1, tzinfo=UTC), policy=OPEN) == "certificate_expired"  # before the leaf
    assert reason(Q4, at=datetime(2030, 1, 1, tzinfo=UTC), policy=OPEN) == "certificate_expired"  # after it
    policy = TdxPolicy(mrtd=(MRTD4,), accepted_tcb_status=("TcbNotSupported",))
    late = datetime(2023, 7, 20, tzinfo=UTC)  # CRLs, QE identity, TCB info all past nextUpdate
    assert reason(Q4, at=late, collateral=real_collateral(), policy=policy) == "collateral_expired"
    nocrl = policy.model_copy(update={"require_crls": False})
    early = datetime(2023, 6, 10, tzinfo=UTC)  # before the TCB info's issueDate
    bare = real_collateral(root_ca_crl=None, pck_crl=None)
    assert reason(Q4, at=early, collateral=bare, policy=nocrl) == "collateral_expired"
    assert verify_tdx(Q4, at=AT, collateral=bare, policy=nocrl).tcb_status == "TcbNotSupported"
    with pytest.raises(ValueError, match="timezone"):
        verify_tdx(Q4, at=datetime(2023, 7, 1), policy=OPEN)


def test_tampered_collateral_json() -> None:
    policy = TdxPolicy(mrtd=(MRTD4,), accepted_tcb_status=("TcbNotSupported", "UpToDate"))
    body = (TDX / "sample_tcbInfo_response").read_bytes()
    tampered = body.replace(b'"pcesvn":11', b'"pcesvn":10', 1)
    assert reason(Q4, at=AT, collateral=real_collateral(tcb_info=tampered), policy=policy) == (
        "collateral_signature_invalid"
    )
    qe = (TDX / "sample_qeIdentity_response").read_bytes().replace(b'"isvsvn":4', b'"isvsvn":3')
    assert (
        reason(Q4, at=AT, collateral=real_collateral(qe_identity=qe), policy=policy) == "collateral_signature_invalid"
    )
    dup = body.rstrip()[:-1] + b',"tcbInfo":{}}'
    assert reason(Q4, at=AT, collateral=real_collateral(tcb_info=dup), policy=policy) == "collateral_invalid"
    assert reason(Q4, at=AT, collateral=real_collateral(tcb_info=b"[]"), policy=policy) == "collateral_invalid"
    swapped = real_collateral(tcb_info=real_collateral().qe_identity)
    assert reason(Q4, at=AT, collateral=swapped, policy=policy) == "collateral_invalid"
    spaced = body.replace(b',"signature"', b' ,\n "signature"')  # outside the signed object: still verifies
    assert verify_tdx(Q4, at=AT, collateral=real_collateral(tcb_info=spaced), policy=policy).tcb_status


def test_crl_handling_with_real_crls() -> None:
    policy = TdxPolicy(mrtd=(MRTD4,), accepted_tcb_status=("TcbNotSupported",))
    col = real_collateral()
    swapped = real_collateral(root_ca_crl=col.pck_crl, pck_crl=col.root_ca_crl)
    assert reason(Q4, at=AT, collateral=swapped, policy=policy) == "crl_invalid"
    assert reason(Q4, at=AT, collateral=real_collateral(pck_crl=b"not a crl"), policy=policy) == "crl_invalid"
    pem = x509.load_der_x509_crl(col.pck_crl or b"").public_bytes(serialization.Encoding.PEM)
    assert verify_tdx(Q4, at=AT, collateral=real_collateral(pck_crl=pem), policy=policy).tcb_status
    assert reason(Q4, at=AT, collateral=real_collateral(pck_crl=None), policy=policy) == "collateral_missing"


def test_policy_refusals_on_the_real_quote() -> None:
    q = parse_quote(Q4)
    col, base = real_collateral(), {"accepted_tcb_status": ("TcbNotSupported",)}
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "mrtd_not_allowed"),
        ({"mrtd": ("00" * 48,)}, "mrtd_not_allowed"),
        ({"mrtd": (MRTD4,), "rtmrs": {3: "11" * 48}}, "rtmr_mismatch"),
        ({"mrtd": (MRTD4,), "mrconfigid": "22" * 48}, "mrconfigid_mismatch"),
        ({"mrtd": (MRTD4,), "xfam": 0x602E7}, "xfam_mismatch"),
        ({"mrtd": (MRTD4,), "td_attributes_mask": 1 << 28, "td_attributes": 1 << 28}, "td_attributes_mismatch"),
    ]
    for fields, expected in cases:
        assert reason(Q4, at=AT, collateral=col, policy=TdxPolicy(**base, **fields)) == expected
    good = TdxPolicy(
        **base,
        mrtd=(MRTD4.upper(),),
        rtmrs={i: r.hex() for i, r in enumerate(q.report.rtmrs)},
        mrconfigid="00" * 48,
        xfam=0x61AE7,
        td_attributes_mask=1 | 1 << 28,
        td_attributes=0,
    )
    assert verify_tdx(Q4, at=AT, collateral=col, policy=good, report_data=q.report.report_data).quote == q
    assert reason(Q4, at=AT, collateral=col, policy=good, report_data=bytes(64)) == "report_data_mismatch"
    assert reason(Q4, at=AT, policy=good) == "collateral_missing"
    assert reason(Q4, at=AT, policy=TdxPolicy(mrtd=(MRTD4,))) == "collateral_missing"  # the default requires it


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        TdxPolicy(mrtd=("abc",))
    with pytest.raises(ValueError):
        TdxPolicy(rtmrs={4: "00" * 48})
    with pytest.raises(ValueError):
        TdxPolicy(td_attributes_mask=1, td_attributes=2)
    with pytest.raises(ValueError):
        TdxPolicy(unknown=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        TdxPolicy(accepted_tcb_status=("UptoDate",))  # a typo must not silently refuse everything
    with pytest.raises(ValueError):
        TdxPolicy(xfam=-1)


def test_chain_and_collateral_verification_is_cached() -> None:
    """The chain, CRLs and collateral signatures are checked once per exact bytes (speed is `make bench`'s)."""
    policy = TdxPolicy(mrtd=(MRTD4,), accepted_tcb_status=("TcbNotSupported",))
    col = real_collateral()
    verify_tdx(Q4, at=AT, collateral=col, policy=policy)
    chain_hits, collateral_hits = verify_pck_chain.cache_info().hits, load_signed_collateral.cache_info().hits
    for _ in range(20):
        verify_tdx(Q4, at=AT, collateral=col, policy=policy)
    assert verify_pck_chain.cache_info().hits >= chain_hits + 20
    assert load_signed_collateral.cache_info().hits >= collateral_hits + 20


# --- the real v5 sample -------------------------------------------------------------------------------------------


def test_v5_sample_verifies_signatures_binding_and_chain() -> None:
    """All the v5 data allows: quote signature over header+descriptor+body, QE report signature, QE binding, PCK
    chain to the pinned root (at a time inside its leaf's validity, from 2026-01-27). No matching collateral."""
    verified = verify_tdx(Q5, at=AT_V5, policy=OPEN)
    assert verified.fmspc == "90c06f000000" and verified.quote.header.version == 5
    assert verified.summary()["td_attributes"] == "0x0000000010000000 (sept_ve_disable)"
    assert reason(Q5, at=AT, policy=OPEN) == "certificate_expired"  # 2023: leaf not yet valid
    body_at = 48 + 6
    assert reason(flip(Q5, body_at + 136), at=AT_V5, policy=OPEN) == "quote_signature_invalid"
    assert reason(flip(Q5, 49), at=AT_V5, policy=OPEN) == "quote_malformed"  # descriptor type high byte
    sample = real_collateral(root_ca_crl=None, pck_crl=None)
    nocrl = TdxPolicy(allow_any_mrtd=True, require_crls=False)
    assert reason(Q5, at=AT_V5, collateral=sample, policy=nocrl) == "collateral_mismatch"  # SPR collateral, EMR host


# --- RTMR replay --------------------------------------------------------------------------------------------------


def test_replay_rtmrs() -> None:
    d1, d2 = hashlib.sha384(b"kernel").digest(), hashlib.sha384(b"initrd").digest()
    rtmrs = replay_rtmrs([(1, d1), (1, d2), (2, d1)])
    step = hashlib.sha384(bytes(48) + d1).digest()
    assert rtmrs == (bytes(48), hashlib.sha384(step + d2).digest(), step, bytes(48))
    assert replay_rtmrs([]) == (bytes(48),) * 4
    with pytest.raises(CvmError) as info:
        replay_rtmrs([(4, d1)])
    assert info.value.reason == "rtmr_log_mismatch"
    with pytest.raises(CvmError):
        replay_rtmrs([(0, b"short")])


def test_rtmr_log_check_against_a_quote() -> None:
    events = [(0, hashlib.sha384(b"td-hob").digest()), (2, hashlib.sha384(b"cmdline").digest())]
    world = World()
    quote = world.quote(rtmrs=replay_rtmrs(events))
    report = parse_quote(quote).report
    check_rtmr_log(report, events)
    with pytest.raises(CvmError) as info:
        check_rtmr_log(report, events[:1])
    assert info.value.reason == "rtmr_log_mismatch"
    with pytest.raises(CvmError):
        check_rtmr_log(parse_quote(Q4).report, [])  # real RTMR0..2 are not empty logs


# --- synthetic world: a self-made root, for the collateral paths the real sample cannot reach ----------------------

SGX = "1.2.840.113741.1.13.1"
INTEL_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
FMSPC = "00806f050000"
T0, T1 = datetime(2020, 1, 1, tzinfo=UTC), datetime(2040, 1, 1, tzinfo=UTC)
NOW = datetime(2030, 1, 15, tzinfo=UTC)


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    length = bytes([size]) if size < 0x80 else bytes([0x80 | 2]) + size.to_bytes(2, "big")
    return bytes([tag]) + length + body


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _pair(oid: str, value: bytes) -> bytes:
    return _der(0x30, _oid(oid) + value)


def _int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def sgx_extension(cpusvn: tuple[int, ...], pcesvn: int, fmspc: str = FMSPC) -> bytes:
    tcb = b"".join(_pair(f"{SGX}.2.{i}", _int(c)) for i, c in enumerate(cpusvn, 1))
    tcb += _pair(f"{SGX}.2.17", _int(pcesvn)) + _pair(f"{SGX}.2.18", _der(0x04, bytes(cpusvn)))
    return _der(
        0x30,
        _pair(f"{SGX}.1", _der(0x04, bytes(16)))
        + _pair(f"{SGX}.2", _der(0x30, tcb))
        + _pair(f"{SGX}.3", _der(0x04, bytes(2)))
        + _pair(f"{SGX}.4", _der(0x04, bytes.fromhex(fmspc)))
        + _pair(f"{SGX}.5", _der(0x0A, b"\x00")),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    extension: bytes | None = None,
    serial: int = 1,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(T0)
        .not_valid_after(T1)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if extension is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX), extension), False)
    return builder.sign(issuer_key, hashes.SHA256())


def _raw_sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = utils.decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _components(*svns: int) -> list[dict[str, int]]:
    return [{"svn": s} for s in (*svns, *([0] * (16 - len(svns))))]


def level(
    status: str, sgx: tuple[int, ...], pcesvn: int, tdx: tuple[int, ...], advisories: tuple[str, ...] = ()
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tcb": {"sgxtcbcomponents": _components(*sgx), "pcesvn": pcesvn, "tdxtcbcomponents": _components(*tdx)},
        "tcbDate": "2029-01-01T00:00:00Z",
        "tcbStatus": status,
    }
    if advisories:
        out["advisoryIDs"] = list(advisories)
    return out


class World:
    """A self-made Intel look-alike: root, PCK CA, PCK leaf with an SGX extension, TCB signing key."""

    def __init__(self, cpusvn: tuple[int, ...] = (5,) * 8 + (0,) * 8, pcesvn: int = 11) -> None:
        self.root_key, self.ca_key, self.pck_key, self.tcb_key = _key(), _key(), _key(), _key()
        self.root = _cert("Intel SGX Root CA", self.root_key, "Intel SGX Root CA", self.root_key, ca=True)
        self.ca = _cert("Intel SGX PCK Platform CA", self.ca_key, "Intel SGX Root CA", self.root_key, ca=True, serial=2)
        self.pck = _cert(
            "Intel SGX PCK Certificate",
            self.pck_key,
            "Intel SGX PCK Platform CA",
            self.ca_key,
            ca=False,
            extension=sgx_extension(cpusvn, pcesvn),
            serial=3,
        )
        self.tcb = _cert("Intel SGX TCB Signing", self.tcb_key, "Intel SGX Root CA", self.root_key, ca=False, serial=4)
        self.attestation_key = _key()

    def quote(
        self,
        *,
        version: int = 4,
        tee_tcb_svn: bytes = bytes([3, 0, 5]) + bytes(13),
        td_attributes: int = 1 << 28,
        mrtd: bytes = b"\x42" * 48,
        rtmrs: tuple[bytes, ...] = (bytes(48),) * 4,
        qe_isvsvn: int = 4,
        qe_mrsigner: bytes = INTEL_QE_MRSIGNER,
    ) -> bytes:
        header = struct.pack("<HHIHH", version, 2, 0x81, 0, 0) + bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
        header += bytes(20)
        body = tee_tcb_svn + bytes(48) * 2 + bytes(8) + td_attributes.to_bytes(8, "little")
        body += (0xE7).to_bytes(8, "little") + mrtd + bytes(48) * 3 + b"".join(rtmrs) + b"\x07" * 64
        signed_region = header + body if version == 4 else header + struct.pack("<HI", 2, len(body)) + body
        ak = self.attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        auth = b"\x33" * 32
        qe = bytes(16) + bytes(4) + bytes(28) + bytes.fromhex("11") + bytes(15) + bytes(32) + bytes(32)
        qe += qe_mrsigner + bytes(96) + struct.pack("<HH", 2, qe_isvsvn) + bytes(60)
        qe += hashlib.sha256(ak + auth).digest() + bytes(32)
        chain = _pem(self.pck, self.ca, self.root)
        cert_data = qe + _raw_sign(self.pck_key, qe) + struct.pack("<H", len(auth)) + auth
        cert_data += struct.pack("<HI", 5, len(chain)) + chain
        signed = _raw_sign(self.attestation_key, signed_region) + ak + struct.pack("<HI", 6, len(cert_data)) + cert_data
        return signed_region + struct.pack("<I", len(signed)) + signed

    def _signed(self, name: str, inner: dict[str, Any], key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
        raw = json.dumps(inner, separators=(",", ":"))
        signature = _raw_sign(key or self.tcb_key, raw.encode()).hex()
        return f'{{"{name}":{raw},"signature":"{signature}"}}'.encode()

    def crl(self, issuer: str, key: ec.EllipticCurvePrivateKey, revoked: tuple[int, ...] = ()) -> bytes:
        builder = x509.CertificateRevocationListBuilder().issuer_name(_name(issuer)).last_update(T0).next_update(T1)
        for serial in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(T0).build()
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def collateral(
        self,
        levels: list[dict[str, Any]],
        *,
        qe_levels: list[dict[str, Any]] | None = None,
        modules: list[dict[str, Any]] | None = None,
        fmspc: str = FMSPC,
        revoked_pck: tuple[int, ...] = (),
        revoked_ca: tuple[int, ...] = (),
        tcb_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> TdxCollateral:
        dates = {"issueDate": "2030-01-01T00:00:00Z", "nextUpdate": "2030-02-01T00:00:00Z"}
        info: dict[str, Any] = {
            "id": "TDX",
            "version": 3,
            **dates,
            "fmspc": fmspc,
            "pceId": "0000",
            "tcbType": 0,
            "tcbEvaluationDataNumber": 17,
            "tdxModule": {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "ff" * 8},
            "tcbLevels": levels,
        }
        if modules is not None:
            info["tdxModuleIdentities"] = modules
        identity = {
            "id": "TD_QE",
            "version": 2,
            **dates,
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": INTEL_QE_MRSIGNER.hex().upper(),
            "isvprodid": 2,
            "tcbLevels": qe_levels
            or [{"tcb": {"isvsvn": 4}, "tcbDate": "2029-01-01T00:00:00Z", "tcbStatus": "UpToDate"}],
        }
        return TdxCollateral(
            tcb_info=self._signed("tcbInfo", info, tcb_key),
            qe_identity=self._signed("enclaveIdentity", identity, tcb_key),
            issuer_chain=_pem(self.tcb, self.root),
            root_ca_crl=self.crl("Intel SGX Root CA", self.root_key, revoked_ca),
            pck_crl=self.crl("Intel SGX PCK Platform CA", self.ca_key, revoked_pck),
        )

    def verify(self, quote: bytes, collateral: TdxCollateral, **policy: Any) -> Any:
        fields: dict[str, Any] = {"allow_any_mrtd": True, **policy}
        return verify_tdx(quote, at=NOW, collateral=collateral, policy=TdxPolicy(**fields), extra_roots=(self.root,))


UP = level("UpToDate", (5,) * 8, 11, (3, 0, 5))
SW = level("SWHardeningNeeded", (4,) * 8, 10, (3, 0, 4), ("INTEL-SA-00615",))
CONF = level("ConfigurationNeeded", (5,) * 8, 11, (3, 0, 5), ("INTEL-SA-00828",))
OLD = level("OutOfDate", (1,) * 8, 1, (1, 0, 1), ("INTEL-SA-00001", "INTEL-SA-00002"))


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def test_synthetic_up_to_date(world: World) -> None:
    verified = world.verify(world.quote(), world.collateral([UP, OLD]))
    assert (verified.tcb_status, verified.advisory_ids, verified.fmspc) == ("UpToDate", (), FMSPC)


def test_synthetic_root_is_not_pinned(world: World) -> None:
    quote, collateral = world.quote(), world.collateral([UP])
    assert reason(quote, at=NOW, collateral=collateral, policy=TdxPolicy(allow_any_mrtd=True)) == "root_not_pinned"
    assert reason(quote, at=NOW, policy=OPEN) == "root_not_pinned"


def test_synthetic_first_covered_level_gives_status_and_advisories(world: World) -> None:
    older = world.quote(tee_tcb_svn=bytes([3, 0, 4]) + bytes(13))  # TDX component 2 below UP's
    with pytest.raises(CvmError) as info:
        world.verify(older, world.collateral([UP, SW, OLD]))
    assert info.value.reason == "tcb_status_not_accepted"
    assert "SWHardeningNeeded" in info.value.detail and "INTEL-SA-00615" in info.value.detail
    accepted = world.verify(older, world.collateral([UP, SW, OLD]), accepted_tcb_status=("SWHardeningNeeded",))
    assert accepted.tcb_status == "SWHardeningNeeded" and accepted.advisory_ids == ("INTEL-SA-00615",)
    ancient = world.quote(tee_tcb_svn=bytes([3, 0, 2]) + bytes(13))
    assert world.verify(ancient, world.collateral([UP, SW, OLD]), accepted_tcb_status=("OutOfDate",)).advisory_ids
    below_all = world.quote(tee_tcb_svn=bytes(16))
    verified = world.verify(below_all, world.collateral([UP, SW]), accepted_tcb_status=("TcbNotSupported",))
    assert verified.tcb_status == "TcbNotSupported"


def test_synthetic_pck_svns_gate_the_level() -> None:
    low = World(cpusvn=(4,) * 8 + (0,) * 8, pcesvn=10)  # below UP's SGX components and PCESVN
    verified = low.verify(low.quote(), low.collateral([UP, SW]), accepted_tcb_status=("SWHardeningNeeded",))
    assert verified.tcb_status == "SWHardeningNeeded"


def test_synthetic_qe_status_converges(world: World) -> None:
    qe_levels = [
        {"tcb": {"isvsvn": 8}, "tcbDate": "2029-06-01T00:00:00Z", "tcbStatus": "UpToDate"},
        {"tcb": {"isvsvn": 2}, "tcbDate": "2028-01-01T00:00:00Z", "tcbStatus": "OutOfDate", "advisoryIDs": ["SA-QE"]},
    ]
    quote = world.quote(qe_isvsvn=4)
    up = world.verify(quote, world.collateral([UP], qe_levels=qe_levels), accepted_tcb_status=("OutOfDate",))
    assert (up.tcb_status, up.advisory_ids) == ("OutOfDate", ("SA-QE",))
    conf = world.verify(
        quote, world.collateral([CONF], qe_levels=qe_levels), accepted_tcb_status=("OutOfDateConfigurationNeeded",)
    )
    assert conf.tcb_status == "OutOfDateConfigurationNeeded" and conf.advisory_ids == ("INTEL-SA-00828", "SA-QE")
    below = world.verify(
        world.quote(qe_isvsvn=1), world.collateral([UP], qe_levels=qe_levels), accepted_tcb_status=("OutOfDate",)
    )
    assert below.tcb_status == "OutOfDate"


def test_converge_table() -> None:
    assert converge("UpToDate", "UpToDate") == "UpToDate"
    assert converge("SWHardeningNeeded", "OutOfDate") == "OutOfDate"
    assert converge("ConfigurationAndSWHardeningNeeded", "OutOfDate") == "OutOfDateConfigurationNeeded"
    assert converge("UpToDate", "Revoked") == "Revoked"
    assert converge("OutOfDate", "UpToDate") == "OutOfDate"


def test_synthetic_tdx_module_identities(world: World) -> None:
    """TEE_TCB_SVN[1] > 0: bytes 0..1 are the module's (version, SVN) appraised by tdxModuleIdentities, the level
    comparison starts at index 2."""
    module = {
        "id": "TDX_01",
        "mrsigner": "00" * 48,
        "attributes": "00" * 8,
        "attributesMask": "FF" * 8,
        "tcbLevels": [
            {"tcb": {"isvsvn": 4}, "tcbDate": "2029-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
            {
                "tcb": {"isvsvn": 2},
                "tcbDate": "2028-01-01T00:00:00Z",
                "tcbStatus": "OutOfDate",
                "advisoryIDs": ["SA-M"],
            },
        ],
    }
    levels = [level("UpToDate", (5,) * 8, 11, (9, 1, 5))]  # component 0 above the quote's: skipped
    fresh = world.quote(tee_tcb_svn=bytes([4, 1, 5]) + bytes(13))
    assert world.verify(fresh, world.collateral(levels, modules=[module])).tcb_status == "UpToDate"
    stale = world.quote(tee_tcb_svn=bytes([3, 1, 5]) + bytes(13))
    verified = world.verify(stale, world.collateral(levels, modules=[module]), accepted_tcb_status=("OutOfDate",))
    assert (verified.tcb_status, verified.advisory_ids) == ("OutOfDate", ("SA-M",))
    other = world.quote(tee_tcb_svn=bytes([4, 2, 5]) + bytes(13))
    assert (
        reason(
            other,
            at=NOW,
            collateral=world.collateral(levels, modules=[module]),
            policy=TdxPolicy(allow_any_mrtd=True),
            extra_roots=(world.root,),
        )
        == "collateral_mismatch"
    )
    wrong_signer = {**module, "mrsigner": "11" * 48}
    with pytest.raises(CvmError) as info:
        world.verify(fresh, world.collateral(levels, modules=[wrong_signer]))
    assert info.value.reason == "collateral_mismatch"


def test_synthetic_collateral_mismatches(world: World) -> None:
    with pytest.raises(CvmError) as info:
        world.verify(world.quote(), world.collateral([UP], fmspc="50806f000000"))
    assert info.value.reason == "collateral_mismatch"
    with pytest.raises(CvmError) as info:
        world.verify(world.quote(qe_mrsigner=bytes(32)), world.collateral([UP]))
    assert info.value.reason == "qe_identity_mismatch"


def test_synthetic_revocation(world: World) -> None:
    quote = world.quote()
    for collateral in (world.collateral([UP], revoked_pck=(3,)), world.collateral([UP], revoked_ca=(2,))):
        with pytest.raises(CvmError) as info:
            world.verify(quote, collateral)
        assert info.value.reason == "certificate_revoked"
    with pytest.raises(CvmError) as info:  # the TCB signing certificate itself revoked by the root CRL
        world.verify(quote, world.collateral([UP], revoked_ca=(4,)))
    assert info.value.reason == "certificate_revoked"
    forged = replace(world.collateral([UP]), pck_crl=world.crl("Intel SGX PCK Platform CA", _key()))
    with pytest.raises(CvmError) as info:
        world.verify(quote, forged)
    assert info.value.reason == "crl_invalid"


def test_synthetic_collateral_signed_by_a_stranger(world: World) -> None:
    with pytest.raises(CvmError) as info:
        world.verify(world.quote(), world.collateral([UP], tcb_key=_key()))
    assert info.value.reason == "collateral_signature_invalid"
    stranger = World()  # its TCB signing chain ends at a root nobody pinned
    alien = replace(world.collateral([UP]), issuer_chain=_pem(stranger.tcb, stranger.root))
    with pytest.raises(CvmError) as info:
        world.verify(world.quote(), alien)
    assert info.value.reason == "root_not_pinned"


def test_synthetic_debug_td_and_v5(world: World) -> None:
    with pytest.raises(CvmError) as info:
        world.verify(world.quote(td_attributes=1), world.collateral([UP]))
    assert info.value.reason == "debug_enabled"
    assert world.verify(world.quote(td_attributes=1), world.collateral([UP]), allow_debug=True).tcb_status
    v5 = world.quote(version=5)
    assert parse_quote(v5).body_type == 2 and world.verify(v5, world.collateral([UP])).tcb_status == "UpToDate"


def test_synthetic_collateral_dates(world: World) -> None:
    collateral = world.collateral([UP])
    policy = TdxPolicy(allow_any_mrtd=True)
    for at in (NOW - timedelta(days=30), NOW + timedelta(days=30)):
        assert reason(world.quote(), at=at, collateral=collateral, policy=policy, extra_roots=(world.root,)) == (
            "collateral_expired"
        )


def test_synthetic_module_version_without_identities(world: World) -> None:
    """TEE_TCB_SVN[1] > 0 but no tdxModuleIdentities: bytes 0..1 stay in the level comparison (conservative), and
    a covering level must carry the same module major version."""
    quote = world.quote(tee_tcb_svn=bytes([2, 1, 5]) + bytes(13))
    below = world.verify(quote, world.collateral([level("UpToDate", (5,) * 8, 11, (3, 1, 5))]),
                         accepted_tcb_status=("TcbNotSupported",))  # fmt: skip
    assert below.tcb_status == "TcbNotSupported"
    with pytest.raises(CvmError) as info:
        world.verify(quote, world.collateral([level("UpToDate", (5,) * 8, 11, (2, 0, 5))]))
    assert info.value.reason == "collateral_mismatch"
