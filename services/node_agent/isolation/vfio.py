"""GPUs reach a job only through VFIO, only with sound IOMMU isolation, and go back to the host driver after.

A GPU is handed to a VM by binding it (and every other function in its IOMMU group) to `vfio-pci`; the VMM
then opens `/dev/vfio/<group>`. The IOMMU group is the unit of isolation: every device in it can reach the
others' memory by peer-to-peer DMA, so a group is only accepted when it holds nothing but the functions of
the GPU's own physical device (same domain:bus:slot, any function: the GPU and its HDMI audio function,
typically). That is stricter than the kernel, which also lets PCIe bridges share a group; we refuse those
too (`iommu_group_shared`) rather than reason about which bridges are harmless.

Binding follows the kernel's documented route, never `new_id` (which would grab every card of that model):

    echo vfio-pci > /sys/bus/pci/devices/BDF/driver_override
    echo BDF      > /sys/bus/pci/drivers/<current>/unbind
    echo BDF      > /sys/bus/pci/drivers_probe          # the override makes only vfio-pci match

and release is the same route back (override cleared, unbind from vfio-pci, probe: the default driver, e.g.
`nvidia`, takes the device again, where the VRAM scrub can run). Each step is confirmed by reading the
`driver` symlink, never assumed. A device bound to `nouveau` is refused: hot-unbinding nouveau is known to
hang or crash hosts (the same rule as qudata-agent's vfio.go).

All sysfs access goes through one `Sysfs` object whose root is `/` on hosts and a fixture tree in tests
(tests/framework/sysfs.py builds one, with a small "kernel" that moves driver links).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ReasonedError

__all__ = [
    "NVIDIA",
    "VFIO_DRIVER",
    "Binding",
    "BoundFunction",
    "PciDevice",
    "Sysfs",
    "VfioError",
    "bind_vfio",
    "check_isolation",
    "host_sysfs_path",
    "leftover_vfio",
    "pci_address",
    "release",
    "return_to_host",
]

NVIDIA = 0x10DE
VFIO_DRIVER = "vfio-pci"
UNSAFE_DRIVERS = frozenset({"nouveau"})  # hot-unbinding these hangs or crashes hosts: refuse, never try
_BDF = re.compile(r"^(?:(?:0000)?([0-9a-f]{4}):)?([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")  # NVML: 8-digit domain


class VfioError(ReasonedError):
    """A GPU cannot be given to (or taken back from) a VM. Reasons: `bad_address`, `no_such_device`,
    `not_a_gpu`, `iommu_off`, `iommu_group_shared`, `driver_unsafe`, `vfio_missing`, `bind_failed`,
    `release_failed`."""


def pci_address(value: str) -> str:
    """The canonical BDF (`0000:3b:00.0`) of a BDF, a short BDF (`3b:00.0`), NVML's bus id
    (`00000000:3B:00.0`) or a sysfs device path (`/sys/bus/pci/devices/0000:3b:00.0/`): what VMM configs
    and sysfs names use."""
    name = value.rstrip("/").rsplit("/", 1)[-1].lower()
    m = _BDF.match(name)
    if not m or ("/" in value and not value.startswith("/sys/bus/pci/devices/")):
        raise VfioError("bad_address", f"{value!r} is not a PCI address or /sys/bus/pci/devices path")
    domain, bus, slot, fn = m.groups()
    return f"{domain or '0000'}:{bus}:{slot}.{fn}"


def host_sysfs_path(value: str) -> str:
    """The host's sysfs directory of a device, as Cloud Hypervisor's `devices[].path` wants it."""
    return f"/sys/bus/pci/devices/{pci_address(value)}/"


def _slot(bdf: str) -> str:
    return bdf.rsplit(".", 1)[0]


@dataclass(frozen=True)
class PciDevice:
    """What sysfs says about one PCI function."""

    bdf: str
    vendor: int
    device: int
    pci_class: int  # 24-bit class code: 0x030000 VGA, 0x030200 3D controller, 0x040300 HD audio
    driver: str | None  # the `driver` symlink's target name; None when no driver holds it
    override: str | None  # driver_override (None when unset: the kernel reads back "(null)")
    iommu_group: int | None  # None: no IOMMU translates this device's DMA

    @property
    def is_nvidia_gpu(self) -> bool:
        return self.vendor == NVIDIA and self.pci_class >> 16 == 0x03


class Sysfs:
    """Every sysfs read and write of this module, under one root (`/` on hosts).

    `on_write(path, value)` is the test seam at the sysfs boundary: it is called after each write with the
    host path written (`/sys/...`, root-independent) and the value, so a fixture tree can act as the kernel
    does (move `driver` links on unbind and drivers_probe). Production never passes it. An `OSError` it
    raises is a failed write, as the kernel's `-ENODEV` from a real sysfs file would be."""

    def __init__(self, root: Path = Path("/"), on_write: Callable[[str, str], None] | None = None) -> None:
        self.root = root
        self.on_write = on_write

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def read(self, host_path: str) -> str:
        return self.path(host_path).read_text().strip()

    def write(self, host_path: str, value: str) -> None:
        """One write(2) of the whole value, without O_CREAT: a sysfs attribute that is not there is an
        error (and a fixture tree must have created it), never a new file."""
        fd = os.open(self.path(host_path), os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
        if self.on_write is not None:
            self.on_write(host_path, value)

    def device(self, bdf: str) -> PciDevice:
        base = f"/sys/bus/pci/devices/{bdf}"
        if not self.path(base).is_dir():
            raise VfioError("no_such_device", f"no PCI device {bdf}")
        try:
            vendor, device = int(self.read(f"{base}/vendor"), 16), int(self.read(f"{base}/device"), 16)
            pci_class = int(self.read(f"{base}/class"), 16)
            override = self.read(f"{base}/driver_override") if self.path(f"{base}/driver_override").exists() \
                else "(null)"
        except (OSError, ValueError) as exc:
            raise VfioError("no_such_device", f"{bdf}: unreadable sysfs attributes ({exc})") from None
        return PciDevice(bdf, vendor, device, pci_class, self._link_name(f"{base}/driver"),
                         None if override in ("(null)", "") else override, self._group_of(base))

    def group_members(self, group: int) -> list[str]:
        """The BDFs in IOMMU group `group` (`/sys/kernel/iommu_groups/N/devices/*`)."""
        devices = self.path(f"/sys/kernel/iommu_groups/{group}/devices")
        return sorted(p.name for p in devices.iterdir()) if devices.is_dir() else []

    def nvidia_functions(self) -> list[PciDevice]:
        root = self.path("/sys/bus/pci/devices")
        names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        return [d for d in map(self.device, names) if d.vendor == NVIDIA]

    def _link_name(self, host_path: str) -> str | None:
        try:
            return os.readlink(self.path(host_path)).rstrip("/").rsplit("/", 1)[-1]
        except OSError:
            return None

    def _group_of(self, base: str) -> int | None:
        name = self._link_name(f"{base}/iommu_group")
        if name is None or not name.isdigit():
            return None
        # vfio's no-IOMMU mode makes fake groups named "vfio-noiommu": a group, but no isolation at all
        name_file = self.path(f"/sys/kernel/iommu_groups/{name}/name")
        if name_file.exists() and name_file.read_text().strip() == "vfio-noiommu":
            return None
        return int(name)


def check_isolation(bdf: str, sysfs: Sysfs | None = None) -> tuple[PciDevice, list[PciDevice]]:
    """The GPU and every function of its IOMMU group, if the GPU may be given to a VM; otherwise `VfioError`
    with the first reason that applies, in this order: `bad_address`, `no_such_device`, `not_a_gpu`
    (an NVIDIA display or 3D controller, vendor 0x10de, class 0x03xxxx), `iommu_off` (no IOMMU group, or
    vfio's no-IOMMU mode), `iommu_group_shared` (any other device in the group: only functions of the GPU's
    own slot are allowed, bridges included in the refusal), `driver_unsafe` (a group member on `nouveau`)."""
    sysfs = sysfs or Sysfs()
    gpu = sysfs.device(pci_address(bdf))
    if not gpu.is_nvidia_gpu:
        raise VfioError("not_a_gpu", f"{gpu.bdf} is {gpu.vendor:04x}:{gpu.device:04x} class {gpu.pci_class:06x}, "
                                     "not an NVIDIA display/3D controller")
    if gpu.iommu_group is None:
        raise VfioError("iommu_off", f"{gpu.bdf} has no IOMMU group (IOMMU off in firmware or kernel, "
                                     "or vfio no-IOMMU mode): its DMA would reach all host memory")
    members = sysfs.group_members(gpu.iommu_group)
    strangers = [m for m in members if _slot(m) != _slot(gpu.bdf)]
    if strangers:
        raise VfioError("iommu_group_shared", f"IOMMU group {gpu.iommu_group} of {gpu.bdf} also holds "
                                              f"{', '.join(strangers)}: they could reach the VM's DMA")
    functions = [sysfs.device(m) for m in sorted({*members, gpu.bdf})]
    unsafe = [f"{f.bdf} ({f.driver})" for f in functions if f.driver in UNSAFE_DRIVERS]
    if unsafe:
        raise VfioError("driver_unsafe", f"{', '.join(unsafe)} must not be hot-unbound; blacklist nouveau and "
                                         "use the nvidia driver or none")
    return gpu, functions


@dataclass(frozen=True)
class BoundFunction:
    """One function we moved to vfio-pci, and what to put back."""

    bdf: str
    original_driver: str | None
    original_override: str | None


@dataclass(frozen=True)
class Binding:
    """A GPU's IOMMU group on vfio-pci: `gpu` is the function to give the VMM; `functions` is every function
    of the group (the GPU included), each with the driver it goes back to."""

    gpu: str
    group: int
    functions: tuple[BoundFunction, ...]


def bind_vfio(bdf: str, sysfs: Sysfs | None = None) -> Binding:
    """Move the GPU and every function of its IOMMU group to vfio-pci (the kernel only lets a VMM open a group
    whose every member is on vfio-pci or unbound). Isolation is checked first (`check_isolation`). A function
    already on vfio-pci is left there (binding is idempotent). If any function does not end up on vfio-pci
    the ones already moved are put back and `bind_failed` is raised."""
    sysfs = sysfs or Sysfs()
    gpu, functions = check_isolation(bdf, sysfs)
    assert gpu.iommu_group is not None  # check_isolation refuses a device without a group
    if not sysfs.path(f"/sys/bus/pci/drivers/{VFIO_DRIVER}").is_dir():
        raise VfioError("vfio_missing", "the vfio-pci driver is not loaded (modprobe vfio-pci)")
    done: list[BoundFunction] = []
    for fn in functions:
        done.append(BoundFunction(fn.bdf, fn.driver, fn.override))
        try:
            _move(sysfs, fn.bdf, VFIO_DRIVER, VFIO_DRIVER)
        except VfioError as exc:
            undo = Binding(gpu.bdf, gpu.iommu_group, tuple(done))
            try:
                release(undo, sysfs)
            except VfioError as again:
                raise VfioError("bind_failed", f"{exc.detail}; rolling back also failed: {again.detail}") from None
            raise VfioError("bind_failed", exc.detail) from None
    return Binding(gpu.bdf, gpu.iommu_group, tuple(done))


def release(binding: Binding, sysfs: Sysfs | None = None) -> None:
    """Give every function of `binding` back to the driver it had before `bind_vfio` (for a GPU, the host's
    nvidia driver, where the VRAM scrub runs) and restore its driver_override. Releasing twice is harmless:
    a function already on its original driver is left alone. Every function is attempted; failures are
    reported together as `release_failed`."""
    sysfs = sysfs or Sysfs()
    failed: list[str] = []
    for fn in binding.functions:
        try:
            _move(sysfs, fn.bdf, fn.original_override, fn.original_driver)
        except VfioError as exc:
            failed.append(exc.detail)
    if failed:
        raise VfioError("release_failed", "; ".join(failed))


def leftover_vfio(sysfs: Sysfs | None = None) -> list[str]:
    """NVIDIA functions (GPUs and their audio functions) now bound to vfio-pci: after an agent crash these are
    the devices no VM owns any more, which the janitor's sweep returns to the host (`return_to_host`). On a
    host that hands its GPUs to vfio-pci at boot (`vfio-pci.ids=`) every GPU is listed: there is no host
    driver to return them to, and `return_to_host` says so (`release_failed`)."""
    return [d.bdf for d in (sysfs or Sysfs()).nvidia_functions() if d.driver == VFIO_DRIVER]


def return_to_host(bdf: str, sysfs: Sysfs | None = None) -> str | None:
    """Take one function off vfio-pci when its `Binding` is lost (the janitor's sweep over `leftover_vfio`
    after a crash): clear driver_override, unbind from vfio-pci, let the kernel probe its default driver.
    Returns the driver that took it (None: none did); `release_failed` if it is still on vfio-pci."""
    sysfs = sysfs or Sysfs()
    bdf = pci_address(bdf)
    try:
        sysfs.write(f"/sys/bus/pci/devices/{bdf}/driver_override", "\n")
        if sysfs.device(bdf).driver == VFIO_DRIVER:
            sysfs.write(f"/sys/bus/pci/drivers/{VFIO_DRIVER}/unbind", bdf)
            sysfs.write("/sys/bus/pci/drivers_probe", bdf)
    except OSError as exc:
        raise VfioError("release_failed", f"{bdf}: sysfs write failed: {exc.strerror or exc}") from None
    now = sysfs.device(bdf).driver
    if now == VFIO_DRIVER:
        raise VfioError("release_failed", f"{bdf} is still on vfio-pci (vfio-pci.ids= on the kernel command line?)")
    return now


def _move(sysfs: Sysfs, bdf: str, override: str | None, target: str | None) -> None:
    """Set `bdf`'s driver_override to `override` (None clears it), and unless it is already on `target`,
    unbind it and let the kernel probe again; then confirm it is on `target` (None: no driver)."""
    base = f"/sys/bus/pci/devices/{bdf}"
    try:
        sysfs.write(f"{base}/driver_override", f"{override}\n" if override else "\n")
        current = sysfs.device(bdf).driver
        if current != target:
            if current is not None:
                # through the driver's own unbind file: the kernel refuses (ENODEV) if the device moved to
                # another driver since we looked, instead of unbinding whatever holds it now
                sysfs.write(f"/sys/bus/pci/drivers/{current}/unbind", bdf)
            sysfs.write("/sys/bus/pci/drivers_probe", bdf)
    except OSError as exc:
        raise VfioError("bind_failed", f"{bdf}: sysfs write failed: {exc.strerror or exc}") from None
    now = sysfs.device(bdf).driver
    if now != target:
        raise VfioError("bind_failed", f"{bdf} is on {now or 'no driver'}, not {target or 'no driver'}")
