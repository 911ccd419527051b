"""The VMM's confinement, on the real QEMU: its cgroup limits, its seccomp filter, and what a filtered
syscall does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.node_agent.instance import Instance, InstanceError, InstanceSpec, VmState
from services.node_agent.isolation.seccomp import QEMU_ALLOW
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from shared.image.manifest import load_public_keys
from tests.framework.images import build_test_image

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _instance(tmp_path: Path, command: tuple[str, ...], **spec: object) -> Instance:
    bundle = build_test_image(tmp_path / "images")
    keys = load_public_keys([tmp_path / "images" / "publisher.pub"])
    return Instance(InstanceSpec(f"conf-{tmp_path.name[-20:]}", "job", bundle, command, vcpus=1, memory_mib=192,
                                 **spec),  # type: ignore[arg-type]
                    tmp_path / "instance", QemuMicrovm(), dict(keys))


def _cgroups_usable() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists() or (CGROUP_ROOT / "memory").is_dir()


async def test_vmm_runs_in_its_cgroup_under_a_seccomp_filter(tmp_path: Path) -> None:
    if not _cgroups_usable():
        pytest.skip("no cgroup v2 or v1 cpu+memory hierarchy on this machine")
    inst = _instance(tmp_path, ("sleep", "60"))
    try:
        await inst.verify()
        await inst.launch()
        assert inst.vm is not None and inst.cgroup is not None
        status = Path(f"/proc/{inst.vm.pid}/status").read_text()
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
        assert inst.vm.pid in inst.cgroup.pids()
        limits = inst.cgroup.limits()
        assert limits.get("memory.max", limits.get("memory.limit_in_bytes")) == str((192 + 256) << 20)
        assert limits.get("cpu.max", limits.get("cpu.cfs_quota_us", "")).split()[0] == "100000"
        dirs = inst.cgroup.dirs
    finally:
        removed = await inst.destroy()
    assert any(r.startswith("cgroup:") for r in removed)
    assert not any(d.exists() for d in dirs), "the cgroup is removed with the instance"


async def test_a_filtered_syscall_kills_the_vmm_and_is_reported(tmp_path: Path) -> None:
    inst = _instance(tmp_path, ("true",), seccomp=QEMU_ALLOW - {"execve"}, cgroups=False, boot_timeout_s=30.0)
    try:
        await inst.verify()
        with pytest.raises(InstanceError) as exc:
            await inst.launch()
        assert exc.value.reason == "seccomp_violation"
        assert inst.state is VmState.FAILED
    finally:
        await inst.destroy()
    await asyncio.sleep(0)
