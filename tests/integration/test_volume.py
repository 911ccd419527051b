"""The encrypted data volume and the client's secrets, on the real QEMU with the real guest init: the guest
formats and opens LUKS2 with a key it gets over the channel only, the host file holds only ciphertext, the
secrets land in a tmpfs, and teardown erases the header with evidence. Then the volume through the
Firecracker (jailed or not) and Cloud Hypervisor drivers, against the REST stand-in (tests/framework)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from services.node_agent.instance import Instance, InstanceError, InstanceSpec, VmState
from services.node_agent.vmm.cloud_hypervisor import CloudHypervisor
from services.node_agent.vmm.firecracker import Firecracker
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from services.node_agent.volume import LUKS2_MAGIC, VOLUME_FILE
from shared.image.manifest import load_public_keys
from tests.framework.images import build_test_image


def _instance(tmp_path: Path, command: tuple[str, ...], memory_mib: int = 256, **spec: object) -> Instance:
    bundle = build_test_image(tmp_path / "images")
    keys = load_public_keys([tmp_path / "images" / "publisher.pub"])
    return Instance(InstanceSpec(f"vol-{tmp_path.name[-20:]}", "job", bundle, command, memory_mib=memory_mib,
                                 cgroups=False, network=False, **spec),  # type: ignore[arg-type]
                    tmp_path / "instance", QemuMicrovm(), dict(keys))


async def test_volume_opens_in_the_guest_and_the_host_only_ever_holds_ciphertext(tmp_path: Path) -> None:
    marker = "qvm-plaintext-marker-" + os.urandom(8).hex()
    script = (f"printf '%s' {marker} > /data/f && sync && sha256sum /data/f /run/secrets/s1 | cut -d' ' -f1 && "
              "stat -c '%a %s' /run/secrets /run/secrets/s1 /run/secrets/s2 && "
              "grep -E ' /data | /run/secrets ' /proc/mounts | cut -d' ' -f1-3")
    inst = _instance(tmp_path, ("sh", "-c", script), volume_mib=32)
    dek = bytearray(os.urandom(32))
    s1, s2 = os.urandom(64 * 1024), b"the second secret\n"  # s1: the largest secret a frame may carry
    volume = tmp_path / "instance" / VOLUME_FILE
    try:
        await inst.verify()
        await inst.launch()
        assert volume.stat().st_size == 32 << 20
        uuid = await inst.unlock_volume(dek)
        await inst.deliver_secrets({"s1": s1, "s2": s2})
        out = await inst.run()
        raw = volume.read_bytes()  # after the guest powered off, before destroy()
        console = (tmp_path / "instance" / "console.log").read_bytes()
    finally:
        removed = await inst.destroy()
    lines = out.output.decode().splitlines()
    assert out.exit_code == 0, out.output
    assert lines[0] == hashlib.sha256(marker.encode()).hexdigest(), "the workload wrote and read /data/f"
    assert lines[1] == hashlib.sha256(s1).hexdigest(), "the secret arrived intact"
    assert lines[2].startswith("700 ") and lines[3:5] == [f"400 {len(s1)}", f"400 {len(s2)}"]
    assert lines[5:] == ["/dev/mapper/qvm-data /data ext4", "qvm-secrets /run/secrets tmpfs"]
    # The host's file: a LUKS2 header the guest wrote (with the UUID it reported), and nothing in the clear.
    assert raw[:6] == LUKS2_MAGIC and raw[168:168 + 36] == uuid.encode()
    for secret in (marker.encode(), bytes(dek), dek.hex().encode(), dek.hex().upper().encode(), s1, s2.strip()):
        assert secret not in raw
    assert dek.hex().encode() not in console and marker.encode() not in console
    assert re.search(rb"qvm-init: volume luksFormat [0-9.]+-[0-9.]+ open -[0-9.]+ mkfs -[0-9.]+ mounted", console)
    # Teardown: keyslots erased, header area overwritten and read back, file gone.
    ev = inst.volume_erasure
    assert ev is not None and ev.luks_header_found and ev.luks_erase == "ok", ev
    assert ev.data_offset == 2 << 20 and ev.overwritten_bytes == 2 << 20 and ev.verified_zero and ev.removed
    assert "volume" in removed and not volume.exists() and not (tmp_path / "instance").exists()
    assert inst.timings["volume_ms"] > 0 and inst.timings["secrets_ms"] > 0


async def test_bad_keys_and_secret_names_are_refused_on_both_sides(tmp_path: Path) -> None:
    inst = _instance(tmp_path, ("true",), volume_mib=16)
    try:
        await inst.verify()
        await inst.launch()
        # Refused by the host: nothing reaches the guest, the instance is unchanged.
        for bad_key in (bytearray(31), bytearray(33)):
            with pytest.raises(InstanceError) as exc:
                await inst.unlock_volume(bad_key)
            assert exc.value.reason == "volume_bad_key"
        for name in ("../evil", ".hidden", "a/b", "x" * 65):
            with pytest.raises(InstanceError) as exc:
                await inst.deliver_secrets({"fine": b"1", name: b"x"})
            assert exc.value.reason == "secret_bad_name"
        with pytest.raises(InstanceError) as exc:
            await inst.deliver_secrets({"big": bytes(64 * 1024 + 1)})
        assert exc.value.reason == "secret_too_large"
        assert inst.state is VmState.RUNNING and inst.secrets_delivered == []
        # Refused by the guest init itself (frames the host would never send, written raw).
        ch = inst._channel
        for frame, answer in [
            (b"VOLUME " + b"0" * 63 + b"\n", "volume: the key is not 64 hex digits"),
            (b"VOLUME " + b"A" * 64 + b"\n", "volume: the key is not lowercase hex"),
            (b"SECRET .x AAAA\n", "secret: bad name"),
            (b"SECRET ../x AAAA\n", "secret: bad name"),
            (b"SECRET ok !!!!\n", "secret: ok: content is not base64"),
            (b"SECRET nospace\n", "secret: malformed frame"),
        ]:
            ch._writer.write(frame)
            assert await ch._frame() == ("ERROR", answer)
        # The guest is still in step: the real thing works after the refusals, once.
        uuid = await inst.unlock_volume(bytearray(os.urandom(32)))
        ch._writer.write(b"VOLUME " + b"0" * 64 + b"\n")
        assert await ch._frame() == ("ERROR", "volume: already open")
        await inst.deliver_secrets({"s": b"once"})
        with pytest.raises(InstanceError) as exc:
            await inst.deliver_secrets({"s": b"again"})
        assert exc.value.reason == "secret_rejected" and "already delivered" in exc.value.detail
        assert inst.state is VmState.FAILED  # a guest that refuses a secret fails the instance
    finally:
        await inst.destroy()
    assert len(uuid) == 36
    assert inst.volume_erasure is not None and inst.volume_erasure.luks_erase == "ok"


async def test_volume_and_a_full_size_secret_over_the_serial_channel_firecracker_gives(tmp_path: Path) -> None:
    """On ttyS0 (shared with the console until init silences it) nothing a tool prints may reach the channel:
    cryptsetup warns on stdout about the small keyslot area."""
    bundle = build_test_image(tmp_path / "images")
    keys = load_public_keys([tmp_path / "images" / "publisher.pub"])
    inst = Instance(InstanceSpec("vol-serial", "job", bundle, ("sh", "-c", "echo ok > /data/x && cat /data/x && "
                                                                           "sha256sum /run/secrets/big | cut -c1-64"),
                                 cgroups=False, network=False, volume_mib=16),
                    tmp_path / "instance", QemuMicrovm(channel="serial"), dict(keys))
    big = os.urandom(64 * 1024)
    try:
        await inst.verify()
        await inst.launch()
        await inst.unlock_volume(bytearray(os.urandom(32)))
        await inst.deliver_secrets({"big": big})
        out = await inst.run()
    finally:
        await inst.destroy()
    assert out.output.decode().split() == ["ok", hashlib.sha256(big).hexdigest()]
    assert inst.volume_erasure is not None and inst.volume_erasure.luks_erase == "ok"


async def test_volume_size_and_state_are_checked(tmp_path: Path) -> None:
    inst = _instance(tmp_path, ("true",), volume_mib=8)
    try:
        await inst.verify()
        with pytest.raises(InstanceError) as exc:
            await inst.launch()
        assert exc.value.reason == "volume_too_small"
        with pytest.raises(InstanceError) as exc:
            await inst.unlock_volume(bytearray(32))
        assert exc.value.reason == "illegal_state"
    finally:
        await inst.destroy()
    assert inst.volume_erasure is None


# ---------------------------------------------------------------- the REST-API VMMs (stand-in binaries)

FAKE = Path(__file__).parent.parent / "framework" / "fake_vmm.py"


def _fake(tmp_path: Path, kind: str) -> str:
    path = tmp_path / "bin" / kind
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} {kind} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def _rest_instance(tmp_path: Path, vmm: object, monkeypatch: pytest.MonkeyPatch) -> tuple[Instance, Path]:
    record = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_VMM_RECORD", str(record))
    monkeypatch.delenv("FAKE_VMM_FAIL", raising=False)
    bundle = build_test_image(tmp_path / "images", with_vmlinux=True)
    keys = load_public_keys([tmp_path / "images" / "publisher.pub"])
    return Instance(InstanceSpec(f"volr-{tmp_path.name[-16:]}", "job", bundle, ("true",), cgroups=False,
                                 network=False, volume_mib=16),
                    tmp_path / "instance", vmm, dict(keys)), record  # type: ignore[arg-type]


def _requests(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


async def _through(inst: Instance) -> str:
    await inst.verify()
    await inst.launch()
    uuid = await inst.unlock_volume(bytearray(os.urandom(32)))
    await inst.deliver_secrets({"s1": b"x"})
    return uuid


async def test_firecracker_attaches_the_volume_as_the_third_drive(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    inst, record = _rest_instance(tmp_path, Firecracker(_fake(tmp_path, "firecracker"), jailer=None), monkeypatch)
    try:
        assert await _through(inst) == "00000000-0000-4000-8000-000000000000"
        assert (await inst.run()).exit_code == 0
    finally:
        await inst.destroy()
    drives = [r["body"] for r in _requests(record) if r["path"].startswith("/drives/")]
    assert [d["drive_id"] for d in drives] == ["root", "scratch", "volume"]
    assert drives[2] == {"drive_id": "volume", "path_on_host": str(tmp_path / "instance" / VOLUME_FILE),
                         "is_root_device": False, "is_read_only": False}
    assert not any("VOLUME" in line for line in record.read_text().splitlines()), "the key is never recorded"
    ev = inst.volume_erasure  # the stand-in never formats it: an empty file, still overwritten and removed
    assert ev is not None and ev.luks_erase == "no_header" and ev.verified_zero and ev.removed


async def test_a_jailed_firecracker_writes_a_copy_that_is_erased_before_the_jail_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jail_base = Path(tempfile.mkdtemp(prefix="jail-"))  # short: the API socket lives inside (108-byte limit)
    fc = Firecracker(_fake(tmp_path, "firecracker"), jailer=_fake(tmp_path, "jailer"), chroot_base=jail_base,
                     uid=64123, gid=64123)
    inst, record = _rest_instance(tmp_path, fc, monkeypatch)
    try:
        await _through(inst)
        assert inst.vm is not None and inst.vm.jail is not None and inst.vm.volume is not None
        copy = inst.vm.volume
        assert copy == inst.vm.jail / "root" / VOLUME_FILE and copy.stat().st_uid == 64123
        assert copy.stat().st_size == 16 << 20 and copy.stat().st_blocks == 0, "copied sparse"
        # Stand in for the guest: a real LUKS2 header on the copy the VMM writes.
        if shutil.which("cryptsetup", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            pytest.skip("cryptsetup not installed (apt package cryptsetup-bin)")
        await asyncio.to_thread(
            subprocess.run, ["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                             "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "16k",
                             "--luks2-keyslots-size", "1m", "--key-file", "-", str(copy)],
            input=os.urandom(32).hex().encode(), check=True, capture_output=True)
        await inst.run()
    finally:
        await inst.destroy()
    drives = {r["body"]["drive_id"]: r["body"]["path_on_host"] for r in _requests(record)
              if r["path"].startswith("/drives/")}
    assert drives == {"root": "/rootfs.ext4", "scratch": "/scratch.ext4", "volume": "/volume.luks"}
    ev = inst.volume_erasure
    assert ev is not None and ev.luks_header_found and ev.luks_erase == "ok" and ev.verified_zero and ev.removed
    assert not list(jail_base.rglob("*.luks")) and not (tmp_path / "instance").exists()
    shutil.rmtree(jail_base)


async def test_cloud_hypervisor_gets_the_volume_as_its_third_disk(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    inst, record = _rest_instance(tmp_path, CloudHypervisor(_fake(tmp_path, "cloud-hypervisor")), monkeypatch)
    try:
        await _through(inst)
        assert (await inst.run()).exit_code == 0
    finally:
        await inst.destroy()
    config = _requests(record)[0]["body"]
    assert [d.get("readonly", False) for d in config["disks"]] == [True, False, False]
    assert config["disks"][2] == {"path": str(tmp_path / "instance" / VOLUME_FILE)}
    assert inst.volume_erasure is not None and inst.volume_erasure.removed
