"""The host side of the guest channel (virtio-serial port `qvm.0`; vsock on Firecracker/Cloud Hypervisor).

A line protocol with qvm's guest init (see shared/image/guest_init.sh):
    guest -> host  READY | OUT <base64 line> | EXIT <code> | ERROR <text>
    host -> guest  RUN <base64 of a /bin/sh -c script>
The guest is untrusted: frames are parsed strictly, lines are bounded, output is capped in memory and
hashed in full. Later phases add frames for wrapped keys over the same channel.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shared.errors import ReasonedError

__all__ = ["ChannelError", "GuestChannel", "RunOutput"]

MAX_LINE = 256 * 1024
MAX_KEPT_OUTPUT = 1 << 20


class ChannelError(ReasonedError):
    """A failure with a stable reason code (see `ReasonedError`)."""


@dataclass(frozen=True)
class RunOutput:
    exit_code: int
    output: bytes  # the first MAX_KEPT_OUTPUT bytes
    total_bytes: int
    sha256: str

    @property
    def truncated(self) -> bool:
        return self.total_bytes > len(self.output)


class GuestChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> GuestChannel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_LINE)
        return cls(reader, writer)

    async def _frame(self) -> tuple[str, str]:
        try:
            line = await self._reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise ChannelError("bad_frame", f"guest line longer than {MAX_LINE} bytes") from None
        if not line:
            raise ChannelError("channel_closed", "the guest closed the channel")
        text = line.decode("ascii", errors="replace").rstrip("\n")
        kind, _, rest = text.partition(" ")
        return kind, rest

    async def wait_ready(self, shared: bool = False) -> None:
        """Wait for the guest init. On a `shared` channel (a serial port that is also the kernel console
        until init silences it) lines before READY are boot messages and are skipped; after READY the
        protocol is strict either way."""
        for _ in range(100_000):
            kind, rest = await self._frame()
            if kind == "READY":
                return
            if kind == "ERROR":
                raise ChannelError("guest_error", rest[:500])
            if not shared:
                raise ChannelError("bad_frame", f"expected READY, got {kind[:40]!r}")
        raise ChannelError("bad_frame", "no READY among the boot messages")

    async def run(self, script: str, on_output: Callable[[bytes], Awaitable[None]] | None = None) -> RunOutput:
        """Run `script` in the guest; `on_output` sees each chunk as it arrives (live streaming)."""
        self._writer.write(b"RUN " + base64.b64encode(script.encode()) + b"\n")
        await self._writer.drain()
        digest = hashlib.sha256()
        kept = bytearray()
        total = 0
        while True:
            kind, rest = await self._frame()
            if kind == "OUT":
                try:
                    chunk = base64.b64decode(rest, validate=True)
                except (binascii.Error, ValueError):
                    raise ChannelError("bad_frame", "OUT frame is not base64") from None
                digest.update(chunk)
                total += len(chunk)
                if on_output is not None:
                    await on_output(chunk)
                if len(kept) < MAX_KEPT_OUTPUT:
                    kept += chunk[: MAX_KEPT_OUTPUT - len(kept)]
            elif kind == "EXIT":
                if not rest.isdigit() or int(rest) > 255:
                    raise ChannelError("bad_frame", f"bad exit code {rest[:20]!r}")
                return RunOutput(int(rest), bytes(kept), total, digest.hexdigest())
            elif kind == "ERROR":
                raise ChannelError("guest_error", rest[:500])
            else:
                raise ChannelError("bad_frame", f"unexpected frame {kind[:40]!r}")

    def close(self) -> None:
        self._writer.close()
