"""A cgroup per VMM with the job's CPU and memory limits: cgroup v2 where the host runs the unified
hierarchy, the v1 `cpu` and `memory` controllers otherwise. All paths hang off one root so tests can
point it at a fixture tree; hosts use /sys/fs/cgroup.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ReasonedError

__all__ = ["CgroupError", "VmCgroup"]

PERIOD_US = 100_000
QEMU_OVERHEAD_MIB = 256  # the VMM's own memory on top of guest RAM


class CgroupError(ReasonedError):
    def __init__(self, detail: str) -> None:
        super().__init__("no_cgroups", detail)


@dataclass(frozen=True)
class VmCgroup:
    """The cgroup directories (one for v2; cpu and memory for v1) of one instance."""

    dirs: tuple[Path, ...]
    version: int

    @classmethod
    def create(cls, name: str, vcpus: int, guest_mib: int, root: Path = Path("/sys/fs/cgroup")) -> VmCgroup:
        memory = (guest_mib + QEMU_OVERHEAD_MIB) << 20
        quota = vcpus * PERIOD_US
        try:
            if (root / "cgroup.controllers").exists():  # v2
                parent = root / "qvm"
                parent.mkdir(exist_ok=True)
                with contextlib.suppress(OSError):
                    (root / "cgroup.subtree_control").write_text("+cpu +memory")
                with contextlib.suppress(OSError):
                    (parent / "cgroup.subtree_control").write_text("+cpu +memory")
                d = parent / name
                d.mkdir(exist_ok=True)
                (d / "cpu.max").write_text(f"{quota} {PERIOD_US}")
                (d / "memory.max").write_text(str(memory))
                return cls((d,), 2)
            cpu, mem = root / "cpu" / "qvm" / name, root / "memory" / "qvm" / name
            if not (root / "cpu").is_dir() or not (root / "memory").is_dir():
                raise CgroupError(f"neither cgroup v2 nor v1 cpu+memory controllers under {root}")
            for d in (cpu, mem):
                d.mkdir(parents=True, exist_ok=True)
            (cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(quota))
            (mem / "memory.limit_in_bytes").write_text(str(memory))
            return cls((cpu, mem), 1)
        except OSError as exc:
            raise CgroupError(f"{exc.filename}: {exc.strerror}") from None

    @classmethod
    def leftover(cls, name: str, root: Path = Path("/sys/fs/cgroup")) -> VmCgroup | None:
        """The instance's cgroup if it is still on the host (a teardown after an agent crash)."""
        dirs = tuple(d for d in leftover_cgroups(root) if d.name == name)
        if not dirs:
            return None
        return cls(dirs, 2 if dirs[0].parent == root / "qvm" else 1)

    def join_self(self) -> None:
        """Move the calling process in (runs in the VMM's child before exec)."""
        pid = str(os.getpid())
        for d in self.dirs:
            (d / "cgroup.procs").write_text(pid)

    def limits(self) -> dict[str, str]:
        out = {}
        for d in self.dirs:
            for f in ("cpu.max", "memory.max", "cpu.cfs_quota_us", "memory.limit_in_bytes"):
                if (d / f).exists():
                    out[f] = (d / f).read_text().strip()
        return out

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                found |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
        return sorted(found)

    def remove(self) -> bool:
        """rmdir the cgroup (the kernel refuses while a process is still in it)."""
        removed = True
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                removed = False
        return removed


def leftover_cgroups(root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """Every per-instance cgroup directory (for reclaiming after a crash)."""
    return [d for parent in (root / "qvm", root / "cpu" / "qvm", root / "memory" / "qvm") if parent.is_dir()
            for d in parent.iterdir() if d.is_dir()]
