"""The confidential-VM driver's contract: the q35 command line for SEV-SNP and TDX, option by option (the
machine, the two objects, the measured direct boot, the firmware, the PCI devices, descriptors not paths), what
it refuses (no KVM, a debug policy, bad TD digests), and the installed QEMU's own parser on the part it knows.

No SNP or TDX hardware here: nothing boots a confidential guest. The QEMU here (7.2, Debian bookworm) has
neither `sev-snp-guest` (9.1) nor `tdx-guest` (10.1), so the parser test drops the confidential object and
its machine option and checks that QEMU accepts everything else, machine created and paused (`-S`)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.node_agent.cvm_host import KINDS
from services.node_agent.isolation.seccomp import QEMU_ALLOW
from services.node_agent.vmm.base import LaunchSpec, Vmm, VmmError
from services.node_agent.vmm.qemu_cvm import CVM_ALLOW, NAMES, TDX_QGS_ALLOW, QemuConfidential
from shared.cvm.evidence import CVM_VMMS

OVMF = {"sev-snp": Path("/fw/OVMF.amdsev.fd"), "tdx": Path("/fw/OVMF.inteltdx.fd")}
KERNEL_FD, INITRD_FD, ROOTFS_FD, QMP_FD, CHANNEL_FD = 21, 22, 23, 30, 31
GPU = "0000:3b:00.0"


def spec(tmp_path: Path, **kw: object) -> LaunchSpec:
    base: dict[str, object] = dict(instance_id="i-1", workdir=tmp_path, kernel_fd=KERNEL_FD, initrd_fd=INITRD_FD,
                                   rootfs_fd=ROOTFS_FD, scratch=tmp_path / "scratch.img",
                                   cmdline="console=ttyS0 quiet", vcpus=4, memory_mib=2048)
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def values(argv: list[str], flag: str) -> list[str]:
    """Every value given to `flag`, in order."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def options(value: str) -> dict[str, str]:
    head, *rest = value.split(",")
    return {"": head, **dict(kv.partition("=")[::2] for kv in rest)}


def snp(**kw: object) -> QemuConfidential:
    return QemuConfidential("sev-snp", ovmf=OVMF["sev-snp"], **kw)  # type: ignore[arg-type]


def tdx(**kw: object) -> QemuConfidential:
    return QemuConfidential("tdx", ovmf=OVMF["tdx"], **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- SEV-SNP
def test_sev_snp_machine_objects_and_measured_direct_boot(tmp_path: Path) -> None:
    argv = snp(cbitpos=51).argv(spec(tmp_path), QMP_FD, CHANNEL_FD)
    assert argv[0] == "qemu-system-x86_64"
    assert values(argv, "-machine") == ["q35,confidential-guest-support=sev0,memory-backend=ram0,vmport=off"]
    objects = values(argv, "-object")
    assert [options(o)[""] for o in objects] == ["memory-backend-memfd", "sev-snp-guest"]
    assert options(objects[0]) == {"": "memory-backend-memfd", "id": "ram0", "size": "2048M", "share": "true",
                                   "prealloc": "false"}
    assert options(objects[1]) == {"": "sev-snp-guest", "id": "sev0", "cbitpos": "51", "reduced-phys-bits": "1",
                                   "kernel-hashes": "on", "policy": "0x30000"}
    assert values(argv, "-accel") == ["kvm"] and values(argv, "-cpu") == ["EPYC-v4"]
    assert values(argv, "-bios") == [str(OVMF["sev-snp"])]
    assert values(argv, "-m") == ["2048M"] and values(argv, "-smp") == ["4"]
    # the kernel, initrd and command line QEMU hashes into the SEV hashes table: the agent's verified files
    assert values(argv, "-kernel") == [f"/proc/self/fd/{KERNEL_FD}"]
    assert values(argv, "-initrd") == [f"/proc/self/fd/{INITRD_FD}"]
    assert values(argv, "-append") == ["console=ttyS0 quiet"]  # exactly the spec's: the hash covers every byte


def test_the_policy_cpu_model_and_c_bit_are_parameters(tmp_path: Path) -> None:
    argv = snp(policy=0x130000, cpu="EPYC-Genoa", cbitpos=47, reduced_phys_bits=5).argv(spec(tmp_path), 1, 2)
    guest = options(values(argv, "-object")[1])
    assert (guest["policy"], guest["cbitpos"], guest["reduced-phys-bits"]) == ("0x130000", "47", "5")
    assert values(argv, "-cpu") == ["EPYC-Genoa"]
    # not given: 51 on the command line until launch reads the host's C-bit
    assert options(values(snp().argv(spec(tmp_path), 1, 2), "-object")[1])["cbitpos"] == "51"


@pytest.mark.parametrize("policy, why", [(0x30000 | 1 << 19, "DEBUG"), (0x10000, "bit 17")])
def test_a_debug_or_malformed_snp_policy_is_refused(policy: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        snp(policy=policy)


# --------------------------------------------------------------------------------------------- TDX
def test_tdx_machine_object_and_firmware(tmp_path: Path) -> None:
    argv = tdx().argv(spec(tmp_path), QMP_FD, CHANNEL_FD)
    assert values(argv, "-machine") == ["q35,kernel-irqchip=split,confidential-guest-support=tdx0,memory-backend=ram0"]
    objects = values(argv, "-object")
    assert options(objects[0])[""] == "memory-backend-memfd" and options(objects[0])["id"] == "ram0"
    assert json.loads(objects[1]) == {"qom-type": "tdx-guest", "id": "tdx0", "sept-ve-disable": True,
                                      "quote-generation-socket": {"type": "vsock", "cid": "2", "port": "4050"}}
    assert len(objects) == 2
    assert values(argv, "-cpu") == ["host"] and values(argv, "-accel") == ["kvm"]
    assert values(argv, "-bios") == [str(OVMF["tdx"])]
    assert values(argv, "-kernel") == [f"/proc/self/fd/{KERNEL_FD}"]
    assert not any("sev" in a for a in argv)


def test_tdx_digests_and_the_quote_socket(tmp_path: Path) -> None:
    config, owner = bytes(range(48)), b"\xaa" * 48
    guest = json.loads(values(tdx(mrconfigid=config, mrowner=owner, quote_socket="unix:/run/qgs.sock").argv(
        spec(tmp_path), 1, 2), "-object")[1])
    assert base64.b64decode(guest["mrconfigid"]) == config and base64.b64decode(guest["mrowner"]) == owner
    assert guest["quote-generation-socket"] == {"type": "unix", "path": "/run/qgs.sock"}
    no_qgs = tdx(quote_socket=None)
    assert "quote-generation-socket" not in json.loads(values(no_qgs.argv(spec(tmp_path), 1, 2), "-object")[1])
    with pytest.raises(ValueError, match="48 bytes"):
        tdx(mrconfigid=b"short")
    with pytest.raises(ValueError, match="vsock:CID:PORT"):
        tdx(quote_socket="tcp:1.2.3.4:4050")


# ------------------------------------------------------------------------------------------- both
@pytest.mark.parametrize("make", [snp, tdx])
def test_no_microvm_no_tcg_and_descriptors_not_paths(make: object) -> None:
    tmp_path = Path("/var/lib/qvm/instances/i-1")  # argv does no I/O; a neutral path (the test's is named "microvm")
    vmm = make(cbitpos=51) if make is snp else make()  # type: ignore[operator]
    argv = vmm.argv(spec(tmp_path), QMP_FD, CHANNEL_FD)
    line = " ".join(argv)
    for absent in ("microvm", "virtio-mmio", "-device virtio-blk-device", "virtio-serial-device", "tcg",
                   "x-option-roms", "pcie=on", "-M "):
        assert absent not in line
    assert values(argv, "-chardev") == [f"socket,id=ch0,fd={CHANNEL_FD}", f"socket,id=qmp,fd={QMP_FD}"]
    assert values(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert values(argv, "-drive")[0] == f"id=root,file=/proc/self/fd/{ROOTFS_FD},format=raw,if=none,readonly=on"
    assert values(argv, "-pidfile") == [str(tmp_path / "vmm.pid")]
    assert values(argv, "-serial") == [f"file:{tmp_path / 'console.log'}"]
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert argv.count(flag) == 1
    assert values(argv, "-display") == ["none"]


def test_pci_devices_disks_channel_nic_and_gpus(tmp_path: Path) -> None:
    plain = snp(cbitpos=51).argv(spec(tmp_path), QMP_FD, CHANNEL_FD)
    assert values(plain, "-device") == [
        "virtio-blk-pci,drive=root,disable-legacy=on,iommu_platform=on",
        "virtio-blk-pci,drive=scratch,disable-legacy=on,iommu_platform=on",
        "virtio-serial-pci,id=vser0,disable-legacy=on,iommu_platform=on",
        "virtserialport,chardev=ch0,name=qvm.0",
    ]
    assert values(plain, "-drive")[1] == f"id=scratch,file={tmp_path / 'scratch.img'},format=raw,if=none"
    assert "-netdev" not in plain and "-fw_cfg" not in plain
    full = snp(cbitpos=51).argv(spec(tmp_path, volume=tmp_path / "vol.img", tap="qvmtap0",
                                     vfio_devices=(GPU, "/sys/bus/pci/devices/0000:3b:00.1/")), QMP_FD, CHANNEL_FD)
    assert values(full, "-drive")[2] == f"id=volume,file={tmp_path / 'vol.img'},format=raw,if=none"
    assert values(full, "-netdev") == ["tap,id=n0,ifname=qvmtap0,script=no,downscript=no"]
    devices = values(full, "-device")
    assert devices[2] == "virtio-blk-pci,drive=volume,disable-legacy=on,iommu_platform=on"  # vdc, after scratch
    assert "virtio-net-pci,netdev=n0,romfile=,disable-legacy=on,iommu_platform=on" in devices
    assert devices[-4:] == ["pcie-root-port,id=rp0,bus=pcie.0,chassis=1", f"vfio-pci,host={GPU},id=vfio0,bus=rp0",
                            "pcie-root-port,id=rp1,bus=pcie.0,chassis=2",
                            "vfio-pci,host=0000:3b:00.1,id=vfio1,bus=rp1"]
    assert values(full, "-fw_cfg") == ["name=opt/ovmf/X-PciMmio64Mb,string=262144"]
    bigger = snp(pci_mmio64_mb=1 << 20).argv(spec(tmp_path, vfio_devices=(GPU,)), 1, 2)
    assert values(bigger, "-fw_cfg") == ["name=opt/ovmf/X-PciMmio64Mb,string=1048576"]
    with pytest.raises(VmmError, match="bad_address"):
        snp().argv(spec(tmp_path, vfio_devices=("gpu0",)), 1, 2)


def test_the_driver_fits_the_vmm_protocol_and_the_verifier_names(tmp_path: Path) -> None:
    for kind in KINDS:
        vmm: Vmm = QemuConfidential(kind, ovmf=tmp_path / "fw")
        assert vmm.name == NAMES[kind]
        assert CVM_VMMS[vmm.name].value == kind  # the verifier demands a report of this kind from this VMM
        assert vmm.ram_from_agent is False and vmm.elf_kernel is False and vmm.shared_channel is False
    assert snp().seccomp_allow == CVM_ALLOW and QEMU_ALLOW <= CVM_ALLOW
    assert "socket" not in CVM_ALLOW and "connect" not in CVM_ALLOW  # SNP needs no socket of its own
    assert tdx().seccomp_allow == CVM_ALLOW | TDX_QGS_ALLOW and tdx(quote_socket=None).seccomp_allow == CVM_ALLOW
    with pytest.raises(ValueError, match="unknown"):
        QemuConfidential("sev")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- launch
@pytest.mark.parametrize("make", [snp, tdx])
async def test_launch_refuses_without_kvm(tmp_path: Path, make: object) -> None:
    vmm = make(kvm=tmp_path / "no-kvm")  # type: ignore[operator]
    assert not vmm.available()
    with pytest.raises(VmmError) as refused:
        await vmm.launch(spec(tmp_path))
    assert refused.value.reason == "cvm_needs_kvm"
    assert not (tmp_path / "vmm.log").exists()  # refused before anything started


async def test_launch_refuses_without_the_firmware(tmp_path: Path) -> None:
    (tmp_path / "kvm").touch()
    vmm = QemuConfidential("tdx", qemu="sh", ovmf=tmp_path / "OVMF.inteltdx.fd", kvm=tmp_path / "kvm")
    with pytest.raises(VmmError) as refused:
        await vmm.launch(spec(tmp_path))
    assert refused.value.reason == "cvm_firmware_missing" and "OVMF.inteltdx.fd" in refused.value.detail
    missing = QemuConfidential("tdx", qemu="no-such-qemu", ovmf=tmp_path / "fw", kvm=tmp_path / "kvm")
    with pytest.raises(VmmError, match="vmm_missing"):
        await missing.launch(spec(tmp_path))


async def test_launch_passes_the_descriptors_and_reads_the_host_c_bit(tmp_path: Path, null_fds: tuple[int, ...],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in QEMU (a shell script) records its argv and the descriptors it got: the kernel, initrd and root
    filesystem by the numbers on its command line, QMP and the channel as sockets."""
    (tmp_path / "kvm").touch()
    (tmp_path / "fw").touch()
    qemu = tmp_path / "qemu"
    qemu.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$0.argv"\nls -l /proc/$$/fd > "$0.fds"\n')
    qemu.chmod(0o755)
    monkeypatch.setattr("services.node_agent.vmm.qemu_cvm.snp_cbit", lambda: (47, 1))
    vmm = QemuConfidential("sev-snp", qemu=str(qemu), ovmf=tmp_path / "fw", kvm=tmp_path / "kvm")
    k, i, r = null_fds
    vm = await vmm.launch(spec(tmp_path, kernel_fd=k, initrd_fd=i, rootfs_fd=r))
    try:
        assert await vm.wait() == 0
        assert vm.vmm == "qemu-sev-snp" and vm.accel == "kvm" and vm.channel is not None and vm.control is not None
    finally:
        await vmm.stop(vm, 0.1)
        if vm.channel is not None:
            vm.channel.close()
    argv = (tmp_path / "qemu.argv").read_text().splitlines()
    assert options(values(argv, "-object")[1])["cbitpos"] == "47"
    fds = (tmp_path / "qemu.fds").read_text()
    for fd in (k, i, r):
        assert f" {fd} -> /dev/null" in fds
    for chardev in values(argv, "-chardev"):
        assert f" {options(chardev)['fd']} -> socket:" in fds


@pytest.fixture
def null_fds() -> Iterator[tuple[int, ...]]:
    fds = tuple(os.open("/dev/null", os.O_RDONLY) for _ in range(3))
    yield fds
    for fd in fds:
        os.close(fd)


# -------------------------------------------------------------------------------- QEMU's own parser
def fake_bzimage(path: Path) -> Path:
    """The smallest file QEMU's x86 loader takes as a bzImage (boot protocol 2.15 header, 4 setup sectors): it
    parses the header at machine creation, before `-S` would let a vCPU run, so no real kernel is needed."""
    image = bytearray(64 * 1024)
    image[0x1F1] = 4  # setup_sects
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)  # protocol version
    image[0x211] = 0x01  # loadflags: LOADED_HIGH (a bzImage)
    struct.pack_into("<I", image, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", image, 0x238, 2048)  # cmdline_size
    path.write_bytes(bytes(image))
    return path


def without_the_cvm(argv: list[str]) -> list[str]:
    """The command line minus what only a confidential-capable QEMU on KVM takes: the guest object, its machine
    option and the firmware (the QEMU here has neither object); TCG for KVM, `max` for the CPU model; QMP on
    stdio and a null guest channel instead of the agent's socketpair descriptors."""
    out: list[str] = []
    it = iter(argv)
    for flag in it:
        value = next(it) if flag.startswith("-") and flag not in ("-nodefaults", "-no-user-config",
                                                                   "-no-reboot") else None
        if value is None:
            out.append(flag)
            continue
        if (flag == "-object" and not value.startswith("memory-backend-memfd,")) or flag == "-bios":
            continue
        if flag == "-machine":
            value = ",".join(o for o in value.split(",") if not o.startswith("confidential-guest-support="))
        elif flag == "-accel":
            value = "tcg"
        elif flag == "-cpu":
            value = "max"
        elif flag == "-chardev":
            value = "stdio,id=qmp" if "id=qmp" in value else "null,id=ch0"
        out += [flag, value]
    return out


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")
@pytest.mark.parametrize("kind", ["sev-snp", "tdx"])
@pytest.mark.parametrize("gpus", [(), ("0000:ff:1f.7",)])
def test_qemu_itself_accepts_the_q35_machine_and_devices(tmp_path: Path, kind: str, gpus: tuple[str, ...]) -> None:
    """Paused (`-S`) with QMP on stdio: `prelaunch` means the machine and every device were created. With a GPU
    (there is none at that address) QEMU gets as far as looking for the host device behind its root port."""
    for name in ("initrd", "rootfs", "scratch.img", "vol.img"):
        (tmp_path / name).write_bytes(bytes(65536))
    kernel, initrd, rootfs = (os.open(p, os.O_RDONLY) for p in (fake_bzimage(tmp_path / "bzImage"),
                                                                tmp_path / "initrd", tmp_path / "rootfs"))
    try:
        vmm = QemuConfidential(kind, ovmf=tmp_path / "fw", cbitpos=51)  # type: ignore[arg-type]
        argv = vmm.argv(spec(tmp_path, kernel_fd=kernel, initrd_fd=initrd, rootfs_fd=rootfs, memory_mib=256,
                             volume=tmp_path / "vol.img", vfio_devices=gpus), 98, 99)
        assert "confidential-guest-support=" in values(argv, "-machine")[0]
        proc = subprocess.run([*without_the_cvm(argv), "-S"], pass_fds=(kernel, initrd, rootfs),
                              input='{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n'
                                    '{"execute":"quit"}\n', capture_output=True, text=True, timeout=60)
    finally:
        for fd in (kernel, initrd, rootfs):
            os.close(fd)
    if gpus:
        assert proc.returncode != 0 and "no such host device" in proc.stderr, proc.stderr
        assert "Bus 'rp0'" not in proc.stderr  # the root port exists and took the device
    else:
        assert proc.returncode == 0, proc.stderr
        assert '"status": "prelaunch"' in proc.stdout
