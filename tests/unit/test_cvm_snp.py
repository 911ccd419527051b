"""SEV-SNP report verification against real AMD evidence (a Milan report with its VCEK and chain, a Turin VCEK
and chain, from shared/vectors/cvm/snp), plus a software-made AMD-shaped chain (RSA-PSS ARK/ASK, P-384 VCEK with
KDS extensions) for what real evidence cannot show: re-signed reports, VLEKs, CRLs, roots that are not pinned."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from shared.cvm import snp
from shared.cvm.errors import CvmError, expected_report_data

VECTORS = Path(__file__).resolve().parents[3] / "shared/vectors/cvm/snp"
if not (VECTORS / "milan-report.hex").is_file():
    pytest.skip(f"SEV-SNP vectors not found at {VECTORS}", allow_module_level=True)

AT = datetime(2025, 1, 1, tzinfo=UTC)
REPORT_HEX = (VECTORS / "milan-report.hex").read_bytes()
REPORT = bytes.fromhex(REPORT_HEX.decode())
MILAN_VCEK = (VECTORS / "milan-vcek.der").read_bytes()
MILAN_CHAIN = (VECTORS / "milan-ask-ark.pem").read_bytes()
TURIN_VCEK = (VECTORS / "turin-vcek.der").read_bytes()
TURIN_CHAIN = (VECTORS / "turin-ask-ark.pem").read_bytes()
MEASUREMENT = "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
CHIP_ID = bytes.fromhex(
    "d49554ec717f4e5b0fe6b143bcf0405bd7ae304727edf46603f2a76aef6a3abc"
    "15d7af38db757039029f0efacfd08e244324884738c72b082e2f87a44d541eb6"
)
# Certificate (DER) SHA-256 fingerprints of the shipped ARKs, as recorded in shared/cvm/snp.py.
ARK_FINGERPRINTS = {
    "Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def reason(exc: pytest.ExceptionInfo[CvmError]) -> str:
    return exc.value.reason


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def parsed() -> snp.SnpReport:
    return snp.parse_report(REPORT, product="Milan")


# ------------------------------------------------------------------------------------------------- a fake AMD chain


def amd_name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_cert(
    subject: str,
    issuer: str,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signer: rsa.RSAPrivateKey,
    *,
    ca: bool,
    serial: int = 1,
    extensions: tuple[x509.ExtensionType, ...] = (),
    not_after: datetime = datetime(2040, 1, 1, tzinfo=UTC),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(amd_name(subject))
        .issuer_name(amd_name(issuer))
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(not_after)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=PSS)


def kds_extensions(
    product: str = "Milan-B0", bl: int = 3, tee: int = 0, snp_spl: int = 8, ucode: int = 115, hwid: bytes = CHIP_ID
) -> tuple[x509.ExtensionType, ...]:
    def ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
        return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)

    name = product.encode()
    exts = [
        ext("1.3.6.1.4.1.3704.1.2", bytes([0x16, len(name)]) + name),
        ext("1.3.6.1.4.1.3704.1.3.1", bytes([2, 1, bl])),
        ext("1.3.6.1.4.1.3704.1.3.2", bytes([2, 1, tee])),
        ext("1.3.6.1.4.1.3704.1.3.3", bytes([2, 1, snp_spl])),
        ext("1.3.6.1.4.1.3704.1.3.8", bytes([2, 2, 0, ucode]) if ucode > 0x7F else bytes([2, 1, ucode])),
    ]
    if hwid:
        exts.append(ext("1.3.6.1.4.1.3704.1.4", hwid))
    return tuple(exts)


@dataclasses.dataclass
class FakeAmd:
    ark: x509.Certificate
    ark_key: rsa.RSAPrivateKey
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey

    def chain(self, *, with_ark: bool = True) -> bytes:
        certs = [self.ask, self.ark] if with_ark else [self.ask]
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def vcek_der(self) -> bytes:
        return self.vcek.public_bytes(serialization.Encoding.DER)

    def sign(self, report: bytes) -> bytes:
        """What the firmware would do: sign bytes 0..0x2A0, r and s little-endian in 72-byte fields."""
        body = report[: snp.SIGNED_SIZE]
        r, s = decode_dss_signature(self.vcek_key.sign(body, ec.ECDSA(hashes.SHA384())))
        return body + r.to_bytes(72, "little") + s.to_bytes(72, "little") + bytes(snp.REPORT_SIZE - 0x2A0 - 144)


def fake_amd(product: str = "Milan", *, vcek_cn: str = "SEV-VCEK", ask_cn: str | None = None) -> FakeAmd:
    # RSA-2048 keeps key generation fast; the verifier checks AMD's PSS parameters, not the modulus size.
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark_cn, ask_cn = f"ARK-{product}", ask_cn or f"SEV-{product}"
    ark = make_cert(ark_cn, ark_cn, ark_key.public_key(), ark_key, ca=True, serial=0x10000)
    ask = make_cert(ask_cn, ark_cn, ask_key.public_key(), ark_key, ca=True, serial=0x10001)
    hwid = b"" if vcek_cn == "SEV-VLEK" else CHIP_ID
    exts = kds_extensions(product=f"{product}-B0", hwid=hwid)
    vcek = make_cert(vcek_cn, ask_cn, vcek_key.public_key(), ask_key, ca=False, serial=7, extensions=exts)
    return FakeAmd(ark=ark, ark_key=ark_key, ask=ask, vcek=vcek, vcek_key=vcek_key)


@pytest.fixture(scope="module")
def fake() -> FakeAmd:
    return fake_amd()


def patch(report: bytes, offset: int, value: bytes) -> bytes:
    return report[:offset] + value + report[offset + len(value) :]


# ------------------------------------------------------------------------------------------------ the real evidence


def test_real_milan_report_verifies_with_its_vcek_and_chain() -> None:
    verified = snp.verify_snp(REPORT_HEX, MILAN_VCEK, MILAN_CHAIN, at=AT)
    assert verified.product == "Milan"
    assert verified.signing_key == "VCEK"
    r = verified.report
    assert r.version == 2
    assert r.policy.raw == 0x30000
    assert (r.policy.abi_major, r.policy.abi_minor) == (0, 0)
    assert r.policy.smt_allowed and not r.policy.debug and not r.policy.migrate_ma and not r.policy.single_socket
    assert r.vmpl == 0 and r.signature_algo == 1 and r.signing_key == 0
    assert not r.author_key_en and not r.mask_chip_key
    assert r.measurement.hex() == MEASUREMENT
    assert r.chip_id == CHIP_ID and not r.chip_id_masked
    assert r.host_data == bytes(32) and r.id_key_digest == bytes(48) and r.author_key_digest == bytes(48)
    assert r.report_id_ma == b"\xff" * 32
    assert r.platform_info.smt_enabled and not r.platform_info.tsme_enabled
    assert (r.reported_tcb.bootloader, r.reported_tcb.tee, r.reported_tcb.snp, r.reported_tcb.microcode) == (
        3,
        0,
        8,
        115,
    )
    assert r.reported_tcb.fmc is None
    assert r.current_tcb == r.reported_tcb == r.committed_tcb == r.launch_tcb
    assert (r.current_major, r.current_minor, r.current_build) == (1, 52, 4)
    assert (r.committed_major, r.committed_minor, r.committed_build) == (1, 52, 4)
    assert r.cpuid_fam_id is None and r.launch_mit_vector is None
    summary = verified.summary()
    assert summary["measurement"] == MEASUREMENT
    assert summary["policy"] == "0x30000" and summary["vmpl"] == "0" and summary["debug"] == "false"
    assert summary["reported_tcb"] == "bl=3 tee=0 snp=8 ucode=115"
    assert summary["chip_id_prefix"] == CHIP_ID[:8].hex()
    assert summary["product"] == "Milan"
    assert summary["report_data"] == r.report_data.hex()


def test_real_milan_report_verifies_with_the_shipped_chain_and_raw_bytes() -> None:
    verified = snp.verify_snp(REPORT, MILAN_VCEK, at=AT)
    assert verified.product == "Milan"
    assert verified.report.raw == REPORT


def test_report_accepted_as_raw_or_hex_text() -> None:
    assert snp.load_report_bytes(REPORT) == REPORT
    assert snp.load_report_bytes(REPORT_HEX) == REPORT
    assert snp.load_report_bytes(b"  " + REPORT.hex().upper().encode() + b"\n") == REPORT
    pem_vcek = snp.load_certificates(MILAN_VCEK)[0].public_bytes(serialization.Encoding.PEM)
    assert snp.verify_snp(REPORT.hex().encode(), pem_vcek, MILAN_CHAIN, at=AT).product == "Milan"


def test_real_turin_vcek_verifies_to_the_pinned_turin_ark() -> None:
    endorsement = snp.verify_vcek_chain(TURIN_VCEK, TURIN_CHAIN, at=AT)
    assert endorsement.product == "Turin" and endorsement.kind == "VCEK"
    spki = endorsement.ark.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert hashlib.sha256(spki).hexdigest() == snp.PINNED_ARK_SPKI_SHA256["Turin"]
    ext = endorsement.extensions
    assert ext.product_name == "Turin"
    assert (ext.fmc, ext.bootloader, ext.tee, ext.snp, ext.microcode) == (0, 0, 0, 0, 9)
    assert ext.hwid is not None and len(ext.hwid) == 8
    assert snp.verify_vcek_chain(TURIN_VCEK, None, at=AT).product == "Turin"


def test_real_milan_vcek_extensions() -> None:
    ext = snp.read_vcek_extensions(snp.load_certificates(MILAN_VCEK)[0])
    assert ext.product_name == "Milan-B0" and ext.product_family == "Milan"
    assert (ext.bootloader, ext.tee, ext.snp, ext.microcode, ext.fmc) == (3, 0, 8, 115, None)
    assert ext.hwid == CHIP_ID


@pytest.mark.parametrize("product", snp.PRODUCTS)
def test_pinned_roots_are_amds_self_signed_rsa4096_arks(product: str) -> None:
    ark = snp.pinned_roots()[product]  # type: ignore[index]
    assert ark.subject == ark.issuer
    assert ark.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"ARK-{product}"
    key = ark.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 4096
    key.verify(ark.signature, ark.tbs_certificate_bytes, PSS, hashes.SHA384())
    assert ark.fingerprint(hashes.SHA256()).hex() == ARK_FINGERPRINTS[product]
    # The shipped ASK is the ARK's.
    ask_path = Path(snp.__file__).parent / "roots" / "amd" / f"ask-{product.lower()}.pem"
    ask = x509.load_pem_x509_certificate(ask_path.read_bytes())
    assert ask.issuer == ark.subject
    assert ask.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"SEV-{product}"
    key.verify(ask.signature, ask.tbs_certificate_bytes, PSS, hashes.SHA384())


def test_vectors_chain_arks_are_the_pinned_ones() -> None:
    for chain, product in ((MILAN_CHAIN, "Milan"), (TURIN_CHAIN, "Turin")):
        ark = x509.load_pem_x509_certificates(chain)[1]
        assert ark.fingerprint(hashes.SHA256()).hex() == ARK_FINGERPRINTS[product]


# --------------------------------------------------------------------------------------------------- tampering


@pytest.mark.parametrize("offset", [0x04, 0x38, 0x50, 0x90, 0xC0, 0x180, 0x1A0, 0x1E8, 0x29F])
def test_flipped_signed_byte_is_refused(offset: int) -> None:
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(flip(REPORT, offset), MILAN_VCEK, MILAN_CHAIN, at=AT)
    assert reason(exc) == "report_signature_invalid"


@pytest.mark.parametrize("offset", [0x2A0, 0x2A0 + 47, 0x2A0 + 72, 0x2A0 + 72 + 20])
def test_flipped_signature_byte_is_refused(offset: int) -> None:
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(flip(REPORT, offset), MILAN_VCEK, MILAN_CHAIN, at=AT)
    assert reason(exc) == "report_signature_invalid"


def test_nonzero_unsigned_signature_tail_is_malformed() -> None:
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(flip(REPORT, 0x2A0 + 144 + 3), MILAN_VCEK, MILAN_CHAIN, at=AT)
    assert reason(exc) == "report_malformed"


def test_flipped_vcek_signature_bits_break_the_chain() -> None:
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(REPORT, flip(MILAN_VCEK, len(MILAN_VCEK) - 5), MILAN_CHAIN, at=AT)
    assert reason(exc) == "vcek_chain_untrusted"


def test_flipped_vcek_tbs_byte_breaks_the_chain() -> None:
    at_hwid = MILAN_VCEK.index(CHIP_ID[:16])  # inside the signed hwID extension: still well-formed DER
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(REPORT, flip(MILAN_VCEK, at_hwid + 3), MILAN_CHAIN, at=AT)
    assert reason(exc) == "vcek_chain_untrusted"


def test_garbage_vcek_is_malformed() -> None:
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(REPORT, b"\x30\x03\x02\x01", MILAN_CHAIN, at=AT)
    assert reason(exc) == "certificate_malformed"


def test_milan_vcek_with_turin_chain_is_refused() -> None:
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(REPORT, MILAN_VCEK, TURIN_CHAIN, at=AT)
    assert reason(exc) == "vcek_chain_untrusted"
    with pytest.raises(CvmError) as exc:
        snp.verify_vcek_chain(TURIN_VCEK, MILAN_CHAIN, at=AT)
    assert reason(exc) == "vcek_chain_untrusted"


def test_chain_with_a_corrupted_ask_is_refused() -> None:
    ask, ark = x509.load_pem_x509_certificates(MILAN_CHAIN)
    bad_ask = flip(ask.public_bytes(serialization.Encoding.DER), len(ask.public_bytes(serialization.Encoding.DER)) - 9)
    chain = x509.load_der_x509_certificate(bad_ask).public_bytes(serialization.Encoding.PEM) + ark.public_bytes(
        serialization.Encoding.PEM
    )
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(REPORT, MILAN_VCEK, chain, at=AT)
    assert reason(exc) == "vcek_chain_untrusted"


def test_self_made_ark_is_not_pinned(fake: FakeAmd) -> None:
    report = fake.sign(REPORT)
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(report, fake.vcek_der(), fake.chain(), at=AT)
    assert reason(exc) == "ark_not_pinned"
    # The real Milan ASK offered with a look-alike root: the root's key decides, not its name.
    ask = x509.load_pem_x509_certificates(MILAN_CHAIN)[0]
    chain = ask.public_bytes(serialization.Encoding.PEM) + fake.ark.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(REPORT, MILAN_VCEK, chain, at=AT)
    assert reason(exc) == "ark_not_pinned"


def test_explicit_extra_root_is_trusted(fake: FakeAmd) -> None:
    report = fake.sign(REPORT)
    verified = snp.verify_snp(report, fake.vcek_der(), fake.chain(), at=AT, extra_roots=[fake.ark])
    assert verified.product == "Milan"
    # Without the ARK in the chain, the configured root with the ASK's issuer name is found (next to the pinned
    # ARK-Milan of the same name).
    verified = snp.verify_snp(report, fake.vcek_der(), fake.chain(with_ark=False), at=AT, extra_roots=[fake.ark])
    assert verified.report.measurement.hex() == MEASUREMENT


def test_chain_with_extra_certificates_is_refused(fake: FakeAmd) -> None:
    chain = fake.chain() + fake.vcek.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(fake.sign(REPORT), fake.vcek_der(), chain, at=AT, extra_roots=[fake.ark])
    assert reason(exc) == "vcek_chain_untrusted"


# ----------------------------------------------------------------------------------------------------------- time


@pytest.mark.parametrize(
    "at", [datetime(2030, 4, 4, tzinfo=UTC), datetime(2023, 4, 1, tzinfo=UTC), datetime(2050, 1, 1, tzinfo=UTC)]
)
def test_outside_validity_is_expired(at: datetime) -> None:
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=at)
    assert reason(exc) == "certificate_expired"


def test_inside_validity_edges() -> None:
    snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=datetime(2030, 4, 3, 19, 0, tzinfo=UTC))


def test_naive_at_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=datetime(2025, 1, 1))


# --------------------------------------------------------------------------------------------------------- policy


def appraise(policy: snp.SnpPolicy, report: snp.SnpReport | None = None, data: bytes | None = None) -> str | None:
    try:
        snp.appraise_snp(report or parsed(), policy, report_data=data)
    except CvmError as e:
        return e.reason
    return None


ALLOWED = snp.SnpPolicy(measurements=(MEASUREMENT,))


def test_policy_defaults_trust_no_measurement() -> None:
    assert appraise(snp.SnpPolicy()) == "measurement_not_allowed"
    assert appraise(snp.SnpPolicy(allow_any_measurement=True)) is None
    assert appraise(ALLOWED) is None
    assert appraise(snp.SnpPolicy(measurements=(MEASUREMENT.upper(),))) is None
    assert appraise(snp.SnpPolicy(measurements=("ab" * 48,))) == "measurement_not_allowed"


def test_policy_through_verify_snp() -> None:
    verified = snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=AT, policy=ALLOWED)
    assert verified.report.vmpl == 0
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=AT, policy=snp.SnpPolicy())
    assert reason(exc) == "measurement_not_allowed"


def test_policy_smt() -> None:
    assert appraise(ALLOWED.model_copy(update={"allow_smt": False})) == "smt_not_allowed"


def test_policy_tcb_names_the_component() -> None:
    for component, level in (("bootloader", 4), ("tee", 1), ("snp", 9), ("microcode", 116)):
        policy = snp.SnpPolicy(measurements=(MEASUREMENT,), min_tcb=snp.SnpTcbMinimum(**{component: level}))
        with pytest.raises(CvmError) as exc:
            snp.appraise_snp(parsed(), policy, report_data=None)
        assert reason(exc) == "tcb_too_old" and component in exc.value.detail
    exact = snp.SnpTcbMinimum(bootloader=3, tee=0, snp=8, microcode=115, fmc=200)  # fmc: Turin only
    assert appraise(snp.SnpPolicy(measurements=(MEASUREMENT,), min_tcb=exact)) is None


def test_policy_abi() -> None:
    assert appraise(ALLOWED.model_copy(update={"min_abi_major": 1, "min_abi_minor": 52})) is None
    assert appraise(ALLOWED.model_copy(update={"min_abi_major": 1, "min_abi_minor": 53})) == "abi_too_old"
    assert appraise(ALLOWED.model_copy(update={"min_abi_major": 2})) == "abi_too_old"


def test_policy_vmpl_and_host_data() -> None:
    assert appraise(ALLOWED.model_copy(update={"vmpl": 1})) == "vmpl_mismatch"
    assert appraise(snp.SnpPolicy(measurements=(MEASUREMENT,), host_data="00" * 32)) is None
    assert appraise(snp.SnpPolicy(measurements=(MEASUREMENT,), host_data="11" * 32)) == "host_data_mismatch"


def test_policy_report_data() -> None:
    report = parsed()
    assert appraise(ALLOWED, data=report.report_data) is None
    assert appraise(ALLOWED, data=expected_report_data(b"nonce", b"key")) == "report_data_mismatch"
    assert appraise(ALLOWED, data=report.report_data[:32]) == "report_data_mismatch"  # padded with zeros, differs
    assert appraise(ALLOWED, data=report.report_data + b"\0") == "report_data_mismatch"
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=AT, report_data=bytes(64))
    assert reason(exc) == "report_data_mismatch"
    snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=AT, report_data=report.report_data)


def test_policy_debug_and_migration_agent_on_a_modified_struct() -> None:
    report = parsed()
    debug = dataclasses.replace(report, policy=snp.GuestPolicy.decode(report.policy.raw | 1 << 19))
    assert debug.policy.debug
    assert appraise(ALLOWED, debug) == "debug_enabled"
    assert appraise(ALLOWED.model_copy(update={"allow_debug": True}), debug) is None
    migrate = dataclasses.replace(report, policy=snp.GuestPolicy.decode(report.policy.raw | 1 << 18))
    assert appraise(ALLOWED, migrate) == "migration_agent_enabled"
    bound_ma = dataclasses.replace(report, report_id_ma=bytes(32))
    assert appraise(ALLOWED, bound_ma) == "migration_agent_enabled"
    assert appraise(ALLOWED.model_copy(update={"allow_migration_agent": True}), bound_ma) is None


def test_debug_report_signed_by_a_fake_vcek_is_refused_by_policy(fake: FakeAmd) -> None:
    report = fake.sign(patch(REPORT, 0x08, (0x30000 | 1 << 19).to_bytes(8, "little")))
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(report, fake.vcek_der(), fake.chain(), at=AT, policy=ALLOWED, extra_roots=[fake.ark])
    assert reason(exc) == "debug_enabled"


def test_policy_model_is_strict() -> None:
    with pytest.raises(ValidationError):
        snp.SnpPolicy(measurements=("not hex",))
    with pytest.raises(ValidationError):
        snp.SnpPolicy(measurements=("ab" * 47,))
    with pytest.raises(ValidationError):
        snp.SnpPolicy(host_data="00" * 31)
    with pytest.raises(ValidationError):
        snp.SnpPolicy(allow_everything=True)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        snp.SnpPolicy(vmpl=4)
    with pytest.raises(ValidationError):
        ALLOWED.allow_debug = True  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ VCEK <-> report binding


def test_vcek_tcb_mismatch_on_a_modified_struct() -> None:
    report = parsed()
    ext = snp.read_vcek_extensions(snp.load_certificates(MILAN_VCEK)[0])
    snp.check_vcek_binding(report, ext)
    for byte, component in ((0, "bootloader"), (1, "tee"), (6, "snp"), (7, "microcode")):
        raw = report.reported_tcb.raw ^ (1 << (8 * byte))
        changed = dataclasses.replace(report, reported_tcb=snp.decode_tcb(raw, "Milan"))
        with pytest.raises(CvmError) as exc:
            snp.check_vcek_binding(changed, ext)
        assert reason(exc) == "vcek_tcb_mismatch" and component in exc.value.detail


def test_vcek_chip_mismatch_on_a_modified_struct() -> None:
    report = parsed()
    ext = snp.read_vcek_extensions(snp.load_certificates(MILAN_VCEK)[0])
    with pytest.raises(CvmError) as exc:
        snp.check_vcek_binding(dataclasses.replace(report, chip_id=flip(CHIP_ID, 63)), ext)
    assert reason(exc) == "vcek_chip_mismatch"
    masked = dataclasses.replace(report, chip_id=bytes(64))  # MASK_CHIP_ID: nothing to compare
    assert masked.chip_id_masked
    snp.check_vcek_binding(masked, ext)


def test_turin_binding_compares_fmc_and_the_8_byte_chip_id() -> None:
    ext = snp.VcekExtensions("Turin", bootloader=1, tee=2, snp=3, microcode=9, fmc=4, hwid=b"\x1e" * 8)
    tcb = snp.decode_tcb(int.from_bytes(bytes([4, 1, 2, 3, 0, 0, 0, 9]), "little"), "Turin")
    report = dataclasses.replace(parsed(), product="Turin", reported_tcb=tcb, chip_id=b"\x1e" * 8 + bytes(56))
    snp.check_vcek_binding(report, ext)
    with pytest.raises(CvmError) as exc:
        snp.check_vcek_binding(report, dataclasses.replace(ext, fmc=5))
    assert reason(exc) == "vcek_tcb_mismatch" and "fmc" in exc.value.detail
    with pytest.raises(CvmError) as exc:
        snp.check_vcek_binding(dataclasses.replace(report, chip_id=b"\x1e" * 9 + bytes(55)), ext)
    assert reason(exc) == "vcek_chip_mismatch"


def test_resigned_report_with_another_tcb_is_a_vcek_tcb_mismatch(fake: FakeAmd) -> None:
    report = fake.sign(patch(REPORT, 0x180, bytes([3, 0, 0, 0, 0, 0, 9, 115])))
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(report, fake.vcek_der(), fake.chain(), at=AT, extra_roots=[fake.ark])
    assert reason(exc) == "vcek_tcb_mismatch"
    report = fake.sign(patch(REPORT, 0x1A0, b"\x01"))
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(report, fake.vcek_der(), fake.chain(), at=AT, extra_roots=[fake.ark])
    assert reason(exc) == "vcek_chip_mismatch"


def test_cpuid_product_must_match_the_chain(fake: FakeAmd) -> None:
    v3 = patch(REPORT, 0, (3).to_bytes(4, "little"))
    turin_cpu = fake.sign(patch(v3, 0x188, bytes([0x1A, 0x02, 0x01])))
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(turin_cpu, fake.vcek_der(), fake.chain(), at=AT, extra_roots=[fake.ark])
    assert reason(exc) == "report_product_mismatch"
    milan_cpu = fake.sign(patch(v3, 0x188, bytes([0x19, 0x01, 0x01])))
    verified = snp.verify_snp(milan_cpu, fake.vcek_der(), fake.chain(), at=AT, extra_roots=[fake.ark])
    assert verified.report.version == 3 and verified.report.cpuid_fam_id == 0x19


def test_vcek_product_name_must_match_its_root() -> None:
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ark = make_cert("ARK-Milan", "ARK-Milan", ark_key.public_key(), ark_key, ca=True)
    ask = make_cert("SEV-Milan", "ARK-Milan", ask_key.public_key(), ark_key, ca=True)
    key = ec.generate_private_key(ec.SECP384R1())
    vcek = make_cert("SEV-VCEK", "SEV-Milan", key.public_key(), ask_key, ca=False, extensions=kds_extensions("Genoa"))
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ask, ark))
    with pytest.raises(CvmError) as exc:
        snp.verify_vcek_chain(vcek.public_bytes(serialization.Encoding.DER), chain, at=AT, extra_roots=[ark])
    assert reason(exc) == "vcek_product_mismatch"


def test_vcek_without_hwid_is_malformed(fake: FakeAmd) -> None:
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ark = make_cert("ARK-Milan", "ARK-Milan", fake.ark_key.public_key(), fake.ark_key, ca=True)
    ask = make_cert("SEV-Milan", "ARK-Milan", ask_key.public_key(), fake.ark_key, ca=True)
    key = ec.generate_private_key(ec.SECP384R1())
    vcek = make_cert("SEV-VCEK", "SEV-Milan", key.public_key(), ask_key, ca=False, extensions=kds_extensions(hwid=b""))
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ask, ark))
    with pytest.raises(CvmError) as exc:
        snp.verify_vcek_chain(vcek.public_bytes(serialization.Encoding.DER), chain, at=AT, extra_roots=[ark])
    assert reason(exc) == "certificate_malformed"


def test_signing_key_field_must_name_the_certificate_kind(fake: FakeAmd) -> None:
    as_vlek = fake.sign(patch(REPORT, 0x48, (1 << 2).to_bytes(4, "little")))
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(as_vlek, fake.vcek_der(), fake.chain(), at=AT, extra_roots=[fake.ark])
    assert reason(exc) == "signing_key_mismatch"


def test_mask_chip_key_means_unsigned() -> None:
    report = dataclasses.replace(parsed(), mask_chip_key=True)
    key = snp.verify_vcek_chain(MILAN_VCEK, MILAN_CHAIN, at=AT).key
    with pytest.raises(CvmError) as exc:
        snp.verify_report_signature(report, key)
    assert reason(exc) == "report_signature_invalid"


def test_vlek_chain_verifies_and_needs_an_explicit_chain() -> None:
    vlek = fake_amd(vcek_cn="SEV-VLEK", ask_cn="SEV-VLEK-Milan")
    report = vlek.sign(patch(REPORT, 0x48, (1 << 2).to_bytes(4, "little")))
    verified = snp.verify_snp(report, vlek.vcek_der(), vlek.chain(), at=AT, extra_roots=[vlek.ark])
    assert verified.signing_key == "VLEK" and verified.summary()["signing_key"] == "VLEK"
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(report, vlek.vcek_der(), None, at=AT, extra_roots=[vlek.ark])
    assert reason(exc) == "vlek_chain_required"


# ------------------------------------------------------------------------------------------------------------ CRL


def make_crl(signer: rsa.RSAPrivateKey, issuer: str, revoked: tuple[int, ...] = (), *, days: int = 30) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(amd_name(issuer))
        .last_update(AT - timedelta(days=1))
        .next_update(AT + timedelta(days=days))
    )
    for serial in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(AT - timedelta(days=2)).build()
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=PSS).public_bytes(serialization.Encoding.DER)


def test_crl(fake: FakeAmd) -> None:
    report = fake.sign(REPORT)
    args = {"at": AT, "extra_roots": [fake.ark]}
    snp.verify_snp(report, fake.vcek_der(), fake.chain(), crl=make_crl(fake.ark_key, "ARK-Milan", (99,)), **args)
    pem = x509.load_der_x509_crl(make_crl(fake.ark_key, "ARK-Milan")).public_bytes(serialization.Encoding.PEM)
    snp.verify_snp(report, fake.vcek_der(), fake.chain(), crl=pem, **args)
    for serial in (fake.ask.serial_number, fake.vcek.serial_number):
        with pytest.raises(CvmError) as exc:
            crl = make_crl(fake.ark_key, "ARK-Milan", (serial,))
            snp.verify_snp(report, fake.vcek_der(), fake.chain(), crl=crl, **args)
        assert reason(exc) == "certificate_revoked"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for crl in (make_crl(other, "ARK-Milan", ()), make_crl(fake.ark_key, "ARK-Genoa"), b"not a crl"):
        with pytest.raises(CvmError) as exc:
            snp.verify_snp(report, fake.vcek_der(), fake.chain(), crl=crl, **args)
        assert reason(exc) == "crl_invalid"
    stale = make_crl(fake.ark_key, "ARK-Milan", days=0)
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(
            report, fake.vcek_der(), fake.chain(), crl=stale, at=AT + timedelta(days=1), extra_roots=[fake.ark]
        )
    assert reason(exc) == "crl_invalid"


def test_crl_from_an_unpinned_root_cannot_clear_a_real_chain(fake: FakeAmd) -> None:
    with pytest.raises(CvmError) as exc:
        snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=AT, crl=make_crl(fake.ark_key, "ARK-Milan"))
    assert reason(exc) == "crl_invalid"


# ----------------------------------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "data",
    [b"", REPORT[:100], REPORT + b"\0", b"zz" * snp.REPORT_SIZE, REPORT_HEX[:-2], "é".encode() * 600],
)
def test_malformed_reports(data: bytes) -> None:
    with pytest.raises(CvmError) as exc:
        snp.parse_report(data)
    assert reason(exc) == "report_malformed"


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (0x00, (1).to_bytes(4, "little")),  # version 1
        (0x00, (0).to_bytes(4, "little")),
        (0x34, (2).to_bytes(4, "little")),  # not ECDSA P-384
        (0x08, (0).to_bytes(8, "little")),  # policy bit 17 clear
    ],
)
def test_malformed_fields(offset: int, value: bytes) -> None:
    with pytest.raises(CvmError) as exc:
        snp.parse_report(patch(REPORT, offset, value))
    assert reason(exc) == "report_malformed"


def test_version_3_and_5_fields() -> None:
    v3 = patch(patch(REPORT, 0, (3).to_bytes(4, "little")), 0x188, bytes([0x1A, 0x02, 0x01]))
    report = snp.parse_report(v3)
    assert report.product == "Turin" and (report.cpuid_fam_id, report.cpuid_mod_id, report.cpuid_step) == (26, 2, 1)
    assert report.reported_tcb.fmc == 3 and report.reported_tcb.bootloader == 0  # the Turin layout of 0x...0873 03
    assert report.launch_mit_vector is None
    v5 = patch(patch(v3, 0, (5).to_bytes(4, "little")), 0x1F8, (7).to_bytes(8, "little") + (9).to_bytes(8, "little"))
    report = snp.parse_report(v5)
    assert (report.launch_mit_vector, report.current_mit_vector) == (7, 9)
    assert snp.parse_report(v3, product="Milan").reported_tcb.bootloader == 3  # explicit product wins


def test_tcb_layouts() -> None:
    raw = int.from_bytes(bytes([1, 2, 3, 4, 5, 6, 7, 8]), "little")
    milan = snp.decode_tcb(raw, "Milan")
    assert (milan.bootloader, milan.tee, milan.snp, milan.microcode, milan.fmc) == (1, 2, 7, 8, None)
    assert snp.decode_tcb(raw, "Genoa") == milan
    turin = snp.decode_tcb(raw, "Turin")
    assert (turin.fmc, turin.bootloader, turin.tee, turin.snp, turin.microcode) == (1, 2, 3, 4, 8)


def test_product_from_cpuid() -> None:
    assert snp.product_from_cpuid(0x19, 0x01) == "Milan"
    assert snp.product_from_cpuid(0x19, 0x11) == "Genoa"
    assert snp.product_from_cpuid(0x19, 0xA0) == "Genoa"
    assert snp.product_from_cpuid(0x1A, 0x02) == "Turin"
    assert snp.product_from_cpuid(0x17, 0x31) is None
    assert snp.product_from_cpuid(None, None) is None


def test_malformed_extension_values() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1"), bytes([2, 1, 0x80])),)
    rest = tuple(e for e in kds_extensions() if getattr(e, "oid", None) != bad[0].oid)
    cert = make_cert("SEV-VCEK", "SEV-Milan", key.public_key(), signer, ca=False, extensions=bad + rest)
    with pytest.raises(CvmError) as exc:
        snp.read_vcek_extensions(cert)
    assert reason(exc) == "certificate_malformed"
    missing = tuple(e for e in kds_extensions() if getattr(e, "oid", None) != bad[0].oid)
    cert = make_cert("SEV-VCEK", "SEV-Milan", key.public_key(), signer, ca=False, extensions=missing)
    with pytest.raises(CvmError) as exc:
        snp.read_vcek_extensions(cert)
    assert reason(exc) == "certificate_malformed"


# ------------------------------------------------------------------------------------------------------ the module


def test_reason_codes_are_short_snake_case() -> None:
    for code in snp.REASONS:
        assert len(code) <= 32 and code.replace("_", "").isalpha() and code == code.lower()


def test_chain_verification_is_cached_and_the_signature_is_not() -> None:
    snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=AT)
    hits = snp._endorse.cache_info().hits
    snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=AT)
    assert snp._endorse.cache_info().hits == hits + 1
    with pytest.raises(CvmError) as exc:  # a cached chain still checks this report's signature
        snp.verify_snp(flip(REPORT, 0x90), MILAN_VCEK, MILAN_CHAIN, at=AT)
    assert reason(exc) == "report_signature_invalid"
    with pytest.raises(CvmError) as exc:  # and this call's time
        snp.verify_snp(REPORT, MILAN_VCEK, MILAN_CHAIN, at=datetime(2031, 1, 1, tzinfo=UTC))
    assert reason(exc) == "certificate_expired"
