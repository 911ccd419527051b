"""The verifier's face for confidential-VM evidence (`shared.cvm.evidence.verify_cvm`), fed the bytes real AMD and
Intel hardware made: it accepts them under a policy that names them, refuses a VCEK that does not chain to AMD's
pinned root (a forged one, made by the hardware fake), and takes the VCEK out of an extended report's
certificate table without trusting anything else in it."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from shared.cvm.errors import CvmError, expected_report_data
from shared.cvm.evidence import CvmPolicy, snp_certificates, verify_cvm
from shared.cvm.snp import SnpPolicy, parse_report
from shared.cvm.tdx import TdxPolicy
from shared.events import CvmEvidence, CvmKind
from shared.tpm.policy import AttestationPolicy
from tests.framework.fake_cvm import FakeSnpFirmware

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "cvm"
if not VECTORS.is_dir():
    pytest.skip(f"no CVM vectors at {VECTORS}", allow_module_level=True)

MILAN = bytes.fromhex((VECTORS / "snp" / "milan-report.hex").read_text().strip())
MILAN_VCEK = (VECTORS / "snp" / "milan-vcek.der").read_bytes()
TDX_V4 = (VECTORS / "tdx" / "tdx_prod_quote_SPR_E4.dat").read_bytes()
AT_SNP = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
AT_TDX = dt.datetime(2023, 7, 1, 1, tzinfo=dt.UTC)


def _milan() -> tuple[CvmEvidence, bytes, str]:
    report = parse_report(MILAN)
    return (CvmEvidence(kind=CvmKind.SEV_SNP, report=MILAN.hex(), certificates=MILAN_VCEK.hex()),
            report.report_data, report.measurement.hex())


def test_a_real_milan_report_verifies_under_a_policy_that_names_its_measurement() -> None:
    ev, report_data, measurement = _milan()
    verdict = verify_cvm(ev, report_data=report_data, at=AT_SNP,
                         policy=CvmPolicy(snp=SnpPolicy(measurements=(measurement,))))
    assert verdict.kind is CvmKind.SEV_SNP and verdict.measurement == measurement
    assert verdict.tcb.startswith("Milan ") and verdict.fields["vmpl"] == "0" and verdict.fields["debug"] == "false"


@pytest.mark.parametrize(("policy", "report_data", "reason"), [
    (CvmPolicy(), None, "measurement_not_allowed"),  # the default policy trusts no image
    (CvmPolicy(snp=SnpPolicy(allow_any_measurement=True)), b"\x01" * 64, "report_data_mismatch"),
    (CvmPolicy(snp=SnpPolicy(allow_any_measurement=True, allow_smt=False)), None, "smt_not_allowed"),
])
def test_the_real_report_is_refused_by_policy_with_its_reason(policy: CvmPolicy, report_data: bytes | None,
                                                              reason: str) -> None:
    ev, own, _ = _milan()
    with pytest.raises(CvmError) as err:
        verify_cvm(ev, report_data=report_data or own, policy=policy, at=AT_SNP)
    assert err.value.reason == reason


def test_a_forged_vcek_is_refused_even_when_it_signed_the_report(tmp_path: Path) -> None:
    """The hardware fake's VCEK signs a well-formed report bound to the right REPORT_DATA; its chain ends at an
    ARK that is not AMD's, so it is refused: a chain in the evidence never makes a root trusted."""
    fake = FakeSnpFirmware()
    data = expected_report_data(b"n" * 32, b"k" * 32)
    ev = CvmEvidence(kind=CvmKind.SEV_SNP, report=fake.report(data).hex(), certificates=fake.certificate_table().hex())
    policy = CvmPolicy(snp=SnpPolicy(allow_any_measurement=True))
    with pytest.raises(CvmError) as err:
        verify_cvm(ev, report_data=data, policy=policy, at=dt.datetime.now(dt.UTC))
    assert err.value.reason in {"ark_not_pinned", "vcek_chain_untrusted"}
    # ... and accepted only when an operator names that root in the policy (how the end-to-end test runs)
    trusted = policy.model_copy(update={"extra_roots": (fake.write_root(tmp_path / "fake-ark.pem"),)})
    assert verify_cvm(ev, report_data=data, policy=trusted, at=dt.datetime.now(dt.UTC)).measurement == "5e" * 48
    # the real report with the forged VCEK in its place: the signature does not verify
    ev_real = CvmEvidence(kind=CvmKind.SEV_SNP, report=MILAN.hex(),
                          certificates=fake.vcek.public_bytes(serialization.Encoding.DER).hex())
    with pytest.raises(CvmError) as err:
        verify_cvm(ev_real, report_data=parse_report(MILAN).report_data, policy=trusted, at=AT_SNP)
    assert err.value.reason == "vcek_chain_untrusted"  # the forged VCEK is not signed by AMD's Milan ASK


def test_the_vcek_comes_from_the_certificate_table_or_the_offline_cache(tmp_path: Path) -> None:
    fake = FakeSnpFirmware()
    vcek = fake.vcek.public_bytes(serialization.Encoding.DER)
    leaf, chain = snp_certificates(fake.certificate_table())
    assert leaf == vcek and chain == fake.chain_pem()
    assert snp_certificates(vcek) == (vcek, None)
    assert snp_certificates(bytes(24)) == (b"", None)  # an empty table
    with pytest.raises(CvmError):  # an entry pointing outside the table
        snp_certificates(fake.certificate_table()[:200])
    # no certificates in the evidence: the VCEK cached for this chip and TCB (fetched from AMD's key service)
    ev, report_data, measurement = _milan()
    bare = ev.model_copy(update={"certificates": ""})
    policy = CvmPolicy(snp=SnpPolicy(measurements=(measurement,)))
    with pytest.raises(CvmError) as err:
        verify_cvm(bare, report_data=report_data, policy=policy, at=AT_SNP)
    assert err.value.reason == "vcek_missing"
    report = parse_report(MILAN)
    (tmp_path / f"{report.chip_id.hex()}-{report.reported_tcb.raw:016x}.der").write_bytes(MILAN_VCEK)
    cached = policy.model_copy(update={"vcek_dir": tmp_path})
    assert verify_cvm(bare, report_data=report_data, policy=cached, at=AT_SNP).measurement == measurement


def test_a_real_tdx_quote_verifies_with_collateral_from_the_offline_cache(tmp_path: Path) -> None:
    for src, dst in (("sample_tcbInfo_response", "tcb_info.json"), ("sample_qeIdentity_response", "qe_identity.json"),
                     ("rootcrl.der", "rootcrl.der"), ("pckcrl", "pckcrl.der")):
        shutil.copy(VECTORS / "tdx" / src, tmp_path / dst)
    ev = CvmEvidence(kind=CvmKind.TDX, report=TDX_V4.hex())
    quote_data = bytes.fromhex("6c62dec1b8191749a31dab490be532a35944dea47caef1f980863993d9899545eb7406a38d1eed313b9"
                               "87a467dacead6f0c87a6d766c66f6f29f8acb281f1113")
    # The sample collateral is older than this platform's TCB: Intel's appraisal gives no matching level.
    strict = CvmPolicy(tdx=TdxPolicy(allow_any_mrtd=True), tdx_collateral=tmp_path)
    with pytest.raises(CvmError) as err:
        verify_cvm(ev, report_data=quote_data, policy=strict, at=AT_TDX)
    assert err.value.reason == "tcb_status_not_accepted"
    lenient = strict.model_copy(update={"tdx": TdxPolicy(allow_any_mrtd=True, accepted_tcb_status=("TcbNotSupported",))})
    verdict = verify_cvm(ev, report_data=quote_data, policy=lenient, at=AT_TDX)
    assert verdict.kind is CvmKind.TDX and verdict.tcb == "TcbNotSupported" and verdict.measurement.startswith("6363b8")
    (tmp_path / "tcb_info.json").unlink()
    with pytest.raises(CvmError) as err:
        verify_cvm(ev, report_data=quote_data, policy=lenient, at=AT_TDX)
    assert err.value.reason == "collateral_missing"


def test_the_attestation_policy_carries_the_cvm_policy_and_reads_old_vmm_entries() -> None:
    policy = AttestationPolicy.model_validate_json(
        '{"vmms": {"' + "77" * 32 + '": "qemu-microvm"}, "cvm": {"snp": {"measurements": ["' + "ab" * 48 + '"]}}}')
    assert policy.vmms["77" * 32] == ("qemu-microvm",)
    assert policy.cvm.snp.measurements == ("ab" * 48,) and not policy.cvm.tdx.allow_any_mrtd
