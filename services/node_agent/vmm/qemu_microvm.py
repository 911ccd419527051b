"""QEMU's `microvm` machine: a minimal virtio-mmio VM, controlled over QMP on a unix socket.

- KVM when it works on this host, TCG otherwise: detected by booting the kernel with no initramfs under KVM
  (it panics and exits at once where KVM works; where /dev/kvm exists but nested virtualisation is broken
  it hangs, so the probe is bounded). Never hard-coded. The answer is kept per host boot and QEMU binary
  (in the cache directory, for every agent process) and the agent asks at start, so no job's boot waits for
  it (`InstanceBooted.breakdown.accel_probe_ms` shows when one did).
- Guest RAM comes from a memfd the agent owns (`memory-backend-file` on `/proc/self/fd/N`), so the agent
  can scrub it after the VM exits.
- The image's kernel, initramfs and root filesystem are the files the agent verified, passed as open
  descriptors: a file swapped on disk after verification is never the one booted.
- The root disk is attached read-only; the scratch disk and the optional data volume (LUKS2, formatted and
  opened inside the guest: the host file only ever holds ciphertext) are the instance's writable storage.
- No network device unless the instance has one (`-nodefaults` gives no NIC); with one, it is a tap in the
  instance's own network namespace behind an nftables default-deny policy (isolation/network.py).
- GPUs (`LaunchSpec.vfio_devices`, already on vfio-pci) are `-device vfio-pci,host=BDF`. microvm has no PCI
  bus by default: only then is `pcie=on` given, which adds a PCIe host bridge (GPEX) that microvm creates only
  with ACPI, so `acpi=on` is made explicit with it. The virtio devices stay on virtio-mmio either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from services.node_agent.isolation.seccomp import QEMU_ALLOW
from services.node_agent.isolation.vfio import VfioError, pci_address
from services.node_agent.vmm.base import LaunchSpec, VmmError, VmProcess
from services.node_agent.vmm.qmp import Qmp
from shared.image.kernel import cache_dir
from shared.tpm.digests import QEMU  # the binary name a local policy approves, too

__all__ = ["QemuMicrovm", "detect_accel", "spawn_qemu", "tsc_khz"]

_accel_probes: dict[str, asyncio.Future[tuple[str, str]]] = {}  # per qemu binary, this process: one probe
PROBE_TIMEOUT_S = 10.0  # KVM boots a kernel to its panic in well under a second; a broken KVM hangs


def tsc_khz() -> int | None:
    """microvm has no HPET or PM timer: without this the guest kernel sometimes hangs calibrating its TSC."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        return None
    return None


async def detect_accel(kernel: Path, qemu: str = QEMU) -> tuple[str, str]:
    """("kvm" | "tcg", why): one probe per process at most (concurrent callers share it), and none where an
    earlier process on this host boot already answered for this QEMU binary."""
    probe = _accel_probes.get(qemu)
    if probe is None:
        probe = _accel_probes[qemu] = asyncio.ensure_future(_probe_cached(kernel, qemu))
    try:
        return await asyncio.shield(probe)
    except Exception:
        _accel_probes.pop(qemu, None)  # a failed probe (no such binary...) is not an answer
        raise


def _probe_key(qemu: str) -> str | None:
    """This host boot, this QEMU binary and this /dev/kvm (a kvm module loaded later makes a new one): what
    the probe's answer depends on."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        binary = Path(shutil.which(qemu) or qemu).resolve()
        st = binary.stat()
        kvm = os.stat("/dev/kvm") if os.path.exists("/dev/kvm") else None
    except OSError:
        return None
    device = f"{kvm.st_ino}:{kvm.st_ctime_ns}" if kvm else "none"
    return hashlib.sha256(f"{boot_id}\0{binary}\0{st.st_size}\0{st.st_mtime_ns}\0{device}".encode()).hexdigest()[:32]


async def _probe_cached(kernel: Path, qemu: str) -> tuple[str, str]:
    key = _probe_key(qemu)
    where = cache_dir() / "accel" / f"{key}.json" if key else None
    if where is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            known = json.loads(where.read_text())
            if known["accel"] in ("kvm", "tcg"):
                return str(known["accel"]), str(known["why"])[:200]
    result = await _probe(kernel, qemu)
    if where is not None:
        with contextlib.suppress(OSError):
            where.parent.mkdir(parents=True, exist_ok=True)
            tmp = where.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"accel": result[0], "why": result[1]}))
            tmp.rename(where)
    return result


async def _probe(kernel: Path, qemu: str) -> tuple[str, str]:
    dev = Path("/dev/kvm")
    if not dev.exists():
        result = ("tcg", "no /dev/kvm")
    else:
        proc = await asyncio.create_subprocess_exec(
            qemu, "-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm", "-cpu", "host", "-m", "128",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 reboot=t", "-serial", "null",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
            ok = proc.returncode == 0
            why = "kvm boots" if ok else f"kvm probe exited {proc.returncode}: {err.decode(errors='replace')[:160]}"
        except TimeoutError:
            proc.kill()
            await proc.wait()
            ok, why = False, f"kvm probe hung (no guest kernel panic within {PROBE_TIMEOUT_S:g} s under KVM)"
        result = ("kvm", why) if ok else ("tcg", why.strip())
    return result


def _bdf(dev: str) -> str:
    try:
        return pci_address(dev)
    except VfioError as exc:
        raise VmmError(exc.reason, exc.detail) from None


async def spawn_qemu(spec: LaunchSpec, name: str, accel: str, argv: Callable[[int, int], list[str]]) -> VmProcess:
    """Start QEMU with the guest channel and QMP on socketpairs, the image files (and the agent's RAM memfd)
    as inherited descriptors, its own session, stderr to vmm.log, and the spec's confinement before exec.
    Shared by the microvm and the confidential (q35) drivers: `argv(qmp_fd, channel_fd)` is theirs."""
    control, qmp_end = socket.socketpair()
    channel, guest_end = socket.socketpair()
    fds = [spec.kernel_fd, spec.initrd_fd, spec.rootfs_fd, guest_end.fileno(), qmp_end.fileno(), *spec.extra_fds]
    if spec.memory_fd is not None:
        fds.append(spec.memory_fd)
    started = time.time_ns()
    try:
        with open(spec.workdir / "vmm.log", "wb") as vmm_log:
            proc = await asyncio.create_subprocess_exec(
                *argv(qmp_end.fileno(), guest_end.fileno()), pass_fds=fds,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=vmm_log,
                start_new_session=True, preexec_fn=spec.confine)
    except (OSError, subprocess.SubprocessError) as exc:
        control.close()
        channel.close()
        raise VmmError("vmm_start_failed", f"{type(exc).__name__}: {exc}") from None
    finally:
        qmp_end.close()
        guest_end.close()
    return VmProcess(proc.pid, proc, name, accel, started, spec.workdir / "console.log", channel=channel,
                     control=control, volume=spec.volume)


class QemuMicrovm:
    name = "qemu-microvm"

    def __init__(self, qemu: str = QEMU, accel: str = "auto", channel: str = "virtio-serial") -> None:
        """`channel`: virtio-serial (port qvm.0, the default), virtio-console (hvc0, as Cloud Hypervisor
        gives) or serial (ttyS0 shared with the kernel console, as Firecracker gives)."""
        if channel not in ("virtio-serial", "virtio-console", "serial"):
            raise ValueError(f"unknown channel {channel!r}")
        self.qemu = qemu
        self.accel = accel
        self.channel = channel
        self.shared_channel = channel == "serial"
        self.seccomp_allow: frozenset[str] | None = QEMU_ALLOW
        self.elf_kernel = False
        self.pvh = True  # boots the image's ELF vmlinux (PVH entry) when it ships one (Instance.boots_elf)
        self.ram_from_agent = True

    def available(self) -> bool:
        return shutil.which(self.qemu) is not None

    async def probe_accel(self, kernel: Path) -> str:
        """The accelerator this driver will use ("kvm" / "tcg"); asks the host once (see `detect_accel`)."""
        if self.accel != "auto":
            return self.accel
        return (await detect_accel(kernel, self.qemu))[0]

    def argv(self, spec: LaunchSpec, accel: str, qmp_fd: int, channel_fd: int) -> list[str]:
        khz = tsc_khz()
        cmdline = spec.cmdline + (f" tsc_early_khz={khz}" if khz and accel == "tcg" else "")
        cmdline += {"virtio-serial": "", "virtio-console": " qvm.channel=hvc0", "serial": " qvm.channel=ttyS0"}[
            self.channel]
        if self.channel == "serial":
            serial = ["-serial", "chardev:ch0"]
            channel = ["-chardev", f"socket,id=ch0,fd={channel_fd}"]
        else:
            serial = ["-serial", f"file:{spec.workdir / 'console.log'}"]
            port = "virtserialport,chardev=ch0,name=qvm.0" if self.channel == "virtio-serial" else \
                "virtconsole,chardev=ch0"
            channel = ["-device", "virtio-serial-device", "-chardev", f"socket,id=ch0,fd={channel_fd}",
                       "-device", port]
        # The data volume is the third disk (vdc): root, scratch, volume, in this order. Only ciphertext
        # reaches it; the guest formats and opens it.
        volume = ["-drive", f"id=volume,file={spec.volume},format=raw,if=none",
                  "-device", "virtio-blk-device,drive=volume"] if spec.volume is not None else []
        # The RTC stays on: without one a guest kernel with no kvmclock (TCG) spends about a second of every
        # boot waiting on CMOS reads that never settle ("Unable to read current time from RTC"), and with it
        # the guest has the wall-clock time.
        machine = "microvm,x-option-roms=off,rtc=on"
        if spec.vfio_devices:
            machine += ",acpi=on,pcie=on"
        argv = [self.qemu, "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
                "-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M"]
        if spec.memory_fd is not None:
            machine += ",memory-backend=mem"
            argv += ["-object", f"memory-backend-file,id=mem,size={spec.memory_mib}M,"
                                f"mem-path=/proc/self/fd/{spec.memory_fd},share=on,dump=off,merge=off"]
        argv = [argv[0], "-M", machine, *argv[1:]]
        argv += [
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", f"/proc/self/fd/{spec.kernel_fd}", "-initrd", f"/proc/self/fd/{spec.initrd_fd}",
            "-append", cmdline,
            *serial,
            "-drive", f"id=root,file=/proc/self/fd/{spec.rootfs_fd},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-drive", f"id=scratch,file={spec.scratch},format=raw,if=none",
            "-device", "virtio-blk-device,drive=scratch",
            *volume,
            *channel,
            "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
            "-pidfile", str(spec.workdir / "vmm.pid"),
        ]
        if spec.tap:
            argv += ["-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
                     "-device", "virtio-net-device,netdev=n0"]
        for i, dev in enumerate(spec.vfio_devices):
            argv += ["-device", f"vfio-pci,host={_bdf(dev)},id=vfio{i}"]
        return argv

    async def launch(self, spec: LaunchSpec) -> VmProcess:
        if not self.available():
            raise VmmError("vmm_missing", f"{self.qemu} not found (install qemu-system-x86)")
        accel = self.accel
        probe_started = time.monotonic()
        if accel == "auto":
            accel, _why = await detect_accel(Path(f"/proc/{os.getpid()}/fd/{spec.kernel_fd}"), self.qemu)
        probe_ms = (time.monotonic() - probe_started) * 1000
        vm = await spawn_qemu(spec, self.name, accel,
                              lambda qmp_fd, channel_fd: self.argv(spec, accel, qmp_fd, channel_fd))
        vm.accel_probe_ms = probe_ms
        return vm

    async def stop(self, vm: VmProcess, grace_s: float = 5.0) -> None:
        if vm.proc.returncode is None and vm.control is not None:
            with contextlib.suppress(Exception):
                qmp = await asyncio.wait_for(Qmp.over(vm.control), 2.0)
                vm.control = None  # the QMP stream owns the socket now
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(qmp.execute("quit"), 2.0)
                await qmp.close()
        if vm.proc.returncode is None:
            try:
                await asyncio.wait_for(vm.proc.wait(), grace_s)
            except TimeoutError:
                await vm.kill()
        if vm.control is not None:
            vm.control.close()
            vm.control = None
