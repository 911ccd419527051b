"""`qvm status`, `qvm nodes`, `qvm events`, `qvm audit replay`: the operator's read side of the bus.

Everything here reads (message gets on the streams, the registry bucket) as the operator identity; nothing
publishes.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shared.buckets import NODES
from shared.cli.common import connect, console, err, run
from shared.cli.render import summarize
from shared.config import CommonSettings
from shared.errors import RejectedEvent
from shared.events import STREAMS, Domain, scope_filter
from shared.identity import Role
from shared.pki import Pki
from shared.reader import RawMessage
from shared.registry import NodeRecord
from shared.replay import fold_jobs

__all__ = ["audit_app", "events", "nodes", "status"]

audit_app = typer.Typer(help="Audit the event streams.", no_args_is_help=True)


def status(job_id: Annotated[str | None, typer.Argument()] = None) -> None:
    """Jobs and their states, folded from the job stream."""

    async def body() -> None:
        bus = await connect(Role.ADMIN)
        try:
            book, timeline = await fold_jobs(bus.js, bus.codec, scope_filter(Domain.JOBS, job_id) if job_id else ">")
        finally:
            await bus.close()
        if job_id:
            view = book.get(job_id)
            if view is None:
                err.print(f"no job {job_id}")
                raise typer.Exit(1)
            table = Table(title=f"job {job_id}: {view.state}")
            for col in ("time", "event", "producer", "details"):
                table.add_column(col)
            for ev in timeline:
                table.add_row(time.strftime("%H:%M:%S", time.localtime(ev.envelope.time_ns / 1e9)),
                              str(ev.spec.type), ev.envelope.producer, summarize(ev.payload))
            console.print(table)
            return
        table = Table(title="jobs")
        for col in ("job", "state", "node", "attempt", "reason"):
            table.add_column(col)
        for v in book.jobs.values():
            table.add_row(v.job_id, str(v.state), v.node_id or "", str(v.attempt), v.reason)
        console.print(table)

    run(body)


def nodes() -> None:
    """Registered nodes, their inventory, trust, liveness and claims; GPUs held back until a verified scrub."""
    async def body() -> None:
        bus = await connect(Role.ADMIN)
        try:
            kv = await bus.kv(NODES)
            table = Table(title="nodes")
            for col in ("node", "status", "trust", "cpu", "ram MiB", "gpus", "awaiting scrub", "claims", "vmms"):
                table.add_column(col)
            for k in sorted(await kv.keys()):
                rec, _, _ = await kv.get(k, NodeRecord)
                if rec is None:
                    continue
                inv = rec.inventory
                table.add_row(rec.node_id, str(rec.status), str(rec.trust), f"{rec.free_cpu()}/{inv.cpu_cores}",
                              f"{rec.free_ram()}/{inv.ram_mib}", f"{len(rec.free_gpus())}/{len(inv.gpus)}",
                              ", ".join(f"{u} ({j})" for u, j in sorted(rec.scrubbing.items())) or "-",
                              str(len(rec.claims)), ",".join(inv.vmms))
            console.print(table)
        finally:
            await bus.close()

    run(body)


def events(follow: Annotated[bool, typer.Option("--follow", "-f")] = False) -> None:
    """Print every event, decoded and signature-checked (with --follow, live)."""

    async def body() -> None:
        bus = await connect(Role.ADMIN)
        stop = asyncio.Event()

        def show(msg: RawMessage) -> None:
            try:
                ev = bus.codec.decode(msg.subject, msg.data)
                console.print(f"[green]✓[/green] {ev.spec.type:<20} job={ev.job_id or '-'} node={ev.node_id or '-'} "
                              f"by {ev.envelope.producer}: {summarize(ev.payload)}")
            except RejectedEvent as exc:
                console.print(f"[red]✗[/red] {msg.subject[:80]}: {exc.reason.value}: {exc.detail[:120]}")

        async def one(domain: Domain) -> None:
            if follow:
                async for batch in bus.follow(domain, ">", stop):
                    for msg in batch.messages:
                        show(msg)
            else:
                async for msgs in bus.read(domain):
                    for msg in msgs:
                        show(msg)

        try:
            if follow:
                asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
            await asyncio.gather(*(one(d) for d in STREAMS))
        finally:
            await bus.close()

    run(body)


@audit_app.command("replay")
def audit_replay(workers: Annotated[int | None, typer.Option(help="Verifier processes (default: cores)")] = None
                 ) -> None:
    """Replay every stream from the first message; verify signatures and transitions."""
    from shared.audit import AuditWorkers
    from shared.audit import audit_replay as replay

    async def body() -> bool:
        s = CommonSettings()
        pki = Pki(s.pki_path)
        bus = await connect(Role.ADMIN, s)
        verifier = AuditWorkers(pki.trust_bundle.read_bytes(), pki.ca_cert.read_bytes(), workers)
        try:
            report = await replay(bus.js, verifier)
        finally:
            verifier.close()
            await bus.close()
        table = Table(title=f"audit replay: {report.events} events in {report.seconds:.2f}s "
                            f"({report.rate:,.0f}/s)")
        table.add_column("stream")
        table.add_column("events", justify="right")
        for k, v in sorted(report.per_stream.items()):
            table.add_row(k, str(v))
        console.print(table)
        console.print("job states: " + ", ".join(f"{k}={v}" for k, v in sorted(report.job_states.items())))
        # Subjects, details and headers in these lines come from the bus: printed as text, never as markup.
        for d in report.dead_letters[:20]:
            console.print(f"[yellow]dead letter[/yellow] {escape(d)}")
        if len(report.dead_letters) > 20:
            console.print(f"[yellow]… {len(report.dead_letters) - 20} more dead letters[/yellow]")
        for violation in report.violations[:50]:
            console.print(f"[red]violation[/red] {escape(violation)}")
        if len(report.violations) > 50:
            console.print(f"[red]… {len(report.violations) - 50} more violations[/red]")
        console.print("[green]audit clean[/green]" if report.ok else
                      f"[red]audit failed: {len(report.violations)} violation(s)[/red]")
        return report.ok

    if not run(body):
        raise typer.Exit(1)


