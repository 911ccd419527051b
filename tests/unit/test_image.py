"""Image pieces without a VM: container tarballs (layers, whiteouts, hostile paths), the initramfs writer,
module ordering, manifest checks, and the guest channel's parser."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from services.node_agent.channel import ChannelError, GuestChannel
from services.node_agent.instance import _NEXT, VmState
from shared.image.cpio import initramfs_from_dir
from shared.image.kernel import module_load_order
from shared.image.manifest import ImageError, generate_publisher_key, load_private_key, load_public_keys
from shared.image.rootfs import apply_container_tar
from shared.image.verify import CHUNK, fd_sha256, verify_bundle


def _layer(files: dict[str, bytes | None], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _docker_save(path: Path, layers: list[bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        names = []
        for i, data in enumerate(layers):
            name = f"l{i}/layer.tar"
            names.append(name)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        manifest = json.dumps([{"Config": "c.json", "Layers": names}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return path


def test_container_layers_apply_in_order_with_whiteouts(tmp_path: Path) -> None:
    image = _docker_save(tmp_path / "img.tar", [
        _layer({"etc": None, "etc/a": b"1", "etc/b": b"2", "opt": None, "opt/x": b"x"}),
        _layer({"etc/.wh.a": b"", "etc/c": b"3", "opt/.wh..wh..opq": b"", "opt/y": b"y"}),
    ])
    root = tmp_path / "root"
    root.mkdir()
    assert apply_container_tar(image, root) == 2
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["b", "c"]
    assert sorted(p.name for p in (root / "opt").iterdir()) == ["y"]


def test_hostile_layers_cannot_write_outside_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for i, layers in enumerate([
        [_layer({"../escape": b"x"})],
        [_layer({}, symlinks={"link": str(outside)}), _layer({"link/pwned": b"x"})],
    ]):
        root = tmp_path / f"root{i}"
        root.mkdir()
        with pytest.raises(ImageError) as exc:
            apply_container_tar(_docker_save(tmp_path / f"bad{i}.tar", layers), root)
        assert exc.value.reason == "bad_container_image"
    assert list(outside.iterdir()) == []


def test_not_a_container_image(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"definitely not a tarball")
    with pytest.raises(ImageError, match="bad_container_image"):
        apply_container_tar(junk, tmp_path)


def test_initramfs_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_bytes(b"\x7fELF...")
    (tmp_path / "init").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "sh").symlink_to("tool")
    first = initramfs_from_dir(tmp_path)
    (tmp_path / "init").touch()  # a newer mtime changes nothing
    assert initramfs_from_dir(tmp_path) == first


def test_modules_load_after_their_dependencies(tmp_path: Path) -> None:
    mods = tmp_path / "kernel"
    mods.mkdir()
    (mods / "virtio_ring.ko").write_bytes(b"\x00name=virtio_ring\x00depends=\x00")
    (mods / "virtio.ko").write_bytes(b"\x00depends=virtio_ring\x00")
    (mods / "virtio_blk.ko").write_bytes(b"\x00depends=virtio,virtio_ring\x00")
    order = [p.name for p in module_load_order(tmp_path, ("virtio_blk", "overlay"))]  # overlay: built in
    assert order == ["virtio_ring.ko", "virtio.ko", "virtio_blk.ko"]


def test_manifest_checks(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="missing_manifest"):
        verify_bundle(tmp_path, {})
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ImageError, match="unsigned"):
        verify_bundle(tmp_path, {})
    (tmp_path / "manifest.sig").write_bytes(b"sig")
    with pytest.raises(ImageError, match="malformed_manifest"):
        verify_bundle(tmp_path, {})
    priv, pub = generate_publisher_key(tmp_path / "keys")
    assert load_private_key(priv) and len(load_public_keys([pub])) == 1
    (tmp_path / "keys" / "bad.pub").write_text("not a key")
    with pytest.raises(ImageError, match="bad_publisher_key"):
        load_public_keys([tmp_path / "keys" / "bad.pub"])


def test_instance_state_machine_has_no_way_back() -> None:
    assert _NEXT[VmState.DESTROYED] == frozenset()
    assert VmState.RUNNING not in _NEXT[VmState.EXITED]
    assert VmState.BOOTING not in _NEXT[VmState.CREATED], "no launch without a verified image"


async def _channel_with(data: bytes) -> GuestChannel:
    reader = asyncio.StreamReader(limit=1024)
    reader.feed_data(data)
    reader.feed_eof()

    class _W:
        def write(self, _b: bytes) -> None: ...
        async def drain(self) -> None: ...
        def close(self) -> None: ...

    return GuestChannel(reader, _W())  # type: ignore[arg-type]


@pytest.mark.parametrize(("frames", "reason"), [
    (b"READY\nOUT !!notbase64\n", "bad_frame"),
    (b"READY\nEXIT 999\n", "bad_frame"),
    (b"READY\nWHAT\n", "bad_frame"),
    (b"READY\nERROR disk missing\n", "guest_error"),
    (b"READY\n", "channel_closed"),
    (b"READY\nOUT " + b"A" * 4096 + b"\n", "bad_frame"),
])
async def test_guest_channel_rejects_bad_frames(frames: bytes, reason: str) -> None:
    ch = await _channel_with(frames)
    await ch.wait_ready()
    with pytest.raises(ChannelError) as exc:
        await ch.run("true")
    assert exc.value.reason == reason


async def test_guest_channel_collects_output_and_exit_code() -> None:
    ch = await _channel_with(b"READY\nOUT " + base64.b64encode(b"hi\n") + b"\nEXIT 7\n")
    await ch.wait_ready()
    out = await ch.run("true")
    assert (out.exit_code, out.output, out.total_bytes) == (7, b"hi\n", 3)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 7])
def test_part_digest_over_chunk_boundaries(tmp_path: Path, size: int) -> None:
    """The double-buffered reader hashes every byte once, in order, whatever the size's relation to the chunk."""
    data = os.urandom(size)
    part = tmp_path / "part"
    part.write_bytes(data)
    with open(part, "rb") as f:
        f.seek(5 if size > 5 else 0)
        assert fd_sha256(f.fileno()) == (hashlib.sha256(data).hexdigest(), size)  # pread: the offset is ignored
        assert f.tell() == (5 if size > 5 else 0)  # and left alone
