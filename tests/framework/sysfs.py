"""A fixture sysfs tree for the VFIO code, and a tiny "kernel" that binds drivers the way Linux does.

    tree = SysfsTree(tmp_path)
    tree.add_device("0000:3b:00.0", group=12)                       # an NVIDIA 3D controller on nvidia
    tree.add_device("0000:3b:00.1", group=12, pci_class=0x040300,   # its HD audio function
                    driver="snd_hda_intel")
    binding = bind_vfio("0000:3b:00.0", tree.sysfs())

The layout is the host's: `sys/bus/pci/devices/BDF/{vendor,device,class,driver_override}`, a relative
`driver` symlink to `sys/bus/pci/drivers/NAME`, a relative `iommu_group` symlink to
`sys/kernel/iommu_groups/N` whose `devices/` lists the members. Files in it are plain files, so the writes
that make a real kernel act (`drivers/NAME/unbind`, `drivers_probe`) change nothing by themselves:
`tree.sysfs()` passes `tree.kernel` as the Sysfs write hook, which then does what the kernel would:

- `driver_override`: stored without the newline; an empty write clears it (reads back "(null)");
- `drivers/NAME/unbind` with a BDF: removes its `driver` link, or fails with ENODEV if NAME does not hold it;
- `drivers_probe` with a BDF: if no driver holds it, binds it to its driver_override if set (and that
  driver is loaded), else to its default driver (the one it had when added, or `default_driver=`).

`tree.vfio_refuses` holds BDFs vfio-pci's probe fails on (they stay driverless), for the `bind_failed` path.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from services.node_agent.isolation.vfio import Sysfs

__all__ = ["SysfsTree"]


class SysfsTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.defaults: dict[str, str | None] = {}
        self.vfio_refuses: set[str] = set()
        self.writes: list[tuple[str, str]] = []
        (root / "sys/bus/pci/devices").mkdir(parents=True, exist_ok=True)
        (root / "sys/kernel/iommu_groups").mkdir(parents=True, exist_ok=True)
        (root / "sys/bus/pci/drivers_probe").touch()
        for name in ("vfio-pci", "nvidia", "snd_hda_intel", "pcieport", "nouveau"):
            self.add_driver(name)

    def sysfs(self, kernel: bool = True) -> Sysfs:
        """A Sysfs on this tree; with `kernel`, writes act as on a real host."""
        return Sysfs(self.root, on_write=self.kernel if kernel else None)

    def add_driver(self, name: str) -> None:
        d = self.root / "sys/bus/pci/drivers" / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("bind", "unbind"):
            (d / f).touch()

    def remove_driver(self, name: str) -> None:
        """The module is not loaded (no /sys/bus/pci/drivers/NAME)."""
        for p in sorted((self.root / "sys/bus/pci/drivers" / name).iterdir()):
            p.unlink()
        (self.root / "sys/bus/pci/drivers" / name).rmdir()

    def add_device(self, bdf: str, *, vendor: int = 0x10DE, device: int = 0x2330, pci_class: int = 0x030200,
                   driver: str | None = "nvidia", group: int | None = None, default_driver: str | None = None,
                   override: str | None = None) -> Path:
        """A PCI function; `group=None` means no IOMMU group (IOMMU off). Its default driver (what a probe
        without override binds) is `default_driver`, else `driver` (unless that is vfio-pci)."""
        d = self.dev(bdf)
        d.mkdir(parents=True)
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "device").write_text(f"0x{device:04x}\n")
        (d / "class").write_text(f"0x{pci_class:06x}\n")
        (d / "driver_override").write_text(f"{override or '(null)'}\n")
        self.defaults[bdf] = default_driver or (driver if driver != "vfio-pci" else None)
        if driver:
            self._link_driver(bdf, driver)
        if group is not None:
            g = self.root / f"sys/kernel/iommu_groups/{group}"
            (g / "devices").mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(d, g / "devices"), g / "devices" / bdf)
            os.symlink(os.path.relpath(g, d), d / "iommu_group")
        return d

    def set_group_name(self, group: int, name: str) -> None:
        (self.root / f"sys/kernel/iommu_groups/{group}/name").write_text(f"{name}\n")

    def dev(self, bdf: str) -> Path:
        return self.root / "sys/bus/pci/devices" / bdf

    def driver_of(self, bdf: str) -> str | None:
        link = self.dev(bdf) / "driver"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None

    def override_of(self, bdf: str) -> str:
        return (self.dev(bdf) / "driver_override").read_text().strip()

    # -- the kernel ---------------------------------------------------------------------------------------

    def kernel(self, path: str, value: str) -> None:
        """What Linux does after a write to `path` (the Sysfs write hook)."""
        self.writes.append((path, value))
        parts = path.strip("/").split("/")
        if parts[:4] == ["sys", "bus", "pci", "devices"] and parts[-1] == "driver_override":
            stored = value.rstrip("\n")
            (self.root / path.lstrip("/")).write_text(f"{stored or '(null)'}\n")
        elif parts[:4] == ["sys", "bus", "pci", "drivers"] and parts[-1] == "unbind":
            bdf = value.strip()
            if self.driver_of(bdf) != parts[4]:
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), path)
            (self.dev(bdf) / "driver").unlink()
            (self.root / "sys/bus/pci/drivers" / parts[4] / bdf).unlink(missing_ok=True)
        elif path == "/sys/bus/pci/drivers_probe":
            bdf = value.strip()
            if not self.dev(bdf).is_dir():
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), path)
            if self.driver_of(bdf) is not None:
                return
            override = self.override_of(bdf)
            target = self.defaults.get(bdf) if override == "(null)" else override
            if target == "vfio-pci" and bdf in self.vfio_refuses:
                return
            if target and (self.root / "sys/bus/pci/drivers" / target).is_dir():
                self._link_driver(bdf, target)

    def _link_driver(self, bdf: str, driver: str) -> None:
        drv = self.root / "sys/bus/pci/drivers" / driver
        if not drv.is_dir():
            self.add_driver(driver)
        os.symlink(os.path.relpath(drv, self.dev(bdf)), self.dev(bdf) / "driver")
        os.symlink(os.path.relpath(self.dev(bdf), drv), drv / bdf)
