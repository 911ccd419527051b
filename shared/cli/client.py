"""`qvm client`: a client who trusts only the hardware runs a confidential job.

    qvm client run JOB.yaml --image-bundle DIR --secret api-token=@token.txt
        submit; wait for the instance's attestation; gather its evidence (quote, PCRs, measurement log, AK
        enrollment) and check it here with the verifier's code; show exactly what was verified; only then
        seal the secrets to the instance's key and release them; follow the job to its end and print its
        output, sealed to an X25519 key made for this run (held in memory only) and opened here.
    qvm client verify JOB_ID [--image-digest HEX]
        the same check for a job already running, without releasing anything.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric import x25519
from rich.console import Console
from rich.table import Table

from shared.bus import Bus
from shared.cli import common
from shared.client.bundle import MAX_FILE_BYTES, BundleError
from shared.client.evidence import EvidenceError
from shared.client.output import OutputError, new_output_key, open_output_events, with_output_key
from shared.client.sdk import ConfidentialClient
from shared.client.verify import ClientVerificationError, VerifiedInstance
from shared.codec import Event
from shared.config import CommonSettings, MeasurementSettings
from shared.errors import QvmError
from shared.events import Domain, scope_filter
from shared.identity import Identity, Role
from shared.image.manifest import MANIFEST
from shared.pki import Pki
from shared.replay import fold_jobs

__all__ = ["client_app", "image_digest", "parse_secret", "show_output", "show_verified"]

client_app = typer.Typer(help="Confidential jobs: verify the instance yourself, then release your secrets.",
                         no_args_is_help=True)
console = Console()


def parse_secret(text: str) -> tuple[str, bytes]:
    """`name=@path` (a file's bytes) or `name=value`."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise QvmError(f"--secret {text[:40]!r}: use name=@file or name=value")
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise QvmError(f"--secret {name}: {path} is larger than {MAX_FILE_BYTES} bytes")
            return name, path.read_bytes()
        except OSError as exc:
            raise QvmError(f"--secret {name}: cannot read {path} ({exc.strerror})") from None
    return name, value.encode()


def image_digest(bundle: Path) -> str:
    """The digest a client expects: SHA-256 of the image's signed manifest."""
    try:
        return hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
    except OSError as exc:
        raise QvmError(f"{bundle}: no image manifest ({exc.strerror})") from None


def show_verified(v: VerifiedInstance, out: Console) -> None:
    table = Table(title=f"verified by the client: instance {v.instance_id} of job {v.job_id}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    m = v.launch
    for what, value in (
        ("node", v.node_id), ("image manifest", m.image_manifest_sha256), ("kernel", m.kernel_sha256),
        ("initrd", m.initrd_sha256), ("root fs", m.rootfs_sha256), ("VMM", f"{m.vmm} {m.vmm_sha256}"),
        ("security policy", ", ".join(f"{k}={val}" for k, val in sorted(m.security_policy.items()))),
        ("agent code", v.agent_sha256), (f"PCR (sha256) replayed from {m.kind} log", v.claims.pcr_sha256),
        ("AK (name)", v.claims.ak_name), ("EK (sha256)", v.ek_sha256),
        ("instance key (X25519)", v.public_key.hex()),
        ("quote", "signature, nonce + instance key in extraData, PCR digest: ok"),
        ("result valid until", time.strftime("%H:%M:%S", time.localtime(v.expires_ns / 1e9))),
    ):
        table.add_row(what, value)
    if v.cvm is not None:  # the confidential VM's own hardware report, beside the host's TPM quote
        table.add_row(f"{v.cvm.kind} report", "vendor signature and chain to the pinned root, REPORT_DATA = nonce "
                                              "+ instance key: ok")
        for name, value in v.cvm.fields.items():
            if name != "report_data":
                table.add_row(f"  {name}", value)
    out.print(table)


def show_output(events: list[Event], job_id: str, private_key: x25519.X25519PrivateKey | None, out: Console,
                prefix: str = "  | ", indent: str = "") -> bool:
    """Open the job's output with the client's key and print it; False when it does not open or verify.
    Without the key (the job file named its own output_key) only say that it is sealed."""
    if private_key is None:
        out.print(f"{indent}output of {job_id}: sealed to the job's output_key (this command does not hold its "
                  "private key)")
        return True
    try:
        opened = open_output_events(events, job_id, private_key, require_complete=False)
    except OutputError as exc:
        out.print(f"{indent}[red]output NOT opened[/red]: {exc.reason}: {exc.detail}")
        return False
    for line in opened.data.decode(errors="replace").splitlines():
        out.print(f"{prefix}{line}", markup=False, highlight=False)
    if opened.complete:
        out.print(f"{indent}output: {len(opened.data)} bytes, opened with the client's key and verified (every "
                  "chunk, the digest of the sealed chunks, the byte count)"
                  + (f"; only the first {len(opened.data)} of {opened.total_bytes} bytes were published"
                     if opened.truncated else ""))
    else:
        out.print(f"{indent}output: {len(opened.data)} bytes opened; the workload did not exit, so it may be "
                  "incomplete")
    return True


async def _connect(settings: CommonSettings) -> Bus:
    return await Bus.connect(settings.resolve_nats_url(), Pki(settings.pki_path), Identity(Role.MARKETPLACE))


async def _verify(client: ConfidentialClient, job_id: str, expected: list[str], timeout_s: float) -> VerifiedInstance:
    try:
        return await client.verify(job_id, expected_images=expected, timeout_s=timeout_s)
    except (EvidenceError, ClientVerificationError) as exc:
        raise QvmError(f"instance NOT verified, nothing released: {exc.reason}: {exc.detail}") from None


@client_app.command("run")
def run(job_file: Path,
        image_bundle: Annotated[Path | None, typer.Option(help="The image you expect (its manifest digest)")] = None,
        image_digest_hex: Annotated[list[str] | None, typer.Option("--image-digest", help="Expected digest(s)")
                                    ] = None,
        secret: Annotated[list[str] | None, typer.Option(help="name=@file or name=value (repeatable)")] = None,
        timeout: Annotated[float, typer.Option(help="Seconds to wait for the attestation")] = 180.0) -> None:
    """Submit a confidential job, verify its instance, release the secrets, follow it to the end."""
    from shared.jobspec import load_job

    async def body() -> None:
        job_id, job = load_job(job_file)
        files = dict(parse_secret(s) for s in secret or [])
        if files and not job.client_secrets:
            raise QvmError(f"{job_file}: secrets given but the job does not set client_secrets: true")
        if job.client_secrets and not files:
            raise QvmError(f"{job_file}: the job waits for client secrets: give at least one --secret")
        expected = list(image_digest_hex or []) + ([image_digest(image_bundle)] if image_bundle else [])
        output_key: x25519.X25519PrivateKey | None = None
        if job.output_key is None:  # an ephemeral key, in memory only: the output is sealed to it
            output_key = new_output_key()
            job = with_output_key(job, output_key)
        settings = MeasurementSettings()
        bus = await _connect(settings)
        try:
            client = ConfidentialClient(bus, settings.measurement_pcr)
            await client.submit(job, job_id)
            console.print(f"submitted [bold]{job_id}[/bold]; waiting for its instance's attestation")
            verified = await _verify(client, job_id, expected, timeout)
            show_verified(verified, console)
            if files:
                try:
                    await client.release_secrets(verified, files)
                except BundleError as exc:
                    raise QvmError(f"secrets not released: {exc.reason}: {exc.detail}") from None
                console.print(f"released {len(files)} secret(s), sealed to instance key "
                              f"{verified.public_key.hex()[:16]}…")
            await _follow_output(bus, job_id, output_key)
        finally:
            await bus.close()

    common.run(body)


@client_app.command("verify")
def verify(job_id: str,
           image_digest_hex: Annotated[list[str] | None, typer.Option("--image-digest")] = None,
           timeout: float = 30.0) -> None:
    """Check a job's instance evidence here (nothing is released)."""

    async def body() -> None:
        settings = MeasurementSettings()
        bus = await _connect(settings)
        try:
            verified = await _verify(ConfidentialClient(bus, settings.measurement_pcr), job_id,
                                     list(image_digest_hex or []), timeout)
            show_verified(verified, console)
        finally:
            await bus.close()

    common.run(body)


async def _follow_output(bus: Bus, job_id: str, private_key: x25519.X25519PrivateKey | None,
                         seconds: float = 600.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        book, events = await fold_jobs(bus.js, bus.codec, scope_filter(Domain.JOBS, job_id))
        view = book.get(job_id)
        if view is not None and view.terminal:
            opened = show_output(events, job_id, private_key, console)
            console.print(f"job {job_id}: [bold]{view.state}[/bold] (exit code {view.exit_code})")
            if not opened:
                raise QvmError(f"job {job_id}: its output did not open or verify with this run's key")
            return
        await asyncio.sleep(0.5)
    raise QvmError(f"job {job_id} did not finish within {seconds:g}s")
