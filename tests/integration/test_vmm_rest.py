"""The Firecracker and Cloud Hypervisor drivers against a stand-in that serves each VMM's documented REST
API on a unix socket and rejects what the real API rejects (neither binary installs on these machines;
the guest side of both channels is proven under QEMU in test_vm_confinement.py)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from services.node_agent.instance import Instance, InstanceError, InstanceSpec
from services.node_agent.vmm.cloud_hypervisor import CloudHypervisor
from services.node_agent.vmm.firecracker import Firecracker
from shared.image.manifest import load_public_keys
from tests.framework.images import build_test_image, run_once

FAKE = Path(__file__).parent.parent / "framework" / "fake_vmm.py"


def _binary(tmp_path: Path, kind: str) -> str:
    path = tmp_path / "bin" / kind
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} {kind} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def _instance(tmp_path: Path, vmm: object, record: Path) -> Instance:
    os.environ["FAKE_VMM_RECORD"] = str(record)
    bundle = build_test_image(tmp_path / "images", with_vmlinux=True)
    keys = load_public_keys([tmp_path / "images" / "publisher.pub"])
    return Instance(InstanceSpec(f"rest-{tmp_path.name[-16:]}", "job", bundle, ("echo", "hi"), vcpus=2, memory_mib=192,
                                 cgroups=False, network=False),
                    tmp_path / "instance", vmm, dict(keys))  # type: ignore[arg-type]


def _requests(record: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAKE_VMM_FAIL", raising=False)
    monkeypatch.setenv("FAKE_VMM_RECORD", "/dev/null")


async def test_firecracker_configures_starts_runs_and_stops_through_its_api(tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    inst = _instance(tmp_path, Firecracker(_binary(tmp_path, "firecracker")), record)
    out = await run_once(inst)
    assert out.exit_code == 0 and out.output == b"fake guest ran: echo hi\n"
    reqs = _requests(record)
    assert [(r["method"], r["path"]) for r in reqs] == [
        ("PUT", "/machine-config"), ("PUT", "/boot-source"), ("PUT", "/drives/root"), ("PUT", "/drives/scratch"),
        ("PUT", "/actions")]
    assert reqs[0]["body"] == {"vcpu_count": 2, "mem_size_mib": 192, "smt": False}
    boot = reqs[1]["body"]
    assert isinstance(boot, dict) and boot["kernel_image_path"].startswith(f"/proc/{os.getpid()}/fd/")
    kernel = Path(boot["kernel_image_path"]).name
    assert kernel.isdigit()  # the verified ELF vmlinux, as an open descriptor of the agent
    assert "qvm.channel=ttyS0" in boot["boot_args"]
    assert reqs[2]["body"]["is_read_only"] is True and reqs[3]["body"]["is_read_only"] is False  # type: ignore[index]
    assert reqs[4]["body"] == {"action_type": "InstanceStart"}


async def test_firecracker_through_its_jailer(tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    jail_base = Path(tempfile.mkdtemp(prefix="jail-"))  # short: the API socket lives inside (108-byte limit)
    fc = Firecracker(_binary(tmp_path, "firecracker"), jailer=_binary(tmp_path, "jailer"), chroot_base=jail_base,
                     uid=64123, gid=64123)
    inst = _instance(tmp_path, fc, record)
    try:
        await inst.verify()
        await inst.launch()
        assert inst.vm is not None and inst.vm.jail is not None
        jail_root = inst.vm.jail / "root"
        copied = jail_root / "vmlinux"
        assert copied.stat().st_uid == 64123
        assert copied.read_bytes() == (inst.spec.bundle / "vmlinux").read_bytes(), "the verified bytes"
        out = await inst.run()
    finally:
        await inst.destroy()
    assert out.exit_code == 0
    reqs = _requests(record)
    boot = next(r["body"] for r in reqs if r["path"] == "/boot-source")
    assert boot["kernel_image_path"] == "/vmlinux" and boot["initrd_path"] == "/initrd.img"  # type: ignore[index]
    drives = {r["body"]["drive_id"]: r["body"]["path_on_host"] for r in reqs if r["path"].startswith("/drives/")}  # type: ignore[index]
    assert drives == {"root": "/rootfs.ext4", "scratch": "/scratch.ext4"}
    assert not list(jail_base.rglob("*.ext4")), "the jail is removed with the instance"
    shutil.rmtree(jail_base)


async def test_cloud_hypervisor_creates_boots_runs_and_shuts_down_through_its_api(tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    inst = _instance(tmp_path, CloudHypervisor(_binary(tmp_path, "cloud-hypervisor")), record)
    out = await run_once(inst)
    assert out.exit_code == 0 and out.output == b"fake guest ran: echo hi\n"
    reqs = _requests(record)
    assert [r["path"] for r in reqs] == ["/api/v1/vm.create", "/api/v1/vm.boot"]
    config = reqs[0]["body"]
    assert isinstance(config, dict)
    assert config["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2} and config["memory"] == {"size": 192 << 20}
    assert config["disks"][0]["readonly"] is True and "readonly" not in config["disks"][1]
    assert config["console"]["mode"] == "Socket" and "qvm.channel=hvc0" in config["payload"]["cmdline"]


@pytest.mark.parametrize(("kind", "driver", "calls"), [
    ("firecracker", Firecracker, [{"action_type": "SendCtrlAltDel"}]),
    ("cloud-hypervisor", CloudHypervisor, ["/api/v1/vm.shutdown", "/api/v1/vmm.shutdown"]),
])
async def test_a_running_vm_is_stopped_through_the_api(tmp_path: Path, kind: str, driver: type, calls: list) -> None:
    record = tmp_path / "requests.jsonl"
    inst = _instance(tmp_path, driver(_binary(tmp_path, kind)), record)
    await inst.verify()
    await inst.launch()
    assert inst.vm is not None and inst.vm.proc.returncode is None
    removed = await inst.destroy()
    assert any(r.startswith("vmm:") for r in removed) and inst.vm.proc.returncode is not None
    tail = _requests(record)[-len(calls):]
    assert [r["body"] if kind == "firecracker" else r["path"] for r in tail] == calls


@pytest.mark.parametrize(("kind", "driver", "fail"), [
    ("firecracker", Firecracker, "/boot-source"),
    ("cloud-hypervisor", CloudHypervisor, "/api/v1/vm.create"),
])
async def test_an_api_refusal_fails_the_launch_and_kills_the_vmm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                kind: str, driver: type, fail: str) -> None:
    monkeypatch.setenv("FAKE_VMM_FAIL", fail)
    inst = _instance(tmp_path, driver(_binary(tmp_path, kind)), tmp_path / "requests.jsonl")
    try:
        await inst.verify()
        with pytest.raises(InstanceError) as exc:
            await inst.launch()
        assert exc.value.reason == "vmm_api_error" and "injected failure" in exc.value.detail
        assert inst.vm is None
    finally:
        await inst.destroy()


async def test_the_stand_in_rejects_what_the_real_api_rejects(tmp_path: Path) -> None:
    """The stand-in is only useful if it is strict: check it refuses malformed requests."""
    from tests.framework.fake_vmm import Fake

    fc = Fake("firecracker")
    assert fc.handle("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1})[0] == 400
    assert fc.handle("PUT", "/drives/root", {"drive_id": "other", "is_root_device": False})[0] == 400
    assert fc.handle("PUT", "/actions", {"action_type": "InstanceStart"})[0] == 400  # nothing configured
    ch = Fake("cloud-hypervisor")
    assert ch.handle("PUT", "/api/v1/vm.boot", None)[0] == 500
    assert ch.handle("PUT", "/api/v1/vm.create", {"payload": {}})[0] == 400
    assert ch.handle("PUT", "/api/v1/vm.create", {"payload": {"kernel": "k"}, "console": {"mode": "Socket"}})[0] == 400


async def test_an_image_without_vmlinux_is_refused_by_elf_kernel_vmms(tmp_path: Path) -> None:
    bundle = build_test_image(tmp_path / "images", with_vmlinux=False)
    keys = load_public_keys([tmp_path / "images" / "publisher.pub"])
    inst = Instance(InstanceSpec("no-vmlinux", "job", bundle, ("true",), cgroups=False, network=False),
                    tmp_path / "instance", Firecracker(_binary(tmp_path, "firecracker")), dict(keys))
    try:
        await inst.verify()
        with pytest.raises(InstanceError, match="image_needs_vmlinux"):
            await inst.launch()
    finally:
        await inst.destroy()
