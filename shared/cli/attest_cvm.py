"""`qvm attest check-snp` and `check-tdx`: a client's or an auditor's own check of confidential-VM evidence,
with the code the attestation verifier runs (`shared.cvm`).

They take what the vendors' tools take (`snpguest verify` / `snpguest fetch`: a report file, the VCEK, the
ASK+ARK chain; a TDX quote file and Intel PCS collateral), in raw binary or hex for reports and DER or PEM for
certificates. Exit 0 prints the verified fields; exit 1 prints the reason code of the first failed check;
exit 2 is an unusable input (a file that cannot be read). Certificates and collateral have dates: `--at`
checks them at another time than now (how the test vectors from real hardware stay valid).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from rich.console import Console
from rich.markup import escape

from shared.cli.attest_files import InputError, parse_hex, read_input
from shared.cvm import snp, tdx
from shared.cvm.errors import CvmError
from shared.cvm.tdx_collateral import load_collateral_dir

__all__ = ["check_snp", "check_tdx"]

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _at(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"--at {value!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _usage(exc: InputError) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(2)


def _refused(kind: str, exc: CvmError) -> typer.Exit:
    console.print(f"[red]invalid {kind}:[/red] {escape(exc.reason)}: {escape(exc.detail)}", soft_wrap=True)
    return typer.Exit(1)


def _print(title: str, fields: dict[str, str]) -> None:
    console.print(f"[green]{title}[/green]")
    width = max(map(len, fields))
    for name, value in fields.items():
        console.print(f"  {name.ljust(width)}  {escape(value)}", soft_wrap=True)


def _extra_roots(paths: list[Path]) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(c for p in paths for c in x509.load_pem_x509_certificates(read_input(p, "root")))
    except ValueError:
        raise InputError("--trust-root takes PEM certificates") from None


def check_snp(
    report: Annotated[Path, typer.Option(help="The attestation report (1184 bytes, raw or hex)")],
    vcek: Annotated[Path, typer.Option(help="The VCEK (or VLEK) that signed it, DER or PEM")],
    chain: Annotated[Path | None, typer.Option(help="ASK then ARK, PEM (AMD KDS cert_chain); default: the ones "
                                                    "qvm ships for the product")] = None,
    report_data: Annotated[str | None, typer.Option(help="Expected REPORT_DATA (hex, up to 64 bytes)")] = None,
    measurement: Annotated[list[str] | None, typer.Option(help="An allowed launch measurement (hex); "
                                                               "repeatable. Without it any is shown, not checked")]
    = None,
    allow_debug: Annotated[bool, typer.Option(help="Accept a guest policy that allows debugging")] = False,
    crl: Annotated[Path | None, typer.Option(help="AMD's CRL for the product, DER or PEM")] = None,
    at: Annotated[str | None, typer.Option(help="Check certificate dates at this time (ISO 8601)")] = None,
    trust_root: Annotated[list[Path] | None, typer.Option(help="Another ARK to trust besides AMD's pinned roots "
                                                               "(PEM; for test hardware only)")] = None,
) -> None:
    """Check an SEV-SNP report: signature, VCEK chain to AMD's pinned ARK, VCEK TCB, policy."""
    try:
        when = _at(at)
        data = read_input(report, "report")
        cert = read_input(vcek, "VCEK")
        chain_pem = read_input(chain, "chain") if chain else None
        crl_data = read_input(crl, "CRL") if crl else None
        expected = parse_hex(report_data, "--report-data").ljust(64, b"\0") if report_data is not None else None
        policy = snp.SnpPolicy(allow_debug=allow_debug, measurements=tuple(measurement or ()),
                               allow_any_measurement=not measurement)
        roots = _extra_roots(trust_root or [])
    except (InputError, ValueError) as exc:
        raise _usage(exc if isinstance(exc, InputError) else InputError(str(exc).splitlines()[0])) from None
    if expected is not None and len(expected) != 64:
        raise _usage(InputError("--report-data is at most 64 bytes"))
    try:
        verified = snp.verify_snp(data, cert, chain_pem, at=when, policy=policy, report_data=expected, crl=crl_data,
                                  extra_roots=roots)
    except CvmError as exc:
        raise _refused("SEV-SNP report", exc) from None
    _print("valid SEV-SNP report", verified.summary())


def check_tdx(
    quote: Annotated[Path, typer.Option(help="The TDX quote (v4 or v5), raw or hex")],
    report_data: Annotated[str | None, typer.Option(help="Expected REPORTDATA (hex, up to 64 bytes)")] = None,
    mrtd: Annotated[list[str] | None, typer.Option(help="An allowed MRTD (hex); repeatable. Without it any is "
                                                        "shown, not checked")] = None,
    collateral: Annotated[Path | None, typer.Option(help="Intel PCS collateral directory (tcb_info.json, "
                                                         "qe_identity.json, tcb_signing_chain.pem, rootcrl.der, "
                                                         "pckcrl.der); without it the TCB status is not derived")]
    = None,
    allow_debug: Annotated[bool, typer.Option(help="Accept a debuggable TD")] = False,
    accept_tcb: Annotated[list[str] | None, typer.Option(help="TCB statuses to accept (default UpToDate)")] = None,
    at: Annotated[str | None, typer.Option(help="Check certificate and collateral dates at this time")] = None,
    trust_root: Annotated[list[Path] | None, typer.Option(help="Another root to trust besides Intel's pinned "
                                                               "SGX Root CA (PEM; for test hardware only)")] = None,
) -> None:
    """Check a TDX quote: quote and QE signatures, PCK chain to Intel's pinned root, collateral, policy."""
    try:
        when = _at(at)
        data = read_input(quote, "quote")
        text = data.strip()
        if text and all(c in b"0123456789abcdefABCDEF" for c in text):
            data = bytes.fromhex(text.decode())
        expected = parse_hex(report_data, "--report-data").ljust(64, b"\0") if report_data is not None else None
        bundle = load_collateral_dir(collateral) if collateral else None
        policy = tdx.TdxPolicy(allow_debug=allow_debug, mrtd=tuple(mrtd or ()), allow_any_mrtd=not mrtd,
                               require_collateral=collateral is not None,
                               **({"accepted_tcb_status": tuple(accept_tcb)} if accept_tcb else {}))
        roots = _extra_roots(trust_root or [])
    except (InputError, ValueError) as exc:
        raise _usage(exc if isinstance(exc, InputError) else InputError(str(exc).splitlines()[0])) from None
    except CvmError as exc:
        raise _refused("TDX collateral", exc) from None
    try:
        verified = tdx.verify_tdx(data, at=when, collateral=bundle, policy=policy, report_data=expected,
                                  extra_roots=roots)
    except CvmError as exc:
        raise _refused("TDX quote", exc) from None
    _print("valid TDX quote", verified.summary())
