"""9. Confidential-VM evidence: SEV-SNP reports and TDX quotes verified per second, on evidence real hardware made
(../shared/vectors/cvm), each beside the cost of the signature checks it cannot skip."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench.common import Figure, say, section
from shared.cvm.snp import SnpPolicy, load_certificates, parse_report, verify_snp
from shared.cvm.tdx import TdxPolicy, verify_tdx
from shared.cvm.tdx_collateral import TdxCollateral

__all__ = ["run"]

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "cvm"
SECONDS = 2.0
TARGET = 1000.0
SNP_AT = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
TDX_AT = dt.datetime(2023, 7, 1, 1, tzinfo=dt.UTC)


def _rate(fn: Callable[[], object], seconds: float = SECONDS) -> float:
    fn()  # warm: the chain and collateral checks are cached on their exact bytes after the first
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for _ in range(50):
            fn()
        n += 50
    return n / elapsed


def _ecdsa_rate(curve: ec.EllipticCurve, digest: hashes.HashAlgorithm) -> float:
    key = ec.generate_private_key(curve)
    sig = key.sign(b"m" * 64, ec.ECDSA(digest))
    public = key.public_key()
    return _rate(lambda: public.verify(sig, b"m" * 64, ec.ECDSA(digest)), 1.0)


def _measure() -> list[Figure]:
    snp, tdx = VECTORS / "snp", VECTORS / "tdx"
    report = bytes.fromhex((snp / "milan-report.hex").read_text().strip())
    vcek, chain = (snp / "milan-vcek.der").read_bytes(), (snp / "milan-ask-ark.pem").read_bytes()
    parsed = parse_report(report)
    snp_policy = SnpPolicy(measurements=(parsed.measurement.hex(),))
    assert load_certificates(vcek)
    snp_rate = _rate(lambda: verify_snp(report, vcek, chain, at=SNP_AT, policy=snp_policy,
                                        report_data=parsed.report_data))
    p384 = _ecdsa_rate(ec.SECP384R1(), hashes.SHA384())

    quote = (tdx / "tdx_prod_quote_SPR_E4.dat").read_bytes()
    collateral = TdxCollateral.from_files(tdx / "sample_tcbInfo_response", tdx / "sample_qeIdentity_response",
                                          root_ca_crl=tdx / "rootcrl.der", pck_crl=tdx / "pckcrl")
    tdx_policy = TdxPolicy(allow_any_mrtd=True, accepted_tcb_status=("TcbNotSupported",))
    tdx_rate = _rate(lambda: verify_tdx(quote, at=TDX_AT, collateral=collateral, policy=tdx_policy))
    p256 = _ecdsa_rate(ec.SECP256R1(), hashes.SHA256())
    return [
        Figure("SEV-SNP report verifications/s, one process", snp_rate, "/s", TARGET, higher_is_better=True,
               note=f"{snp_rate / p384:.2f} of bare ECDSA P-384 verifies ({p384:,.0f}/s), the one signature each "
                    "report needs"),
        Figure("TDX quote verifications/s, one process", tdx_rate, "/s", TARGET, higher_is_better=True,
               note=f"{tdx_rate / (p256 / 2):.2f} of half the bare ECDSA P-256 verifies ({p256:,.0f}/s): quote and "
                    "QE report signatures"),
    ]


async def run(_tmp: Path) -> list[Figure]:
    section(
        "9. Confidential-VM evidence (real hardware vectors)",
        "shared.cvm.snp.verify_snp on the Milan report with its VCEK and ASK/ARK chain (signature, chain to the "
        "pinned ARK, VCEK TCB and chip id, guest policy, measurement allow-list, REPORT_DATA), and "
        "shared.cvm.tdx.verify_tdx on the Sapphire Rapids v4 quote with Intel's sample collateral and CRLs (quote "
        "and QE report signatures, QE binding, PCK chain to the pinned root, CRLs, collateral signatures, TCB "
        f"status, policy), each looped for {SECONDS:g} s in this process; certificate chains, CRLs and collateral "
        "signatures are verified once per exact bytes and cached (dates are checked on every call), the report or "
        "quote signatures on every call",
    )
    if not (VECTORS / "snp").is_dir():
        say(f"  skipped: no vectors at {VECTORS}")
        return [Figure("CVM evidence verifications/s", None, "/s", note="no vectors")]
    figs = await asyncio.to_thread(_measure)
    for f in figs:
        say(f.line())
    return figs
