"""What every `qvm` command shares: the consoles, one error policy, the bus connection, the local node id."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import typer
from rich.console import Console

from shared.bus import Bus
from shared.config import CommonSettings
from shared.errors import QvmError
from shared.identity import Identity, Role
from shared.pki import Pki

__all__ = ["connect", "console", "err", "local_node_id", "run"]

console = Console()
err = Console(stderr=True)
T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a command body; qvm errors become one clear line and exit code 2, never a traceback."""
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except QvmError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def local_node_id() -> str:
    return re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:63] or "node"


async def connect(role: Role, settings: CommonSettings | None = None) -> Bus:
    s = settings or CommonSettings()
    return await Bus.connect(s.resolve_nats_url(), Pki(s.pki_path), Identity(role))
