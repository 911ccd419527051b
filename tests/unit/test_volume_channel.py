"""The key and secret frames of the guest channel against a scripted peer on a real socketpair (no VM), the
host-side volume erasure on a LUKS2 header made by the host's cryptsetup, and the tools the initramfs
carries for the guest."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from services.node_agent.channel import MAX_SECRET_BYTES, ChannelError, GuestChannel
from services.node_agent.volume import LUKS2_MAGIC, erase_volume, luks2_layout, make_volume
from shared.image.build import GUEST_TOOLS, add_host_tools, find_host_tool
from shared.image.manifest import ImageError

UUID = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"


class Peer:
    """The guest end: records every line it gets and answers each with `answer(line)`."""

    def __init__(self, sock: socket.socket, answer: Callable[[bytes], bytes]) -> None:
        self.sock = sock
        self.answer = answer
        self.lines: list[bytes] = []

    async def serve(self) -> None:
        reader, writer = await asyncio.open_connection(sock=self.sock, limit=1 << 20)
        while line := await reader.readline():
            self.lines.append(line)
            writer.write(self.answer(line))
            await writer.drain()
        writer.close()


def _guest_like(line: bytes) -> bytes:
    kind, _, rest = line.rstrip(b"\n").partition(b" ")
    if kind == b"VOLUME":
        return f"VOLUME_OK {UUID}\n".encode()
    if kind == b"SECRET":
        return b"SECRET_OK " + rest.split(b" ")[0] + b"\n"
    return b"ERROR unknown\n"


Make = Callable[[Callable[[bytes], bytes]], Awaitable[tuple[GuestChannel, Peer]]]


@pytest.fixture
async def pair() -> AsyncIterator[Make]:
    tasks: list[asyncio.Task[None]] = []
    channels: list[GuestChannel] = []

    async def make(answer: Callable[[bytes], bytes]) -> tuple[GuestChannel, Peer]:
        host, guest = socket.socketpair()
        peer = Peer(guest, answer)
        tasks.append(asyncio.create_task(peer.serve()))
        ch = await GuestChannel.open(host)
        channels.append(ch)
        return ch, peer

    yield make
    for ch in channels:
        ch.close()
    for t in tasks:
        t.cancel()


class Recording(GuestChannel):
    """Keeps a reference to every frame buffer the channel builds, to check they are zeroed."""

    buffers: list[bytearray]

    def _new_buffer(self, size: int) -> bytearray:
        buf = super()._new_buffer(size)
        self.buffers.append(buf)
        return buf


async def _recording(make: Make, answer: Callable[[bytes], bytes]) -> tuple[Recording, Peer]:
    ch, peer = await make(answer)
    ch.__class__ = Recording
    assert isinstance(ch, Recording)
    ch.buffers = []
    return ch, peer


async def test_the_key_goes_as_one_hex_frame_and_its_buffer_is_zeroed(pair) -> None:
    ch, peer = await _recording(pair, _guest_like)
    key = bytearray(os.urandom(32))
    assert await ch.open_volume(key) == UUID
    assert peer.lines == [b"VOLUME " + key.hex().encode() + b"\n"]
    assert len(ch.buffers) == 1 and len(ch.buffers[0]) == 72
    assert ch.buffers[0] == bytearray(72), "the frame buffer is zeroed after the write"
    assert len(key) == 32 and any(key), "the caller's key is left to the caller"


async def test_secrets_go_as_base64_frames_whatever_their_length(pair) -> None:
    ch, peer = await _recording(pair, _guest_like)
    ch._writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    files = {f"s{n}": os.urandom(n) for n in (0, 1, 2, 3, 4, 5, 1000)}
    files["big.bin"] = os.urandom(MAX_SECRET_BYTES)  # far larger than the socket buffer: written in pieces
    for name, data in files.items():
        await ch.put_secret(name, data)
    assert len(peer.lines) == len(files)
    for line, (name, data) in zip(peer.lines, files.items(), strict=True):
        assert line == b"SECRET " + name.encode() + b" " + base64.b64encode(data) + b"\n"
    assert all(not any(buf) for buf in ch.buffers), "every frame buffer is zeroed"


@pytest.mark.parametrize(("key", "reason"), [
    (bytearray(31), "volume_bad_key"), (bytearray(33), "volume_bad_key"), (bytearray(), "volume_bad_key"),
    ("00" * 32, "volume_bad_key"),
])
async def test_a_key_of_the_wrong_size_is_refused_before_anything_is_sent(pair, key, reason) -> None:
    ch, peer = await pair(_guest_like)
    with pytest.raises(ChannelError) as exc:
        await ch.open_volume(key)
    assert exc.value.reason == reason
    await asyncio.sleep(0.05)
    assert peer.lines == []


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("../x", b"", "secret_bad_name"), (".hidden", b"", "secret_bad_name"), ("", b"", "secret_bad_name"),
    ("a b", b"", "secret_bad_name"), ("x" * 65, b"", "secret_bad_name"), ("é", b"", "secret_bad_name"),
    ("ok\n", b"", "secret_bad_name"), ("ok", "text", "secret_bad_content"),
    ("ok", bytes(MAX_SECRET_BYTES + 1), "secret_too_large"),
])
async def test_bad_secret_names_and_sizes_are_refused_before_anything_is_sent(pair, name, data, reason) -> None:
    ch, peer = await pair(_guest_like)
    with pytest.raises(ChannelError) as exc:
        await ch.put_secret(name, data)
    assert exc.value.reason == reason
    await asyncio.sleep(0.05)
    assert peer.lines == []


@pytest.mark.parametrize(("answer", "reason"), [
    (b"ERROR volume: luksFormat failed\n", "guest_error"),
    (b"VOLUME_OK not-a-uuid\n", "bad_frame"),
    (b"VOLUME_OK " + UUID.upper().encode() + b"\n", "bad_frame"),
    (b"VOLUME_OK " + UUID.encode() + b" extra\n", "bad_frame"),
    (b"SECRET_OK x\n", "bad_frame"),
    (b"OUT aGk=\n", "bad_frame"),
    (b"", "channel_closed"),
])
async def test_volume_answers_are_parsed_strictly(pair, answer: bytes, reason: str) -> None:
    def reply(_line: bytes) -> bytes:
        return answer

    ch, peer = await pair(reply)
    if not answer:
        peer.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(ChannelError) as exc:
        await ch.open_volume(bytearray(os.urandom(32)))
    assert exc.value.reason == reason


@pytest.mark.parametrize(("answer", "reason"), [
    (b"SECRET_OK other\n", "bad_frame"),
    (b"ERROR secret: bad name\n", "guest_error"),
    (b"VOLUME_OK " + UUID.encode() + b"\n", "bad_frame"),
])
async def test_secret_answers_are_parsed_strictly(pair, answer: bytes, reason: str) -> None:
    ch, _peer = await pair(lambda _line: answer)
    with pytest.raises(ChannelError) as exc:
        await ch.put_secret("s1", b"x")
    assert exc.value.reason == reason


async def test_a_closed_guest_end_is_a_channel_error(pair) -> None:
    ch, peer = await pair(_guest_like)
    peer.sock.close()
    await asyncio.sleep(0.05)
    with pytest.raises(ChannelError) as exc:
        await ch.put_secret("s1", os.urandom(MAX_SECRET_BYTES))
    assert exc.value.reason == "channel_closed"


# ---------------------------------------------------------------- erasure on the host


def _luks_format(path: Path, key_hex: bytes) -> None:
    subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "16k",
                    "--luks2-keyslots-size", "1m", "--key-file", "-", "--keyfile-size", "64", str(path)],
                   input=key_hex, check=True, capture_output=True)


def test_erasure_destroys_keyslots_and_header_and_proves_it(tmp_path: Path) -> None:
    if shutil.which("cryptsetup", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip("cryptsetup not installed (apt package cryptsetup-bin)")
    vol = tmp_path / "volume.luks"
    make_volume(vol, 16)
    assert vol.stat().st_size == 16 << 20 and vol.stat().st_blocks == 0, "sparse"
    with pytest.raises(FileExistsError):
        make_volume(vol, 16)  # never reuses a file
    _luks_format(vol, os.urandom(32).hex().encode())
    fd = os.open(vol, os.O_RDONLY)
    try:
        assert luks2_layout(fd, 16 << 20) == (True, 2 << 20)
    finally:
        os.close(fd)
    ev = erase_volume(vol)
    assert ev.luks_header_found and ev.luks_erase == "ok" and ev.data_offset == 2 << 20
    assert ev.overwritten_bytes == 2 << 20 and ev.verified_zero and ev.removed and ev.volume_bytes == 16 << 20
    assert not vol.exists()
    assert erase_volume(vol).detail == "no volume file"


def test_erasure_of_a_volume_the_guest_never_formatted_or_corrupted(tmp_path: Path) -> None:
    blank = tmp_path / "blank.luks"
    make_volume(blank, 16)
    ev = erase_volume(blank)
    assert not ev.luks_header_found and ev.luks_erase == "no_header" and ev.verified_zero and ev.removed
    # A hostile guest's header: the magic, then a metadata size and JSON that point past the file.
    bad = tmp_path / "bad.luks"
    make_volume(bad, 16)
    with open(bad, "r+b") as f:
        f.write(LUKS2_MAGIC + b"\x00\x02" + (16384).to_bytes(8, "big"))
        f.seek(4096)
        f.write(b'{"segments":{"0":{"offset":"99999999999"}},"keyslots":{}}')
    ev = erase_volume(bad, cryptsetup="no-such-cryptsetup")
    assert ev.luks_header_found and ev.luks_erase == "unavailable"
    assert ev.overwritten_bytes == 16 << 20 and ev.verified_zero and ev.removed  # clamped to the file


# ---------------------------------------------------------------- the tools the initramfs carries


def test_a_missing_tool_is_a_clean_image_error_naming_the_package() -> None:
    with pytest.raises(ImageError) as exc:
        find_host_tool("no-such-cryptsetup", "cryptsetup-bin")
    assert exc.value.reason == "tool_missing" and "cryptsetup-bin" in exc.value.detail


def test_cryptsetup_and_mke2fs_run_from_the_initramfs_tree_alone(tmp_path: Path) -> None:
    """Each tool, its libraries and the loader at the host's paths: enough to run in a chroot of the tree."""
    for name, package in GUEST_TOOLS:
        try:
            find_host_tool(name, package)
        except ImageError:
            pytest.skip(f"{name} not installed (apt package {package})")
    carried = add_host_tools(tmp_path)
    assert any(p.endswith("/cryptsetup") for p in carried) and any(p.endswith("/mke2fs") for p in carried)
    assert any("ld-linux" in p for p in carried) and any("libcryptsetup" in p for p in carried)
    assert all((tmp_path / p.lstrip("/")).is_file() for p in carried)
    assert os.readlink(tmp_path / Path(find_host_tool("mke2fs", "e2fsprogs")).parent.relative_to("/") /
                       "mkfs.ext4") == "mke2fs"
    if os.geteuid() != 0:
        return  # chroot needs root
    cs = find_host_tool("cryptsetup", "cryptsetup-bin")
    proc = subprocess.run(["chroot", str(tmp_path), str(cs), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("cryptsetup 2"), proc.stderr
