"""The one interface every VMM driver implements, and what a launch needs.

A driver gets a `LaunchSpec` (verified image files already opened by the agent, the instance's scratch
disk and optional encrypted data volume, limits, confinement) and returns a `VmProcess` that holds the
agent's end of the guest channel (however that VMM provides it). The agent talks to the guest only
through the channel; the driver only starts, watches and stops the VMM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shared.errors import ReasonedError
from shared.models import VolumeErasure

__all__ = ["LaunchSpec", "VmProcess", "Vmm", "VmmError"]


class VmmError(ReasonedError):
    """The VMM could not be started or controlled; `reason` is a stable code."""


@dataclass(frozen=True)
class LaunchSpec:
    instance_id: str
    workdir: Path
    kernel_fd: int  # the bzImage, or the ELF vmlinux for VMMs with `elf_kernel`
    initrd_fd: int
    rootfs_fd: int
    scratch: Path
    cmdline: str
    vcpus: int
    memory_mib: int
    memory_fd: int | None = None  # agent-owned memfd for guest RAM (scrubbed after exit)
    extra_fds: tuple[int, ...] = field(default=())
    confine: Callable[[], None] | None = None  # runs in the VMM's child before exec (cgroup, netns, seccomp)
    tap: str | None = None  # the instance's tap, inside the namespace the VMM joins (None: no NIC)
    volume: Path | None = None  # the data volume (sparse file; the guest makes it LUKS2): the third disk, vdc
    # PCI devices passed through (BDFs or /sys/bus/pci/devices/... paths), already on vfio-pci with their whole
    # IOMMU group (isolation/vfio.py `bind_vfio`); empty: no passthrough, and no PCI bus where a VMM can omit it
    vfio_devices: tuple[str, ...] = ()


@dataclass
class VmProcess:
    """A running VMM process."""

    pid: int
    proc: asyncio.subprocess.Process
    vmm: str
    accel: str
    started_ns: int
    console: Path
    channel: socket.socket | None = None  # the agent's end of the guest channel (the driver makes it)
    control: socket.socket | None = None  # the agent's end of the VMM's control channel (QMP)
    api_socket: Path | None = None  # the VMM's REST API socket (Firecracker, Cloud Hypervisor)
    jail: Path | None = None  # the jailer's chroot directory, removed on stop
    volume: Path | None = None  # the file the VMM writes the data volume to (a copy inside a jail)
    volume_erasure: VolumeErasure | None = None  # set by a driver that erased a jail's copy on stop
    accel_probe_ms: float = 0.0  # how long this launch waited for the KVM-or-TCG answer (0: already known)

    async def wait(self) -> int:
        return await self.proc.wait()

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


class Vmm(Protocol):
    name: str
    shared_channel: bool  # the guest channel is a serial port that also carries boot messages
    seccomp_allow: frozenset[str] | None  # the agent's filter for this VMM (None: the VMM installs its own)
    elf_kernel: bool  # boots the ELF vmlinux (Firecracker, Cloud Hypervisor), not the bzImage
    ram_from_agent: bool  # backs guest RAM with the agent's memfd (scrubbed by the agent after exit)

    async def launch(self, spec: LaunchSpec) -> VmProcess: ...

    async def stop(self, vm: VmProcess, grace_s: float = 5.0) -> None:
        """Ask the VMM to end the VM, then kill it after `grace_s`."""
        ...
