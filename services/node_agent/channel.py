"""The host side of the guest channel (virtio-serial port `qvm.0`; vsock on Firecracker/Cloud Hypervisor).

A line protocol with qvm's guest init (see shared/image/guest_init.sh), one frame per line:
    guest -> host  READY [<stage>=<s> ...]   init is up, the disks are mounted; each stage the guest's uptime
                                             (seconds since its kernel's clock started) when it ended:
                                             init modules channel disks scratch mkfs overlay ready
                   VOLUME_OK <luks uuid>     the data volume is formatted, open and mounted at /data
                   SECRET_OK <name>          the secret file is in the guest's tmpfs
                   CVM_REPORT_OK <provider> <base64 report> <base64 aux or ->
                                             a confidential VM's report (configfs-tsm provider sev_guest /
                                             tdx_guest, the report or quote, the extended report's certificates)
                   OUT <base64 line>         workload output
                   EXIT <code>               the workload ended (0-255); the guest powers off
                   ERROR <text>              a refused frame (VOLUME, SECRET), or init failed (then it powers off)
    host -> guest  VOLUME <64 hex digits>    after READY, before RUN, at most once: the 32-byte data-encryption
                                             key as lowercase hex, used in the guest as the LUKS2 key file
                   SECRET <name> <base64>    after READY, before RUN: one file for /run/secrets/<name>
                                             (name [A-Za-z0-9._-]{1,64}, no leading dot; at most 64 KiB)
                   CVM_REPORT <128 hex>      after READY, before RUN: the 64 bytes of REPORT_DATA the CPU signs
                   RUN <base64 of a /bin/sh -c script>
Each VOLUME, SECRET and CVM_REPORT frame gets exactly one answer (its _OK, or ERROR) before the host sends
the next.

The guest is untrusted: frames are parsed strictly, lines are bounded, output is capped in memory and
hashed in full. Key and secret frames are built in a bytearray the channel zeroes after writing, with no
immutable copy of the key made on the way (hex and base64 are encoded digit by digit from a table), and
written to the socket directly, not through the stream's buffer (which would keep a copy). The key never
goes to a file, a command line or a log, on either side.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shared.crypto.secret import zeroize
from shared.errors import ReasonedError

__all__ = [
    "BOOT_STAGES",
    "KEY_BYTES",
    "MAX_HOST_LINE",
    "MAX_SECRET_BYTES",
    "ChannelError",
    "CvmReport",
    "GuestChannel",
    "RunOutput",
    "check_key",
    "check_secret",
    "parse_boot_stamps",
]

MAX_LINE = 256 * 1024  # the longest line the guest may send
MAX_KEPT_OUTPUT = 1 << 20
KEY_BYTES = 32  # the data-encryption key: 256 random bits
MAX_SECRET_BYTES = 64 * 1024
MAX_HOST_LINE = 128 * 1024  # the longest key or secret frame the host sends (a 64 KiB secret: ~87.4 KiB)
SECRET_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", re.ASCII)
MAX_CVM_BLOB = 16 * 1024  # an SNP report is 1184 bytes, a TDX quote with its PCK chain ~5 KiB
_PROVIDER = re.compile(r"[a-z0-9_]{1,32}", re.ASCII)
_LUKS_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)
BOOT_STAGES = ("init", "modules", "channel", "disks", "scratch", "mkfs", "overlay", "ready")
"""The guest init's boot stages in order, each stamped with the guest's uptime when it ended (READY frame)."""
_STAMP = re.compile(r"([a-z]{1,16})=([0-9]{1,5}(?:\.[0-9]{1,6})?)", re.ASCII)
_HEX = b"0123456789abcdef"
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


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


def check_key(key: bytearray) -> None:
    """A data-encryption key the channel will send (raises `volume_bad_key`)."""
    if not isinstance(key, bytearray | memoryview | bytes) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, bytearray | memoryview | bytes) else type(key).__name__
        raise ChannelError("volume_bad_key", f"the volume key must be {KEY_BYTES} bytes, got {size}")


def check_secret(name: str, data: bytes | bytearray) -> None:
    """A secret file the channel will send (raises `secret_bad_name`, `secret_bad_content` or `secret_too_large`)."""
    if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
        raise ChannelError("secret_bad_name", f"{str(name)[:70]!r} is not a secret name ([A-Za-z0-9._-]{{1,64}}, "
                                              "no leading dot)")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ChannelError("secret_bad_content", f"{name}: content is {type(data).__name__}, not bytes")
    if len(data) > MAX_SECRET_BYTES:
        raise ChannelError("secret_too_large", f"{name}: {len(data)} bytes (at most {MAX_SECRET_BYTES})")


def _hex_into(key: bytearray | memoryview | bytes, out: bytearray, at: int) -> int:
    for b in key:  # ints below 256 are interned: nothing key-dependent is allocated
        out[at] = _HEX[b >> 4]
        out[at + 1] = _HEX[b & 15]
        at += 2
    return at


def _b64_into(data: bytes | bytearray | memoryview, out: bytearray, at: int) -> int:
    """Standard base64 (with padding) written into `out` from `at`; every intermediate value is below 256."""
    n = len(data)
    i = 0
    while i + 3 <= n:
        d0, d1, d2 = data[i], data[i + 1], data[i + 2]
        out[at] = _B64[d0 >> 2]
        out[at + 1] = _B64[((d0 & 3) << 4) | (d1 >> 4)]
        out[at + 2] = _B64[((d1 & 15) << 2) | (d2 >> 6)]
        out[at + 3] = _B64[d2 & 63]
        i += 3
        at += 4
    if n - i:  # one or two bytes left: two or three digits, then padding
        d0 = data[i]
        d1 = data[i + 1] if n - i == 2 else 0
        out[at] = _B64[d0 >> 2]
        out[at + 1] = _B64[((d0 & 3) << 4) | (d1 >> 4)]
        out[at + 2] = _B64[(d1 & 15) << 2] if n - i == 2 else 61  # "="
        out[at + 3] = 61
        at += 4
    return at


@dataclass(frozen=True)
class CvmReport:
    """What a confidential guest's configfs-tsm entry gave: its provider, the report, the aux blob."""

    provider: str  # sev_guest | tdx_guest
    report: bytes  # SEV-SNP attestation report / TDX quote
    aux: bytes  # SEV-SNP extended report: the host-provided certificate table (VCEK...); else empty


def parse_boot_stamps(text: str) -> dict[str, float]:
    """The READY frame's `stage=seconds` pairs. The guest is untrusted: only known stages, each once, in
    order, non-decreasing, below a day; anything else is a `bad_frame`."""
    stamps: dict[str, float] = {}
    for word in text.split(" ") if text else ():
        match = _STAMP.fullmatch(word)
        if match is None or match.group(1) not in BOOT_STAGES or match.group(1) in stamps:
            raise ChannelError("bad_frame", f"bad boot stamp {word[:40]!r} in READY")
        value = float(match.group(2))
        if value > 86_400 or (stamps and value < max(stamps.values())):
            raise ChannelError("bad_frame", f"boot stamp {word[:40]!r} out of order")
        stamps[match.group(1)] = value
    order = [s for s in BOOT_STAGES if s in stamps]
    if list(stamps) != order:
        raise ChannelError("bad_frame", "boot stamps out of order")
    return stamps


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

    async def wait_ready(self, shared: bool = False) -> dict[str, float]:
        """Wait for the guest init; returns its boot stamps (`BOOT_STAGES` -> guest uptime, seconds; empty
        from an init that sends none). On a `shared` channel (a serial port that is also the kernel console
        until init silences it) lines before READY are boot messages and are skipped; after READY the
        protocol is strict either way."""
        for _ in range(100_000):
            kind, rest = await self._frame()
            if kind == "READY":
                return parse_boot_stamps(rest)
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

    async def open_volume(self, key: bytearray) -> str:
        """Hand the data-encryption key to the guest, which formats /dev/vdc as LUKS2 with it, opens it and
        mounts it at /data; returns the LUKS UUID the guest reports. The caller keeps (and wipes) `key`."""
        check_key(key)
        frame = self._new_buffer(len(b"VOLUME ") + 2 * KEY_BYTES + 1)
        try:
            frame[:7] = b"VOLUME "
            end = _hex_into(key, frame, 7)
            frame[end] = 0x0A
            await self._send_private(frame)
        finally:
            zeroize(frame)
        kind, rest = await self._frame()
        if kind == "VOLUME_OK":
            if not _LUKS_UUID.fullmatch(rest):
                raise ChannelError("bad_frame", f"VOLUME_OK with a bad LUKS UUID {rest[:40]!r}")
            return rest
        if kind == "ERROR":
            raise ChannelError("guest_error", rest[:500])
        raise ChannelError("bad_frame", f"expected VOLUME_OK, got {kind[:40]!r}")

    async def cvm_report(self, report_data: bytes) -> CvmReport:
        """Ask a confidential guest for its CPU's signed report over `report_data` (64 bytes). The guest (and
        so the hoster) cannot forge it: only the verifier's check of the vendor's signature makes it evidence."""
        if len(report_data) != 64:
            raise ValueError("REPORT_DATA is 64 bytes")
        self._writer.write(b"CVM_REPORT " + report_data.hex().encode() + b"\n")
        await self._writer.drain()
        kind, rest = await self._frame()
        if kind == "ERROR":
            raise ChannelError("guest_error", rest[:500])
        if kind != "CVM_REPORT_OK":
            raise ChannelError("bad_frame", f"expected CVM_REPORT_OK, got {kind[:40]!r}")
        parts = rest.split(" ")
        if len(parts) != 3 or not _PROVIDER.fullmatch(parts[0]):
            raise ChannelError("bad_frame", "CVM_REPORT_OK needs a provider, a report and an aux blob")
        try:
            report = base64.b64decode(parts[1], validate=True)
            aux = b"" if parts[2] == "-" else base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError):
            raise ChannelError("bad_frame", "CVM_REPORT_OK is not base64") from None
        if not report or len(report) > MAX_CVM_BLOB or len(aux) > MAX_CVM_BLOB:
            raise ChannelError("bad_frame", f"a CVM report of {len(report)} bytes (aux {len(aux)})")
        return CvmReport(parts[0], report, aux)

    async def put_secret(self, name: str, data: bytes | bytearray) -> None:
        """Write one secret file into the guest's secrets tmpfs (/run/secrets/<name> in the workload)."""
        check_secret(name, data)
        head = b"SECRET " + name.encode("ascii") + b" "
        frame = self._new_buffer(len(head) + 4 * ((len(data) + 2) // 3) + 1)
        if len(frame) > MAX_HOST_LINE:  # cannot happen within MAX_SECRET_BYTES; the guest's line bound
            raise ChannelError("secret_too_large", f"{name}: a {len(frame)}-byte frame")
        try:
            frame[:len(head)] = head
            end = _b64_into(data, frame, len(head))
            frame[end] = 0x0A
            await self._send_private(frame)
        finally:
            zeroize(frame)
        kind, rest = await self._frame()
        if kind == "SECRET_OK":
            if rest != name:
                raise ChannelError("bad_frame", f"SECRET_OK for {rest[:70]!r}, expected {name!r}")
            return
        if kind == "ERROR":
            raise ChannelError("guest_error", rest[:500])
        raise ChannelError("bad_frame", f"expected SECRET_OK, got {kind[:40]!r}")

    def _new_buffer(self, size: int) -> bytearray:
        """The buffer a key or secret frame is built in (zeroed after the write; tests look at it)."""
        return bytearray(size)

    async def _send_private(self, frame: bytearray) -> None:
        """Write `frame` straight to the socket from the caller's buffer. The stream writer would copy
        whatever the socket does not take at once into its own buffer (and free it unwiped), so the stream
        is drained first and the socket written directly; nothing else writes meanwhile (one frame, one
        answer)."""
        await self._writer.drain()
        transport = self._writer.transport
        if transport.get_write_buffer_size():
            raise ChannelError("channel_busy", "the channel still has unsent data")
        sock = transport.get_extra_info("socket")
        if sock is None or transport.is_closing():
            raise ChannelError("channel_closed", "the channel is closed")
        fd = sock.fileno()
        view = memoryview(frame)
        try:
            sent = 0
            while sent < len(view):
                try:
                    with view[sent:] as rest:
                        sent += os.write(fd, rest)
                except BlockingIOError:
                    await asyncio.sleep(0.002)  # the guest has not read yet: the socket buffer is full
                except OSError as exc:
                    raise ChannelError("channel_closed", f"writing to the guest: {exc.strerror or exc}") from None
        finally:
            view.release()

    def close(self) -> None:
        self._writer.close()
