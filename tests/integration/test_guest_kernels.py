"""Both guest kernels boot the same guest init for real (QEMU microvm, TCG here): qvm's minimal kernel through
its ELF vmlinux (PVH) and its bzImage, the distribution's cloud kernel through its bzImage; each boot says where
its time went; the minimal kernel loads no module, has no module loading at all, and runs locked down."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.node_agent.instance import Instance, InstanceSpec
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from shared.image.manifest import load_public_keys
from tests.framework.images import build_test_image

PROBE = ("sh", "-c", "dmesg | grep -q 'Kernel is locked down' && echo locked-down || echo not-locked; "
                     "[ -e /proc/modules ] && echo modules || echo no-modules; uname -r")


async def _boot(tmp_path: Path, kernel: str, with_vmlinux: bool) -> tuple[Instance, bytes]:
    bundle = build_test_image(tmp_path / "images", with_vmlinux=with_vmlinux, kernel=kernel)
    keys = load_public_keys([tmp_path / "images" / "publisher.pub"])
    inst = Instance(InstanceSpec(f"k-{kernel}-{int(with_vmlinux)}", "job", bundle, PROBE, cgroups=False,
                                 network=False), tmp_path / "instance", QemuMicrovm(), dict(keys))
    try:
        await inst.verify()
        await inst.launch()
        out = await inst.run()
        assert out.exit_code == 0, out.output
        return inst, out.output
    finally:
        await inst.destroy()


@pytest.mark.parametrize("with_vmlinux", [True, False], ids=["pvh", "bzimage"])
async def test_the_minimal_kernel_boots_locked_down_without_modules(tmp_path: Path, with_vmlinux: bool) -> None:
    inst, out = await _boot(tmp_path, "minimal", with_vmlinux)
    assert inst.boots_elf() is with_vmlinux
    lines = out.decode().split()
    assert lines[-1].endswith("-qvm") and "no-modules" in lines  # CONFIG_MODULES=n: no /proc/modules
    assert "locked-down" in lines  # lockdown (integrity) forced by the config, from early boot
    assert inst.manifest is not None and inst.manifest.kernel_build is not None
    b = inst.boot_breakdown
    assert b is not None and b.modules_ms < 100  # nothing to load
    assert sum(b.model_dump().values()) == pytest.approx(inst.boot_ms, abs=2.0)


async def test_the_distribution_cloud_kernel_still_boots(tmp_path: Path) -> None:
    inst, out = await _boot(tmp_path, "cloud", with_vmlinux=False)
    assert not inst.boots_elf()
    assert out.decode().split()[-1].endswith("-cloud-amd64")
    assert inst.manifest is not None and inst.manifest.kernel_build is None
    assert inst.boot_breakdown is not None and inst.boot_breakdown.modules_ms > 0  # its modules, from the initramfs
