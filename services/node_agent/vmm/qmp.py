"""A small QMP (QEMU Machine Protocol) client over the VMM's unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

from services.node_agent.vmm.base import VmmError

__all__ = ["Qmp"]


class Qmp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def over(cls, sock: socket.socket) -> Qmp:
        """QMP over our end of a socketpair whose other end QEMU got as `-chardev socket,fd=N`
        (no socket path: nothing else on the host can connect, and no path-length limit)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        qmp = cls(reader, writer)
        greeting = await qmp._read()
        if "QMP" not in greeting:
            raise VmmError("qmp_protocol", "no QMP greeting")
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _read(self) -> dict[str, Any]:
        while True:
            line = await asyncio.wait_for(self._reader.readline(), 10.0)
            if not line:
                raise VmmError("qmp_closed", "QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:  # asynchronous events are not needed here
                return msg

    async def execute(self, command: str, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._writer.write(json.dumps(req).encode() + b"\n")
        await self._writer.drain()
        reply = await self._read()
        if "error" in reply:
            raise VmmError("qmp_error", f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
