"""`qvm node drain | undrain | status`: a hoster's day-to-day commands on their GPU host.

They run on the host beside the node-agent (a systemd service, as root) and talk to it through two files in
its state directory (`shared.nodestatus`), never through the bus: the hoster holds no bus identity, and a
drain must outlive an agent restart.

    drain     writes `<state_dir>/draining`; the agent refuses new jobs from its next assignment and says so in
              its heartbeats, so the scheduler places nothing there; running jobs finish. `--wait` waits
              until the agent's status lists no job.
    undrain   removes the request; the agent takes jobs again from its next heartbeat.
    status    the agent's `<state_dir>/node-status.json`: connection, registration, heartbeats, drain, trust,
              GPUs and jobs; stale when the agent has not rewritten it for 3 heartbeat intervals (it is down).

The state directory is `--state-dir`, else `QVM_STATE_DIR` (the node-agent's own setting).
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shared.cli.common import console, err
from shared.config import CommonSettings
from shared.join.client import read_env
from shared.models import TrustState
from shared.nodestatus import (
    STALE_AFTER_BEATS,
    NodeStatusReport,
    StatusUnreadable,
    drain_path,
    read_status,
    status_path,
)

__all__ = ["drain", "status", "undrain"]

POLL_S = 0.5
StateDirOption = Annotated[Path | None, typer.Option(help="The node-agent's state directory (default "
                                                          "QVM_STATE_DIR, else the installed agent's)")]
INSTALLED_ENV = Path("/etc/qvm/node.env")
"""Where `qvm node install` writes the installed agent's settings (its default `--etc`)."""


def _state_dir(state_dir: Path | None) -> Path:
    installed = read_env(INSTALLED_ENV).get("QVM_STATE_DIR") if "QVM_STATE_DIR" not in os.environ else None
    root = state_dir if state_dir is not None else Path(installed) if installed else CommonSettings().state_dir
    if not root.is_dir():
        err.print(f"[red]error:[/red] no node-agent state directory at {escape(str(root))} "
                  "(set QVM_STATE_DIR or --state-dir to the node-agent's)")
        raise typer.Exit(1)
    return root


def _read(root: Path) -> NodeStatusReport | None:
    try:
        return read_status(root)
    except (StatusUnreadable, OSError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None


def _stale_note(report: NodeStatusReport, now_ns: int) -> str:
    if report.stopped_ns:
        return f"the node-agent stopped at {_when(report.stopped_ns, now_ns)}"
    return (f"the status is {report.age_s(now_ns):.0f}s old (more than {STALE_AFTER_BEATS} heartbeats of "
            f"{report.heartbeat_interval_s:g}s): the node-agent is down or hung")


def drain(
    wait: Annotated[bool, typer.Option("--wait", help="Wait until no job is left on the node")] = False,
    timeout: Annotated[float, typer.Option(min=0, help="With --wait: give up after this many seconds, exit 1 "
                                                       "(0: wait as long as it takes)")] = 0.0,
    state_dir: StateDirOption = None,
) -> None:
    """Take this node out of the pool: the node-agent refuses new jobs and lets the running ones finish.
    The request survives agent restarts until `qvm node undrain`."""
    root = _state_dir(state_dir)
    path = drain_path(root)
    if path.exists():
        console.print("this node is already draining")
    else:
        request = {"requested_ns": time.time_ns(), "user": getpass.getuser(), "pid": os.getpid()}
        try:
            path.write_text(json.dumps(request) + "\n")
        except OSError as exc:
            err.print(f"[red]error:[/red] cannot write {escape(str(path))}: {escape(exc.strerror or str(exc))} "
                      "(run it as the node-agent's user, root)")
            raise typer.Exit(1) from None
        console.print("drain requested: the node-agent takes no new jobs from now; running jobs finish")
    report = _read(root)
    now = time.time_ns()
    if report is None or report.stale(now):
        why = "it has never written a status here" if report is None else _stale_note(report, now)
        console.print(f"[yellow]note:[/yellow] the node-agent is not running ({escape(why)}); it starts drained")
        if wait and report is None:
            err.print("[red]error:[/red] nothing to wait for: no node-agent status at "
                      f"{escape(str(status_path(root)))}")
            raise typer.Exit(1)
    if wait:
        _wait_idle(root, timeout)


def _wait_idle(root: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout if timeout else None
    shown: tuple[str, ...] | None = None
    while True:
        if not drain_path(root).exists():
            err.print("[red]error:[/red] the drain was ended (qvm node undrain) while waiting")
            raise typer.Exit(1)
        report = _read(root)
        if report is not None and report.draining and not report.stale():
            jobs = tuple(j.job_id for j in report.jobs)
            if not jobs:
                console.print(f"node {escape(report.node_id)} is drained: no job on it")
                return
            if jobs != shown:
                console.print(f"waiting for {len(jobs)} job(s): {escape(', '.join(jobs))}")
                shown = jobs
        if deadline is not None and time.monotonic() >= deadline:
            left = f"{len(shown)} job(s) still on the node" if shown else "the node-agent has not confirmed the drain"
            err.print(f"[red]error:[/red] not drained after {timeout:g}s: {left}")
            raise typer.Exit(1)
        time.sleep(POLL_S)


def undrain(state_dir: StateDirOption = None) -> None:
    """End a drain: the node-agent takes new jobs again from its next heartbeat."""
    path = drain_path(_state_dir(state_dir))
    try:
        path.unlink()
    except FileNotFoundError:
        console.print("this node is not draining")
        return
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot remove {escape(str(path))}: {escape(exc.strerror or str(exc))} "
                  "(run it as the node-agent's user, root)")
        raise typer.Exit(1) from None
    console.print("drain ended: the node-agent takes new jobs again from its next heartbeat")


def status(
    json_out: Annotated[bool, typer.Option("--json", help="The status report as JSON, with `stale` and "
                                                          "`age_s`")] = False,
    state_dir: StateDirOption = None,
) -> None:
    """This node as its node-agent last reported it: connection, heartbeats, drain, trust, GPUs, jobs.
    Exit 1 when there is no current status (no agent here, or it is down)."""
    root = _state_dir(state_dir)
    report = _read(root)
    if report is None:
        err.print(f"[red]error:[/red] no node status at {escape(str(status_path(root)))}: the node-agent is not "
                  "running here (or not installed: pip install 'qvm[node-agent]'), or uses another state directory")
        raise typer.Exit(1)
    now = time.time_ns()
    stale = report.stale(now)
    if json_out:
        typer.echo(json.dumps({**report.model_dump(mode="json"), "stale": stale,
                               "age_s": round(report.age_s(now), 3)}, indent=2))
    else:
        _show(report, now)
        if stale:
            err.print(f"[yellow]stale:[/yellow] {escape(_stale_note(report, now))}")
    if stale:
        raise typer.Exit(1)


def _when(ns: int, now_ns: int) -> str:
    if not ns:
        return "-"
    ago = (now_ns - ns) / 1e9
    rel = f"in {-ago:.0f}s" if ago < 0 else f"{ago:.0f}s ago"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ns / 1e9))} ({rel})"


def _show(r: NodeStatusReport, now: int) -> None:
    head = Table(title=f"node {escape(r.node_id)}", show_header=False)
    head.add_column("", style="bold")
    head.add_column("")
    head.add_row("agent", f"{escape(r.agent_version)} (pid {r.pid})" if r.pid else escape(r.agent_version))
    head.add_row("NATS", f"{escape(r.nats_url) or '-'} "
                         f"({'[green]connected[/green]' if r.connected else '[red]disconnected[/red]'})")
    head.add_row("registered", _when(r.registered_ns, now))
    head.add_row("last heartbeat", f"{_when(r.last_heartbeat_ns, now)}, every {r.heartbeat_interval_s:g}s")
    head.add_row("draining", f"[yellow]yes[/yellow], since {_when(r.draining_since_ns, now)}" if r.draining
                 else "no")
    trust = r.trust.at(now)
    colour = {TrustState.TRUSTED: "green", TrustState.UNVERIFIED: "yellow", TrustState.UNTRUSTED: "red"}[trust]
    expired = " (expired)" if trust is not r.trust.state else ""
    head.add_row("trust", f"[{colour}]{trust}[/{colour}]{expired}"
                          + (f": {escape(r.trust.detail)}" if r.trust.detail else ""))
    if r.trust.verified_ns:
        head.add_row("verified", _when(r.trust.verified_ns, now))
    if r.trust.expires_ns:
        head.add_row("re-attest by", _when(r.trust.expires_ns, now))
    head.add_row("status written", _when(r.written_ns, now))
    console.print(head)

    gpus = Table(title=f"GPUs ({len(r.gpus)})")
    for col in ("#", "name", "memory MiB", "state", "job", "uuid"):
        gpus.add_column(col)
    for g in r.gpus:
        gpus.add_row(str(g.index), escape(g.name), str(g.memory_mib), str(g.state), escape(g.job_id or "-"),
                     escape(g.uuid))
    console.print(gpus)

    jobs = Table(title=f"jobs ({len(r.jobs)})")
    for col in ("job", "instance", "phase", "since"):
        jobs.add_column(col)
    for j in r.jobs:
        jobs.add_row(escape(j.job_id), escape(j.instance_id or "-"), escape(j.phase), _when(j.since_ns, now))
    console.print(jobs)
