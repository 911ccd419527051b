"""`qvm node ...`: commands a hoster runs on a GPU host.

`qvm node doctor` runs the node-agent's host checks (`python -m services.node_agent.doctor`) in a
subprocess with this interpreter: the checks are the node-agent's knowledge, and the CLI in `shared/` never
imports a service. Its output and exit code are the doctor's: 0 when every hard requirement is met, 1 when
one fails; 2 when the doctor could not run (the node-agent is not installed: `pip install 'qvm[node-agent]'`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

node_app = typer.Typer(help="This host as a qvm node: host checks.", no_args_is_help=True)

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
