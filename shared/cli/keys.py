"""`qvm keys ...`: the key-broker's KEK ring: create it, rotate it, show what it holds (never the keys).

The source is QVM_KEK_SOURCE, or `--source` (see `shared.crypto.kek`): `file:PATH` (a passphrase file),
`tpm:PATH?pcrs=0,7` (sealed to QVM_TPM), `kms:module:factory` (shown only: a KMS manages its own keys),
or nothing for the development default under the state directory. A file source's passphrase comes from
QVM_KEK_PASSPHRASE_FILE, QVM_KEK_PASSPHRASE, or a prompt when stdin is a terminal (`init` asks twice).

The key-broker loads its ring when it starts, so after `rotate` restart the brokers to wrap new keys
under the new version; every older version stays in the ring, so keys wrapped under them still open.

Exit codes: 0 done, 2 an error (one line, never a traceback). Nothing here prints key material.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.config import KekSettings
from shared.crypto.kek import KekSource, ManagedKekSource, source_for
from shared.crypto.secret import zeroize
from shared.errors import QvmError

__all__ = ["keys_app"]

keys_app = typer.Typer(help="The key-broker's KEKs: create, rotate, show (never the key material).",
                       no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)
T = TypeVar("T")

SourceOption = Annotated[str | None, typer.Option(
    "--source", help="KEK source spec (file:PATH, tpm:PATH?pcrs=0,7, kms:module:factory); default QVM_KEK_SOURCE")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(2)


def _needs_prompt(s: KekSettings) -> bool:
    """A file: source with no passphrase configured, run by a person at a terminal."""
    return (s.kek_source.startswith("file:") and s.kek_passphrase_file is None
            and "QVM_KEK_PASSPHRASE" not in os.environ and sys.stdin.isatty())


@contextmanager
def _source(spec: str | None, confirm: bool) -> Iterator[KekSource]:
    """The configured (or given) source; its passphrase copy is wiped when the command ends."""
    s = KekSettings()
    if spec is not None:
        s = s.model_copy(update={"kek_source": spec})
    passphrase: bytearray | None = None
    if _needs_prompt(s):
        # typer returns a str, which cannot be wiped: prefer QVM_KEK_PASSPHRASE_FILE for automation.
        passphrase = bytearray(typer.prompt("KEK passphrase", hide_input=True, confirmation_prompt=confirm,
                                            err=True).encode())
    try:
        source = source_for(s, passphrase=passphrase)
    finally:
        if passphrase is not None:
            zeroize(passphrase)
    try:
        yield source
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()


def _run(body: Callable[[], T]) -> T:
    try:
        return body()
    except QvmError as exc:
        raise _fail(str(exc)) from None


def _managed(source: KekSource, action: str) -> ManagedKekSource:
    if not isinstance(source, ManagedKekSource):
        raise _fail(f"{source.describe()}: qvm cannot {action} this source's keys (manage them in the KMS)")
    return source


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns / 1e9)) if ns else "unknown"


@keys_app.command("init")
def keys_init(source: SourceOption = None) -> None:
    """Create the KEK ring with version 1 (refuses to overwrite an existing one)."""

    def body() -> None:
        with _source(source, confirm=True) as src:
            version = _managed(src, "create").init()
            console.print(f"created KEK version {version}: {escape(src.describe())}")

    _run(body)


@keys_app.command("rotate")
def keys_rotate(source: SourceOption = None) -> None:
    """Add a new KEK version (the current one from now on); older versions stay to unwrap old keys."""

    def body() -> None:
        with _source(source, confirm=False) as src:
            version = _managed(src, "rotate").rotate()
            console.print(f"added KEK version {version} (now current): {escape(src.describe())}")
            console.print("restart the key-brokers to wrap new keys under it; keys wrapped under older "
                          "versions still open")

    _run(body)


@keys_app.command("show")
def keys_show(source: SourceOption = None) -> None:
    """Load the ring (proving it opens) and list its versions and when each was made."""

    def body() -> None:
        with _source(source, confirm=False) as src:
            ring = src.load()
            try:
                table = Table(title=f"KEK ring: {escape(src.describe())}")
                for col in ("version", "created", "state"):
                    table.add_column(col)
                created = ring.created_ns
                for v in ring.versions:
                    table.add_row(str(v), _when(created.get(v, 0)), "current" if v == ring.current else "")
            finally:
                ring.close()
            console.print(table)

    _run(body)
