"""`qvm node ...`: commands a hoster runs on a GPU host, and the operator's side of joining.

Hoster: `install` / `uninstall` (`node_install`), `join`, `doctor`, `drain` / `undrain` / `status`
(`node_ops`). Operator: `invite` (a join token), `revoke` (withdraw a node). The protocol is `shared.join`.

`qvm node doctor` runs the node-agent's host checks (`python -m services.node_agent.doctor`) in a
subprocess with this interpreter: the checks are the node-agent's knowledge, and the CLI in `shared/` never
imports a service. Its output and exit code are the doctor's: 0 when every hard requirement is met, 1 when
one fails; 2 when the doctor could not run (the node-agent is not installed: `pip install 'qvm[node-agent]'`).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from shared.buckets import JOIN_INVITES
from shared.cli.common import connect, console, err, run
from shared.cli.node_install import install, uninstall
from shared.cli.node_ops import drain, status, undrain
from shared.config import CommonSettings
from shared.errors import QvmError
from shared.events import NodeCleared
from shared.identity import Role
from shared.join.client import join as join_node
from shared.join.client import revoke as revoke_node
from shared.join.invites import JoinRefused, create_invite
from shared.pki import Pki

node_app = typer.Typer(help="This host as a qvm node: install, join, checks, drain, status; invite and revoke "
                       "nodes (operator).", no_args_is_help=True)
node_app.command("install")(install)
node_app.command("uninstall")(uninstall)
node_app.command("drain")(drain)
node_app.command("undrain")(undrain)
node_app.command("status")(status)

DOCTOR_MODULE = "services.node_agent.doctor"


@node_app.command("doctor")
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="A JSON list of {name, status, hard, found, hint}")]
    = False,
    root: Annotated[Path, typer.Option(help="Read the host's files under this root (fixture trees)")] = Path("/"),
    state_dir: Annotated[Path | None, typer.Option(help="The state directory (default QVM_STATE_DIR)")] = None,
) -> None:
    """Check this host for everything qvm jobs need: OS, root, KVM, IOMMU and GPU isolation, NVIDIA driver,
    TPM, cgroups, nftables, SEV-SNP/TDX, disk, clock. Exit 1 when a hard requirement fails."""
    argv = [sys.executable, "-m", DOCTOR_MODULE, "--root", str(root)]
    argv += ["--state-dir", str(state_dir)] if state_dir is not None else []
    argv += ["--json"] if json_out else []
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    typer.echo(done.stdout, nl=False)
    if done.returncode not in (0, 1):
        typer.echo(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "the node doctor failed",
                   err=True)
        typer.echo("qvm node doctor needs the node-agent installed: pip install 'qvm[node-agent]'", err=True)
        raise typer.Exit(2)
    raise typer.Exit(done.returncode)


# ------------------------------------------------------------------ joining (hoster) and inviting (operator)
@node_app.command("invite")
def invite(node_id: str,
           ttl: Annotated[float, typer.Option(help="Seconds the token may be used in", min=10, max=7 * 86400)] = 900,
           ) -> None:
    """(Operator) A single-use join token for NODE_ID, valid for --ttl seconds. Hand it to the hoster out of
    band; the control plane keeps only its SHA-256."""
    settings = CommonSettings()
    pki = Pki(settings.pki_path)

    async def body() -> str:
        bus = await connect(Role.ADMIN, settings)
        try:
            token, invite = await create_invite(await bus.kv(JOIN_INVITES), node_id, pki.ca_der, ttl)
        finally:
            await bus.close()
        until = dt.datetime.fromtimestamp(invite.expires_ns / 1e9, dt.UTC)
        err.print(f"join token for [bold]{escape(node_id)}[/bold], single use, valid until {until:%Y-%m-%d %H:%M:%S} "
                  "UTC; on the host run:\n  qvm node join TOKEN --control-plane URL   (or deploy/install.sh --token)")
        return str(token)

    try:
        typer.echo(run(body))  # stdout: the token alone, for scripts
    except ValueError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


@node_app.command("join")
def join(
    token: Annotated[str, typer.Argument(envvar="QVM_JOIN_TOKEN", help="The operator's join token")],
    control_plane: Annotated[str, typer.Option(help="The control plane's join URL (https://host:port)")],
    etc: Annotated[Path, typer.Option(help="Where the node's keys, certificates and node.env go")] = Path("/etc/qvm"),
    tpm: Annotated[str, typer.Option(help="The node's TPM (tss2 TCTI)")] = "device:/dev/tpmrm0",
) -> None:
    """Join this host to the platform: keys made here (only CSRs leave), the TPM proves the machine, the
    token the invitation. Writes <etc>/pki and <etc>/node.env; the node-agent uses them at its next start."""
    try:
        result, grant = join_node(token, control_plane, etc, tpm)
    except JoinRefused as exc:
        err.print(f"[red]join refused ({escape(exc.reason)}):[/red] {escape(exc.detail)}")
        raise typer.Exit(1) from None
    console.print(f"joined as [bold]{escape(result.node_id)}[/bold]: NATS {escape(result.nats_url)}; "
                  f"keys and certificates in {escape(str(result.pki_dir))}; settings in {escape(str(result.env_file))}"
                  + ("; WireGuard peer granted" if grant.wireguard else ""))


@node_app.command("revoke")
def revoke(
    node_id: str,
    control_plane: Annotated[str | None, typer.Option(help="The control plane's join URL (default: the one "
                                                           "`qvm up --join-listen` wrote under the state dir)")]
    = None,
    detail: Annotated[str, typer.Option(help="Why (kept in the node.revoked event)")] = "",
) -> None:
    """(Operator) Withdraw NODE_ID at once: its certificate stops opening the bus, its jobs are failed and torn
    down, their keys destroyed."""
    settings = CommonSettings()
    url = control_plane or _join_url(settings)
    try:
        done = revoke_node(url, Pki(settings.pki_path), node_id, "operator_revoked", detail)
    except JoinRefused as exc:
        err.print(f"[red]revoke refused ({escape(exc.reason)}):[/red] {escape(exc.detail)}")
        raise typer.Exit(1) from None
    console.print(f"node {escape(node_id)} was withdrawn already" if done.already else
                  f"node {escape(node_id)} withdrawn" if done.was_member else
                  f"node {escape(node_id)} was not a member (nothing to withdraw)")


@node_app.command("clear")
def clear(
    node_id: str,
    reason: Annotated[str, typer.Option(help="What the operator found (kept in the node.cleared event)")],
) -> None:
    """(Operator) Let NODE_ID attest again after its runtime guard caught a host process reaching into an
    instance (the verifier refuses its enrollment until then). Look first: the event says which rule, which
    process, which instance."""

    async def body() -> None:
        bus = await connect(Role.ADMIN, CommonSettings())
        try:
            await bus.publish(NodeCleared(reason=reason[:256]), node_id=node_id)
        finally:
            await bus.close()

    try:
        run(body)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    console.print(f"node {escape(node_id)} cleared: it enrolls again at its next attestation")


def _join_url(settings: CommonSettings) -> str:
    path = settings.state_dir / "join.url"
    if not path.exists():
        err.print("[red]error:[/red] no --control-plane and no join URL under the state dir (`qvm up --join-listen`)")
        raise typer.Exit(2)
    return path.read_text().strip()


# ------------------------------------------------------------------ the node's WireGuard tunnel
tunnel_app = typer.Typer(help="This node's WireGuard tunnel to the control plane (set up by the join).",
                         no_args_is_help=True)
node_app.add_typer(tunnel_app, name="tunnel")
EtcOption = Annotated[Path, typer.Option(help="The node's configuration directory (the join's --etc)")]


@tunnel_app.command("up")
def tunnel_up(etc: EtcOption = Path("/etc/qvm")) -> None:
    """Bring the tunnel up (the node-agent's unit does, before the agent starts); nothing to do when the node
    joined without one."""
    from shared.join.tunnel import node_tunnel

    try:
        tunnel = node_tunnel(etc)
        if tunnel is None:
            console.print("no tunnel configured (the control plane granted none): NATS is reached directly")
            return
        tunnel.up()
    except QvmError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(f"tunnel {tunnel.interface.name} up ({tunnel.interface.implementation}): "
                  f"{tunnel.interface.address} -> {tunnel.control_plane.endpoint}")


@tunnel_app.command("down")
def tunnel_down(etc: EtcOption = Path("/etc/qvm")) -> None:
    """Take the tunnel down."""
    from shared.join.tunnel import node_tunnel

    try:
        tunnel = node_tunnel(etc)
        if tunnel is not None:
            tunnel.down()
    except QvmError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
