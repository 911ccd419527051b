"""`qvm attest check-snp` and `check-tdx` on the evidence real hardware made: exit 0 with the verified fields,
exit 1 with the reason code of the failed check, exit 2 for an input that cannot be used."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.cli.main import app

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "cvm"
if not VECTORS.is_dir():
    pytest.skip(f"no CVM vectors at {VECTORS}", allow_module_level=True)
SNP, TDX = VECTORS / "snp", VECTORS / "tdx"
MILAN_MEASUREMENT = ("7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd"
                     "81841f")
runner = CliRunner()


def _snp(*extra: str) -> tuple[int, str]:
    result = runner.invoke(app, ["attest", "check-snp", "--report", str(SNP / "milan-report.hex"),
                                 "--vcek", str(SNP / "milan-vcek.der"), "--at", "2025-01-01T00:00:00Z", *extra])
    return result.exit_code, result.output


def test_check_snp_prints_the_verified_fields_of_a_real_report() -> None:
    code, out = _snp("--chain", str(SNP / "milan-ask-ark.pem"), "--measurement", MILAN_MEASUREMENT)
    assert code == 0, out
    assert "valid SEV-SNP report" in out and MILAN_MEASUREMENT in out and "Milan" in out


@pytest.mark.parametrize(("args", "reason"), [
    (("--measurement", "00" * 48), "measurement_not_allowed"),
    (("--report-data", "00" * 64), "report_data_mismatch"),
    (("--at", "2031-01-01"), "certificate_expired"),  # the VCEK's validity ends in 2030
    (("--chain", str(SNP / "turin-ask-ark.pem")), "vcek_chain_untrusted"),
])
def test_check_snp_refuses_with_the_reason(args: tuple[str, ...], reason: str) -> None:
    code, out = _snp(*args)
    assert code == 1 and f"invalid SEV-SNP report: {reason}" in out, out


def test_check_snp_refuses_a_flipped_byte_and_unusable_input(tmp_path: Path) -> None:
    raw = bytearray(bytes.fromhex((SNP / "milan-report.hex").read_text().strip()))
    raw[0x90] ^= 1  # the measurement, inside the signed body
    (tmp_path / "report.bin").write_bytes(bytes(raw))
    result = runner.invoke(app, ["attest", "check-snp", "--report", str(tmp_path / "report.bin"), "--vcek",
                                 str(SNP / "milan-vcek.der"), "--at", "2025-01-01"])
    assert result.exit_code == 1 and "report_signature_invalid" in result.output
    assert _snp("--at", "yesterday")[0] == 2
    result = runner.invoke(app, ["attest", "check-snp", "--report", str(tmp_path / "missing"), "--vcek",
                                 str(SNP / "milan-vcek.der")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def _tdx(quote: Path, *extra: str) -> tuple[int, str]:
    result = runner.invoke(app, ["attest", "check-tdx", "--quote", str(quote), "--at", "2023-07-01T01:00:00Z",
                                 *extra])
    return result.exit_code, result.output


def test_check_tdx_on_a_real_v4_quote_with_and_without_collateral(tmp_path: Path) -> None:
    quote = TDX / "tdx_prod_quote_SPR_E4.dat"
    code, out = _tdx(quote)
    assert code == 0 and "valid TDX quote" in out and "6363b8043668a3ad" in out, out
    for src, dst in (("sample_tcbInfo_response", "tcb_info.json"), ("sample_qeIdentity_response", "qe_identity.json"),
                     ("rootcrl.der", "rootcrl.der"), ("pckcrl", "pckcrl.der")):
        shutil.copy(TDX / src, tmp_path / dst)
    code, out = _tdx(quote, "--collateral", str(tmp_path))
    assert code == 1 and "tcb_status_not_accepted" in out, out  # the sample collateral predates this platform
    code, out = _tdx(quote, "--collateral", str(tmp_path), "--accept-tcb", "TcbNotSupported")
    assert code == 0 and "TcbNotSupported" in out, out
    code, out = _tdx(quote, "--mrtd", "00" * 48)
    assert code == 1 and "mrtd_not_allowed" in out
    raw = bytearray(quote.read_bytes())
    raw[200] ^= 1  # inside the TD report body
    (tmp_path / "q.dat").write_bytes(bytes(raw))
    code, out = _tdx(tmp_path / "q.dat")
    assert code == 1 and "quote_signature_invalid" in out, out
    (tmp_path / "q.hex").write_text(quote.read_bytes().hex())  # hex input is the same quote
    assert _tdx(tmp_path / "q.hex")[0] == 0
