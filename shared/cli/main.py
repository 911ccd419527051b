"""The `qvm` command line: PKI, the embedded stack, job submission, status, events and audit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric import x25519
from rich.table import Table

from shared.cli.attest import attest_app
from shared.cli.client import client_app, show_output
from shared.cli.common import connect, console, err, local_node_id, run
from shared.cli.keys import keys_app
from shared.cli.node import node_app
from shared.cli.observe import audit_app, events, nodes, status
from shared.cli.render import summarize
from shared.config import CommonSettings, NodeSettings, StackSettings
from shared.errors import QvmError
from shared.events import Domain, scope_filter
from shared.identity import Identity, Role
from shared.models import TrustState
from shared.pki import Pki
from shared.replay import fold_jobs
from shared.telemetry import setup_logging, setup_tracing

logging.getLogger("asyncio").setLevel(logging.ERROR)  # ssl eof_received chatter when connections close
app = typer.Typer(help="qvm: attested micro VMs for GPU marketplace jobs.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
pki_app = typer.Typer(help="Development PKI: CA, TLS and signing certificates.", no_args_is_help=True)
image_app = typer.Typer(help="Signed guest images: keys, build, verify.", no_args_is_help=True)


@app.callback()
def _configure() -> None:
    """Library logs go to stderr as JSON lines, errors only unless QVM_LOG_LEVEL says otherwise."""
    setup_logging("qvm-cli", os.environ.get("QVM_LOG_LEVEL", "ERROR"))
    setup_tracing("qvm-cli")  # a submission starts the job's trace


app.add_typer(pki_app, name="pki")
app.add_typer(audit_app, name="audit")
app.command()(status)
app.command()(nodes)
app.command()(events)
app.add_typer(image_app, name="image")
app.add_typer(attest_app, name="attest")
app.add_typer(client_app, name="client")
app.add_typer(keys_app, name="keys")
app.add_typer(node_app, name="node")
# ------------------------------------------------------------------ pki
@pki_app.command("init")
def pki_init(nodes: Annotated[str, typer.Option(help="Comma-separated node ids to issue node-agent identities for")]
             = "",
             nats_servers: Annotated[str, typer.Option(help="Comma-separated NATS cluster members (nats-1,nats-2,"
                                                            "nats-3): a certificate naming each, for its routes")]
             = "") -> None:
    """Create the CA and every service identity (idempotent)."""
    s = NodeSettings()
    node_list = [n for n in nodes.split(",") if n] or [s.node_id or local_node_id()]
    try:
        pki = Pki(s.pki_path)
        issued = pki.init(nodes=node_list)
        for server in filter(None, nats_servers.split(",")):
            pki.issue_server(server)
    except (QvmError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"PKI at {s.pki_path}: issued {', '.join(map(str, issued)) or 'nothing new'}")


@pki_app.command("add-node")
def pki_add_node(node_id: str) -> None:
    """Issue a node-agent identity (then `qvm pki nats-config` / restart NATS to grant it)."""
    s = CommonSettings()
    try:
        Pki(s.pki_path).issue(Identity(Role.NODE_AGENT, node_id))
    except (QvmError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"issued node-agent.{node_id}")


@pki_app.command("nats-config")
def pki_nats_config() -> None:
    """Print the NATS `authorization` block (users + permissions) for every issued identity: the same block the
    embedded server and cluster use (`shared.natsconf.authorization_block`)."""
    from shared.natsconf import authorization_block

    sys.stdout.write(authorization_block(Pki(CommonSettings().pki_path).identities()))


# ------------------------------------------------------------------ images
@image_app.command("keygen")
def image_keygen(directory: Path) -> None:
    """Create an image publisher key pair (publisher.key stays with the publisher; publisher.pub goes
    to every node that should trust its images)."""
    from shared.image.manifest import generate_publisher_key

    priv, pub = generate_publisher_key(directory)
    console.print(f"private key {priv} (keep it secret), public key {pub}")


@image_app.command("build")
def image_build(
    name: str,
    out: Annotated[Path, typer.Option(help="Bundle directory to write")],
    key: Annotated[Path, typer.Option(help="Publisher private key (qvm image keygen)")],
    rootfs_dir: Annotated[Path | None, typer.Option(help="Root filesystem from a directory")] = None,
    rootfs_tar: Annotated[Path | None, typer.Option(help="Root filesystem from `docker save` / OCI tarball")] = None,
    with_busybox: Annotated[bool, typer.Option(help="Add busybox as /bin/sh and friends")] = False,
    with_vmlinux: Annotated[bool, typer.Option(help="Also ship the ELF kernel (Firecracker, Cloud Hypervisor)")]
    = False,
    kernel: Annotated[str, typer.Option(help="minimal: qvm's guest kernel (built once from linux-source, "
                                             "cached); cloud: a distribution kernel package")] = "minimal",
    kernel_package: Annotated[str, typer.Option(help="Distribution kernel package (--kernel cloud)")]
    = "linux-image-cloud-amd64",
    kernel_deb: Annotated[Path | None, typer.Option(help="Use this kernel .deb instead of downloading "
                                                         "(--kernel cloud)")] = None,
) -> None:
    """Build a signed image bundle: guest kernel, qvm initramfs, read-only ext4 root."""
    from shared.image.build import BuildRequest, build_image, guest_kernel
    from shared.image.kernel import fetch_kernel

    async def body() -> None:
        def work() -> Any:
            guest = fetch_kernel(kernel_package, kernel_deb) if kernel == "cloud" else guest_kernel(kernel)
            return build_image(BuildRequest(name=name, out=out, kernel=guest, publisher_key=key,
                                            rootfs_dir=rootfs_dir, rootfs_tar=rootfs_tar, with_busybox=with_busybox,
                                            with_vmlinux=with_vmlinux))
        with console.status(f"building {name}" + (" (the first build of qvm's guest kernel takes minutes)"
                                                   if kernel == "minimal" else "")):
            manifest = await asyncio.to_thread(work)
        table = Table(title=f"image {name} (publisher {manifest.publisher}, kernel {manifest.kernel_release})")
        for col in ("part", "size", "sha256"):
            table.add_column(col)
        for part in manifest.parts():
            table.add_row(part.file, f"{part.size:,}", part.sha256)
        console.print(table)

    run(body)


@image_app.command("kernel")
def image_kernel() -> None:
    """Build qvm's minimal guest kernel now (once per config, minutes; then cached) and show how it was built."""
    from shared.image.kernel_build import build_guest_kernel

    async def body() -> None:
        with console.status("qvm's minimal guest kernel (the first build takes minutes; cached after)"):
            kernel, build = await asyncio.to_thread(build_guest_kernel)
        table = Table(title=f"guest kernel {kernel.release}")
        for col in ("", ""):
            table.add_column(col)
        for name, value in (("bzImage", str(kernel.vmlinuz)), ("vmlinux (PVH / ELF)", str(kernel.vmlinux)),
                            ("source", build.source), ("compiler", build.compiler),
                            ("config fragment sha256", build.fragment_sha256), ("config sha256", build.config_sha256),
                            ("bzImage sha256", build.bzimage_sha256), ("build time", f"{build.build_s:.0f} s")):
            table.add_row(name, value)
        console.print(table)

    run(body)


@image_app.command("verify")
def image_verify(bundle: Path, pubkey: Annotated[list[Path], typer.Option(help="Trusted publisher key(s)")]) -> None:
    """Check an image bundle's signature and every part's digest; exit 0 only when all hold."""
    from shared.image.manifest import load_public_keys
    from shared.image.verify import verify_bundle

    async def body() -> None:
        started = time.perf_counter()
        manifest = await asyncio.to_thread(verify_bundle, bundle, load_public_keys(pubkey))
        size = sum(p.size for p in manifest.parts())
        secs = time.perf_counter() - started
        console.print(f"[green]verified[/green] {manifest.name}: publisher {manifest.publisher}, "
                      f"{size:,} bytes in {secs:.2f}s ({size / secs / 1e9:.2f} GB/s)")

    run(body)


# ------------------------------------------------------------------ stack
@app.command()
def provision() -> None:
    """Create or update every stream and KV bucket (idempotent; as `admin`)."""
    from shared.provision import provision as do_provision

    async def body() -> list[str]:
        bus = await connect(Role.ADMIN)
        try:
            return await do_provision(bus.js, CommonSettings())
        finally:
            await bus.close()

    console.print("\n".join(run(body)) or "everything up to date")


@app.command()
def up(
    min_trust: Annotated[TrustState, typer.Option(help="Lowest node trust the scheduler places on")] =
    TrustState.TRUSTED,
    join_listen: Annotated[str | None, typer.Option(help="Serve node joins (`qvm node invite` / `join`) on "
                                                         "HOST:PORT")] = None,
    nats_host: Annotated[str, typer.Option(help="The address NATS listens on (the control plane's WireGuard "
                                                "address when nodes join remotely)")] = "127.0.0.1",
    server_name: Annotated[list[str] | None, typer.Option(help="A name or address nodes dial (repeatable): "
                                                               "added to the server certificate")] = None,
    local_node: Annotated[bool, typer.Option(help="Run a node-agent on this machine too")] = True,
    wireguard: Annotated[str | None, typer.Option(help="Run the WireGuard hub: HOST:PORT nodes dial (this "
                                                       "machine's public address); NATS then listens on the "
                                                       "tunnel only")] = None,
    wireguard_net: Annotated[str, typer.Option(help="The tunnel's network")] = "10.99.0.0/24",
    nats_servers: Annotated[int, typer.Option(help="NATS servers: 3 runs a local cluster (every stream and "
                                                   "bucket with 3 replicas) to try one on a machine",
                                              min=1, max=5)] = 1,
) -> None:
    """Run the embedded stack (NATS + services) in the foreground until Ctrl-C."""
    from shared.cli.stack import SERVICE_MODULES, LocalStack

    s = StackSettings()
    services = tuple(n for n in SERVICE_MODULES if local_node or n != "node-agent")
    stack = LocalStack(s, s.node_id or local_node_id(), min_trust, services=services, join_listen=join_listen,
                       nats_host=nats_host, server_names=tuple(server_name or ()), wireguard_endpoint=wireguard,
                       wireguard_net=wireguard_net, nats_servers=nats_servers)

    async def body() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            url = await stack.start()
            console.print(f"[green]qvm up[/green]: NATS {url}; services {', '.join(stack.services)}; "
                          f"TPM {stack.tcti or 'none'}; logs in {s.state_dir / 'logs'}")
            if stack.join:
                console.print(f"nodes join at {stack.join.url} (`qvm node invite NODE` makes a token)")
            if min_trust is not TrustState.TRUSTED:
                console.print(f"[yellow]placement minimum trust lowered to {min_trust.value}[/yellow]")
            while not stop.is_set():
                for r in stack.supervise_once():
                    err.print(f"[yellow]restarted {r}[/yellow]")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            await asyncio.to_thread(stack.stop)
            if stack.admin:
                await stack.admin.close()
            console.print("qvm stack stopped")

    run(body)


# ------------------------------------------------------------------ jobs
@app.command()
def submit(job_file: Path, wait: Annotated[float, typer.Option(help="Seconds to follow the job (0: don't)")] = 0
           ) -> None:
    """Validate a job file and publish it as the marketplace.

    The workload's output is sealed to the job's `output_key`. With --wait and no `output_key` in the job
    file, an X25519 key pair is made for this run (in memory only) and the output is printed, opened with
    it; without either, the job publishes no output."""
    from shared.client.output import new_output_key, with_output_key
    from shared.jobspec import load_job

    async def body() -> None:
        job_id, job = load_job(job_file)
        output_key: x25519.X25519PrivateKey | None = None
        if wait and job.output_key is None:
            output_key = new_output_key()
            job = with_output_key(job, output_key)
        bus = await connect(Role.MARKETPLACE)
        try:
            await bus.publish(job, job_id=job_id)
        finally:
            await bus.close()
        console.print(f"submitted [bold]{job_id}[/bold]")
        if job.output_key is None:
            console.print("no output_key in the job: its output will not be published (give one, or use --wait)")
        if wait:
            await _follow_job(job_id, wait, output_key)

    run(body)


@app.command()
def cancel(job_id: str, reason: str = "client_request") -> None:
    """Ask to cancel a job (as the marketplace)."""
    from shared.events import JobCancelRequested

    async def body() -> None:
        bus = await connect(Role.MARKETPLACE)
        try:
            await bus.publish(JobCancelRequested(reason=reason), job_id=job_id)
        finally:
            await bus.close()

    run(body)
    console.print(f"cancel requested for {job_id}")


async def _follow_job(job_id: str, seconds: float, output_key: x25519.X25519PrivateKey | None = None) -> None:
    """Print the job's events until it ends, then its output: opened with `output_key` (the private half of
    the job's output key), or, without one, only said to be sealed."""
    bus = await connect(Role.ADMIN)
    try:
        deadline = time.monotonic() + seconds
        shown = 0
        while time.monotonic() < deadline:
            book, timeline = await fold_jobs(bus.js, bus.codec, scope_filter(Domain.JOBS, job_id))
            for ev in timeline[shown:]:
                console.print(f"  {ev.spec.type:<22} {summarize(ev.payload)}")
            shown = len(timeline)
            view = book.get(job_id)
            if view and view.terminal:
                if not show_output(timeline, job_id, output_key, console):
                    raise QvmError(f"job {job_id}: its output did not open or verify with this run's key")
                return
            await asyncio.sleep(0.3)
    finally:
        await bus.close()


@app.command()
def demo(state_dir: Annotated[Path, typer.Option(help="Where the demo stack keeps its state")] = Path(".qvm/demo"),
         job_file: Path = Path("deploy/examples/confidential-job.yaml"),
         kernel: Annotated[str, typer.Option(help="Guest kernel: minimal (qvm's, built once) or cloud (the "
                                                  "distribution's)")] = "minimal") -> None:
    """Bring the embedded stack up, register this host, place and accept a job, audit, stop."""
    from shared.cli.demo import run_demo

    raise typer.Exit(run(lambda: run_demo(state_dir, job_file, console, kernel)))


if __name__ == "__main__":
    app()
