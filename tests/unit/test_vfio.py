"""GPUs go to a VM only through vfio-pci with sound IOMMU isolation, and come back to the host driver after.

Sysfs is a fixture tree (tests/framework/sysfs.py) whose small "kernel" moves driver links as Linux does; the
VMM side is checked on the QEMU command line (and against QEMU itself where it is installed), and on the
Cloud Hypervisor `vm.create` body through the REST stand-in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.node_agent.isolation.vfio import (
    Binding,
    Sysfs,
    VfioError,
    bind_vfio,
    check_isolation,
    host_sysfs_path,
    leftover_vfio,
    pci_address,
    release,
    return_to_host,
)
from services.node_agent.vmm.base import LaunchSpec, VmmError
from services.node_agent.vmm.cloud_hypervisor import CloudHypervisor
from services.node_agent.vmm.firecracker import Firecracker
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from tests.framework.fake_vmm import Fake
from tests.framework.sysfs import SysfsTree

GPU, AUDIO = "0000:3b:00.0", "0000:3b:00.1"
FAKE = Path(__file__).parent.parent / "framework" / "fake_vmm.py"


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    return SysfsTree(tmp_path / "root")


def _gpu_with_audio(tree: SysfsTree) -> None:
    tree.add_device(GPU, group=12)
    tree.add_device(AUDIO, device=0x22BA, pci_class=0x040300, driver="snd_hda_intel", group=12)


def _refusal(tree: SysfsTree, bdf: str = GPU) -> str:
    with pytest.raises(VfioError) as exc:
        bind_vfio(bdf, tree.sysfs())
    return exc.value.reason


# -- refusals first: nothing is written to sysfs when the GPU may not be passed through -------------------

def test_no_iommu_group_is_refused(tree: SysfsTree) -> None:
    tree.add_device(GPU, group=None)
    assert _refusal(tree) == "iommu_off"
    assert tree.writes == [] and tree.driver_of(GPU) == "nvidia"


def test_vfio_no_iommu_mode_is_no_isolation(tree: SysfsTree) -> None:
    tree.add_device(GPU, group=3)
    tree.set_group_name(3, "vfio-noiommu")
    assert _refusal(tree) == "iommu_off"


@pytest.mark.parametrize("other", [
    {"bdf": "0000:3a:00.0", "vendor": 0x8086, "device": 0x347A, "pci_class": 0x060400, "driver": "pcieport"},
    {"bdf": "0000:3c:00.0", "vendor": 0x15B3, "device": 0x101D, "pci_class": 0x020000, "driver": None},
    {"bdf": "0000:3b:01.0", "vendor": 0x10DE, "device": 0x2330, "pci_class": 0x030200, "driver": "nvidia"},
], ids=["pcie-bridge", "other-endpoint", "another-gpu"])
def test_a_group_shared_with_any_other_device_is_refused(tree: SysfsTree, other: dict[str, object]) -> None:
    """Strict: only functions of the GPU's own slot may share its group; a bridge is refused too."""
    tree.add_device(GPU, group=12)
    tree.add_device(group=12, **other)  # type: ignore[arg-type]
    with pytest.raises(VfioError) as exc:
        check_isolation(GPU, tree.sysfs())
    assert exc.value.reason == "iommu_group_shared" and str(other["bdf"]) in exc.value.detail
    assert tree.writes == []


@pytest.mark.parametrize(("vendor", "pci_class"), [(0x8086, 0x030000), (0x1002, 0x030000), (0x10DE, 0x040300),
                                                   (0x10DE, 0x068000)], ids=["intel-vga", "amd", "nv-audio", "nvswitch"])
def test_anything_but_an_nvidia_display_or_3d_controller_is_refused(tree: SysfsTree, vendor: int,
                                                                    pci_class: int) -> None:
    tree.add_device(GPU, vendor=vendor, pci_class=pci_class, group=12, driver=None)
    assert _refusal(tree) == "not_a_gpu"


def test_a_gpu_on_nouveau_is_never_hot_unbound(tree: SysfsTree) -> None:
    tree.add_device(GPU, group=12, driver="nouveau")
    assert _refusal(tree) == "driver_unsafe"
    assert tree.writes == [] and tree.driver_of(GPU) == "nouveau"


@pytest.mark.parametrize("addr", ["3b:00.0x", "0000:3b:20.0", "0000:3b:00.8", "/sys/devices/pci0000:3a/0000:3b:00.0",
                                  "../0000:3b:00.0", ""])
def test_malformed_addresses_are_refused(tree: SysfsTree, addr: str) -> None:
    assert _refusal(tree, addr) == "bad_address"


def test_a_missing_device_and_a_missing_vfio_driver_are_refused(tree: SysfsTree) -> None:
    assert _refusal(tree) == "no_such_device"
    tree.add_device(GPU, group=12)
    tree.remove_driver("vfio-pci")
    assert _refusal(tree) == "vfio_missing"
    assert tree.driver_of(GPU) == "nvidia"


# -- binding and release -----------------------------------------------------------------------------------

def test_an_isolated_gpu_binds_to_vfio_and_goes_back_to_nvidia(tree: SysfsTree) -> None:
    tree.add_device(GPU, group=7)
    gpu, functions = check_isolation(GPU, tree.sysfs())
    assert (gpu.vendor, gpu.device, gpu.pci_class, gpu.driver, gpu.iommu_group) == (0x10DE, 0x2330, 0x030200,
                                                                                     "nvidia", 7)
    assert [f.bdf for f in functions] == [GPU]
    binding = bind_vfio(GPU, tree.sysfs())
    assert binding.gpu == GPU and binding.group == 7
    assert tree.driver_of(GPU) == "vfio-pci" and tree.override_of(GPU) == "vfio-pci"
    # the kernel's route, in order: override, unbind from the current driver, probe
    assert tree.writes == [(f"/sys/bus/pci/devices/{GPU}/driver_override", "vfio-pci\n"),
                           ("/sys/bus/pci/drivers/nvidia/unbind", GPU), ("/sys/bus/pci/drivers_probe", GPU)]
    release(binding, tree.sysfs())
    assert tree.driver_of(GPU) == "nvidia" and tree.override_of(GPU) == "(null)"


def test_the_gpus_own_audio_function_moves_with_it_and_back(tree: SysfsTree) -> None:
    _gpu_with_audio(tree)
    binding = bind_vfio(GPU, tree.sysfs())
    assert [(f.bdf, f.original_driver) for f in binding.functions] == [(GPU, "nvidia"), (AUDIO, "snd_hda_intel")]
    assert tree.driver_of(GPU) == tree.driver_of(AUDIO) == "vfio-pci"
    release(binding, tree.sysfs())
    assert (tree.driver_of(GPU), tree.driver_of(AUDIO)) == ("nvidia", "snd_hda_intel")
    assert tree.override_of(GPU) == tree.override_of(AUDIO) == "(null)"


def test_a_function_with_no_driver_is_probed_onto_vfio_and_left_driverless(tree: SysfsTree) -> None:
    tree.add_device(GPU, group=12, driver=None)  # e.g. the nvidia module is not loaded on this host
    binding = bind_vfio(GPU, tree.sysfs())
    assert tree.driver_of(GPU) == "vfio-pci"
    assert ("/sys/bus/pci/drivers/None/unbind", GPU) not in tree.writes
    release(binding, tree.sysfs())
    assert tree.driver_of(GPU) is None


def test_binding_and_releasing_are_idempotent(tree: SysfsTree) -> None:
    _gpu_with_audio(tree)
    first = bind_vfio(GPU, tree.sysfs())
    writes = len(tree.writes)
    again = bind_vfio(GPU, tree.sysfs())  # already on vfio-pci: nothing is unbound or probed
    assert [w for w in tree.writes[writes:] if not w[0].endswith("driver_override")] == []
    assert tree.driver_of(GPU) == "vfio-pci"
    release(first, tree.sysfs())
    release(first, tree.sysfs())  # a second release finds everything home and changes nothing
    assert (tree.driver_of(GPU), tree.driver_of(AUDIO)) == ("nvidia", "snd_hda_intel")
    # the second binding saw vfio-pci as the original: releasing it keeps the device where it found it
    assert {f.original_driver for f in again.functions} == {"vfio-pci"}


def test_a_device_the_kernel_does_not_move_fails_the_bind_and_is_put_back(tree: SysfsTree) -> None:
    _gpu_with_audio(tree)
    tree.vfio_refuses.add(AUDIO)  # vfio-pci's probe fails for the audio function
    with pytest.raises(VfioError) as exc:
        bind_vfio(GPU, tree.sysfs())
    assert exc.value.reason == "bind_failed" and f"{AUDIO} is on no driver, not vfio-pci" == exc.value.detail
    # the GPU, already moved, was rolled back; the audio function was probed back onto its own driver
    assert (tree.driver_of(GPU), tree.driver_of(AUDIO)) == ("nvidia", "snd_hda_intel")
    assert tree.override_of(GPU) == tree.override_of(AUDIO) == "(null)"


def test_without_a_kernel_nothing_moves_and_the_bind_fails(tree: SysfsTree) -> None:
    """Plain file writes (no hook) change no driver link: the binder confirms, never assumes."""
    tree.add_device(GPU, group=12)
    with pytest.raises(VfioError) as exc:
        bind_vfio(GPU, tree.sysfs(kernel=False))
    assert exc.value.reason == "bind_failed" and "on nvidia, not vfio-pci" in exc.value.detail


def test_a_release_that_does_not_bring_the_host_driver_back_is_reported(tree: SysfsTree) -> None:
    tree.add_device(GPU, group=12)
    binding = bind_vfio(GPU, tree.sysfs())
    tree.remove_driver("nvidia")  # the host driver went away meanwhile (rmmod)
    with pytest.raises(VfioError) as exc:
        release(binding, tree.sysfs())
    assert exc.value.reason == "release_failed" and GPU in exc.value.detail
    assert tree.driver_of(GPU) is None  # off vfio-pci at least: no VM can open it again


def test_an_unbind_refused_by_the_kernel_is_a_bind_failure(tree: SysfsTree) -> None:
    tree.add_device(GPU, group=12)

    def racing_kernel(path: str, value: str) -> None:
        if path.endswith("/unbind"):  # another driver took the device between our read and our write
            raise OSError(19, "No such device", path)
        tree.kernel(path, value)

    with pytest.raises(VfioError) as exc:
        bind_vfio(GPU, Sysfs(tree.root, on_write=racing_kernel))
    assert exc.value.reason == "bind_failed" and "No such device" in exc.value.detail


def test_leftover_vfio_finds_nvidia_functions_left_on_vfio(tree: SysfsTree) -> None:
    _gpu_with_audio(tree)
    tree.add_device("0000:5e:00.0", group=30)  # another GPU, on nvidia
    tree.add_device("0000:00:1f.0", vendor=0x8086, pci_class=0x060100, driver="vfio-pci", group=2)  # not NVIDIA
    assert leftover_vfio(tree.sysfs()) == []
    bind_vfio(GPU, tree.sysfs())  # and the agent crashes: the Binding is lost
    assert leftover_vfio(tree.sysfs()) == [GPU, AUDIO]
    # the sweep: each goes back to the driver the kernel picks for it, the host's
    assert [return_to_host(bdf, tree.sysfs()) for bdf in leftover_vfio(tree.sysfs())] == ["nvidia", "snd_hda_intel"]
    assert leftover_vfio(tree.sysfs()) == [] and tree.override_of(GPU) == "(null)"
    assert return_to_host(GPU, tree.sysfs()) == "nvidia"  # again: nothing to do


def test_a_gpu_given_to_vfio_at_boot_cannot_be_returned(tree: SysfsTree) -> None:
    tree.add_device(GPU, group=12, driver="vfio-pci", default_driver="vfio-pci")  # vfio-pci.ids=10de:2330
    assert leftover_vfio(tree.sysfs()) == [GPU]
    with pytest.raises(VfioError) as exc:
        return_to_host(GPU, tree.sysfs())
    assert exc.value.reason == "release_failed"


def test_addresses_normalise() -> None:
    assert pci_address("3B:00.0") == GPU
    assert pci_address(f"/sys/bus/pci/devices/{GPU}/") == GPU
    assert host_sysfs_path("3b:00.1") == f"/sys/bus/pci/devices/{AUDIO}/"
    assert Binding(GPU, 1, ()).functions == ()


# -- the VMMs ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def null_fd() -> Iterator[int]:
    fd = os.open("/dev/null", os.O_RDONLY)
    yield fd
    os.close(fd)


def _spec(tmp_path: Path, devices: tuple[str, ...] = (), fd: int = 0) -> LaunchSpec:
    return LaunchSpec(f"vfio-{tmp_path.name[-12:]}", tmp_path, fd, fd, fd, tmp_path / "scratch", "console=ttyS0",
                      1, 128, vfio_devices=devices)


def _machine(argv: list[str]) -> str:
    return argv[argv.index("-M") + 1]


def test_qemu_gets_a_pcie_bus_and_vfio_devices_only_when_given(tmp_path: Path) -> None:
    qemu = QemuMicrovm()
    plain = qemu.argv(_spec(tmp_path), "tcg", 10, 11)
    assert "pcie=on" not in _machine(plain) and not any("vfio-pci" in a for a in plain)
    gpu = qemu.argv(_spec(tmp_path, (GPU, f"/sys/bus/pci/devices/{AUDIO}/")), "tcg", 10, 11)
    assert _machine(gpu) == "microvm,x-option-roms=off,rtc=on,acpi=on,pcie=on"
    assert [gpu[i + 1] for i, a in enumerate(gpu) if a == "-device" and gpu[i + 1].startswith("vfio-pci")] == [
        f"vfio-pci,host={GPU},id=vfio0", f"vfio-pci,host={AUDIO},id=vfio1"]
    # everything else is the same command line
    rest = list(gpu)
    while "vfio-pci" in " ".join(rest):
        at = next(i for i, a in enumerate(rest) if a.startswith("vfio-pci"))
        del rest[at - 1:at + 1]
    rest[rest.index("-M") + 1] = _machine(plain)
    assert rest == plain
    with pytest.raises(VmmError, match="bad_address"):
        qemu.argv(_spec(tmp_path, ("gpu0",)), "tcg", 10, 11)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")
@pytest.mark.parametrize("devices", [(), ("0000:ff:1f.7",)])
def test_qemu_itself_accepts_the_machine_and_places_vfio_on_its_pcie_bus(tmp_path: Path,
                                                                         devices: tuple[str, ...]) -> None:
    """The driver's -M and -device flags given to the installed QEMU: with a device it gets as far as looking
    for the host device (there is none here), which it only does once vfio-pci found a PCI bus."""
    argv = QemuMicrovm().argv(_spec(tmp_path, devices), "tcg", 10, 11)
    vfio = [x for i, a in enumerate(argv) if a == "-device" and argv[i + 1].startswith("vfio-pci")
            for x in ("-device", argv[i + 1])]
    proc = subprocess.run(["qemu-system-x86_64", "-M", _machine(argv), "-accel", "tcg", "-m", "128", "-nodefaults",
                           "-no-user-config", "-display", "none", "-S", "-qmp", "stdio", *vfio],
                          input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n', capture_output=True,
                          text=True, timeout=30)
    if devices:
        assert proc.returncode != 0 and "no such host device" in proc.stderr and "PCI' bus" not in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr


def test_cloud_hypervisor_config_lists_devices_only_when_given(tmp_path: Path) -> None:
    ch = CloudHypervisor()
    assert "devices" not in ch.vm_config(_spec(tmp_path), "/run/con.sock")
    config = ch.vm_config(_spec(tmp_path, ("3b:00.0", f"/sys/bus/pci/devices/{AUDIO}")), "/run/con.sock")
    assert config["devices"] == [{"path": f"/sys/bus/pci/devices/{GPU}/", "id": "vfio0"},
                                 {"path": f"/sys/bus/pci/devices/{AUDIO}/", "id": "vfio1"}]


async def test_cloud_hypervisor_creates_the_vm_with_its_devices_through_the_api(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, null_fd: int) -> None:
    record = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_VMM_RECORD", str(record))
    monkeypatch.delenv("FAKE_VMM_FAIL", raising=False)
    binary = tmp_path / "cloud-hypervisor"
    binary.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} cloud-hypervisor \"$@\"\n")
    binary.chmod(0o755)
    ch = CloudHypervisor(str(binary))
    vm = await ch.launch(_spec(tmp_path, (GPU,), null_fd))
    try:
        create = json.loads(record.read_text().splitlines()[0])
        assert create["path"] == "/api/v1/vm.create"
        assert create["body"]["devices"] == [{"path": f"/sys/bus/pci/devices/{GPU}/", "id": "vfio0"}]
    finally:
        await ch.stop(vm, grace_s=2.0)
        if vm.channel is not None:
            vm.channel.close()


def test_the_stand_in_validates_devices_as_cloud_hypervisor_does() -> None:
    def create(devices: object) -> int:
        return Fake("cloud-hypervisor").handle("PUT", "/api/v1/vm.create", {
            "payload": {"kernel": "k"}, "devices": devices})[0]

    assert create([{"path": f"/sys/bus/pci/devices/{GPU}/", "id": "gpu", "iommu": False, "pci_segment": 0,
                    "x_nv_gpudirect_clique": 0}]) == 204
    assert create([{"path": "/sys/bus/pci/devices/a/", "id": None}]) == 204  # Option: null is the default
    for bad in ({"path": "/x"}, [{"id": "gpu"}], [{"path": 1}], [{"path": "/x", "iommu": "on"}],
                [{"path": "/x", "pci_segment": 1}], [{"path": "/x", "x_nv_gpudirect_clique": 256}],
                [{"path": "/x", "bogus": 1}], [{"path": "/x", "id": "a"}, {"path": "/y", "id": "a"}], ["/x"]):
        assert create(bad) == 400, bad


async def test_firecracker_refuses_passthrough_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(VmmError) as exc:
        await Firecracker(binary=str(tmp_path / "no-such-firecracker")).launch(_spec(tmp_path, (GPU,)))
    assert exc.value.reason == "vfio_unsupported"
