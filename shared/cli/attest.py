"""`qvm attest ...`: check TPM evidence without trusting qvm's servers, show it, write policies.

`check-quote` takes exactly the files `tpm2_quote` writes and `tpm2_checkquote` reads, and checks them with
`shared.tpm.quote.verify_quote`, the code the attestation verifier runs: a client (or an auditor) can
re-check any quote with qvm's rules, and cross-check qvm against tpm2-tools. `show` prints a piece of
evidence readably; `export` writes it as tpm2-tools files, so `tpm2_checkquote` can judge qvm's quotes
without any qvm code at all.

Exit codes: 0 a valid quote (or the requested output), 1 a quote that must not be trusted, 2 input that
cannot be read. Nothing here needs a TPM or a TPM software stack: only `struct`, `hashlib`, `cryptography`.

The files these commands read and write (tpm2-tools PCR files, AK keys, evidence) are parsed in
`shared.cli.attest_files`; this module holds the commands and how they print.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.cli.attest_cvm import check_snp, check_tdx
from shared.cli.attest_files import (
    InputError,
    alg_name,
    hash_alg,
    load_evidence,
    load_public,
    parse_hex,
    parse_pcr_list,
    parse_pcr_serialized,
    parse_pcr_values,
    read_input,
    write_pcr_serialized,
)
from shared.cvm.errors import CvmError
from shared.errors import QvmError
from shared.tpm.measurements import AgentMeasurement, InstanceMeasurement, entry_digest, parse_log, replay
from shared.tpm.quote import QuoteError, verify_quote
from shared.tpm.structures import (
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    Alg,
    Attest,
    PcrSelection,
    PublicArea,
    parse_attest,
    parse_public,
    parse_signature,
)

__all__ = ["attest_app"]

attest_app = typer.Typer(help="TPM attestation: check quotes, show evidence, write policies.", no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

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


def _pcr_text(selections: Sequence[PcrSelection]) -> str:
    return " ".join(f"{alg_name(s.hash_alg)}:{','.join(map(str, s.pcrs)) or '-'}" for s in selections) or "none"


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
        alg = hash_alg(hash_algorithm)
        extra = parse_hex(qualification, "qualification")
        ak_public = load_public(public)
        attest = read_input(message, "message")
        sig = read_input(signature, "signature")
        pcr_data = read_input(pcr, "PCR file")
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
        ("signature", f"{alg_name(sig.sig_alg)} with {alg_name(sig.hash_alg)}"),
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
    snp_ovmf: Annotated[Path | None, typer.Option(help="The AmdSev OVMF build confidential guests boot: approve "
                                                       "the images' SEV-SNP launch measurements")] = None,
    snp_vcpus: Annotated[str, typer.Option(help="vCPU counts to measure for (comma-separated)")] = "1,2,4,8",
) -> None:
    """Write a policy approving this checkout's node-agent, the images in IMAGES and this machine's QEMU
    (and, with --snp-ovmf, the images' SEV-SNP launch measurements); review it before shipping it to the
    verifiers."""
    from shared.tpm.policy_gen import local_policy, snp_measurements

    with _clean_errors():
        if not images.is_dir():
            raise InputError(f"{images} is not a directory of image bundles")
        written = local_policy(images, ek_ca=ek_ca, qemu=qemu)
        if snp_ovmf is not None:
            try:
                counts = tuple(sorted({int(n) for n in snp_vcpus.split(",") if n.strip()}))
            except ValueError:
                raise InputError(f"--snp-vcpus {snp_vcpus!r} is not a list of numbers") from None
            try:
                measured = snp_measurements(images, snp_ovmf, counts)
            except CvmError as exc:
                raise InputError(f"SEV-SNP measurement: {exc.reason}: {exc.detail}") from None
            cvm = written.cvm.model_copy(update={"snp": written.cvm.snp.model_copy(update={"measurements": measured})})
            written = written.model_copy(update={"cvm": cvm})
        try:
            out.write_text(written.model_dump_json(indent=2))
        except OSError as exc:
            raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
    console.print(f"wrote {out}: {len(written.images)} image(s), {len(written.vmms)} VMM binary(ies), "
                  f"{len(written.cvm.snp.measurements)} SEV-SNP measurement(s), "
                  f"EK certificates {'required' if written.require_ek_certificate else 'not required'}")


# The confidential-VM checks live beside these (shared/cli/attest_cvm.py); they share this command group.
attest_app.command("check-snp")(check_snp)
attest_app.command("check-tdx")(check_tdx)
