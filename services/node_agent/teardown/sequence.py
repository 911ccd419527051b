"""The teardown sequence: what one instance holds on this host, released in one fixed order, with evidence.

Why one sequence: a job's instance ends in many ways (its workload exits or fails, the client cancels it,
the janitor requests its teardown, its agent crashed and the restarted agent finds what it left, the
periodic sweep finds a directory no live job owns), and every one of them must wipe the same things in
the same order and report them the same way in `instance.destroyed`. The ways differ only in how the
remains are found: a live `Instance` hands over its own handles (`Instance.tear_down`), a leftover
directory is searched through /proc, /run/netns and the cgroup tree (`teardown.leftover`).

    1. stop the VMM          nothing writes guest RAM or the volume any more    "vmm:<pid>"
    2. scrub the guest RAM   its memfd overwritten and read back, then closed   "guest-ram"          `ram`
    3. network namespace     deleted                                            "netns:<name>"
    4. erase the volume      LUKS2 keyslots, header area overwritten, read back "volume"             `volume`
    5. cgroup                removed once the kernel lets go of the reaped VMM  "cgroup:v<1|2>"
    6. work directory        removed                                            "workdir:<name>"
    7. give back the GPUs    to their host driver, then each one's VRAM scrubbed "gpus:<n> released"   `gpus`

A handle is dropped from `Remains` once it is released; what could not be released stays there, so a
second pass over the same remains retries only that.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.node_agent.isolation.cgroups import VmCgroup
from services.node_agent.isolation.gpus import GpuPassthrough
from services.node_agent.isolation.network import InstanceNetwork
from services.node_agent.isolation.vfio import Binding
from services.node_agent.teardown.ram import scrub_memfd
from services.node_agent.volume import erase_volume
from shared.events import InstanceDestroyed
from shared.models import MemoryScrub, VolumeErasure, VramScrub

__all__ = ["Evidence", "GpuRelease", "Remains", "Stopped", "tear_down"]

CGROUP_TRIES = 50  # the kernel lets go of an exited VMM's cgroup a moment after reaping it
CGROUP_WAIT_S = 0.02


@dataclass(frozen=True)
class Stopped:
    """What stopping the VMM leaves to the steps after it."""

    removed: tuple[str, ...] = ()  # "vmm:<pid>" when a running VMM was stopped
    ram_fd: int | None = None  # the guest RAM's memfd: the sequence scrubs it, then closes it
    volume_erasure: VolumeErasure | None = None  # a driver that erased its jail's copy of the volume on stop


@dataclass(frozen=True)
class GpuRelease:
    """The job's claimed GPUs and their vfio-pci bindings (none when the attach failed or never ran: the
    claimed GPUs are scrubbed all the same)."""

    passthrough: GpuPassthrough
    bindings: Sequence[Binding]
    claimed: Sequence[str]


@dataclass
class Remains:
    """What one instance holds on this host; `None` where it holds nothing (or no longer)."""

    workdir: Path
    stop: Callable[[], Awaitable[Stopped]] | None = None  # stops its VMM (live: the driver; leftover: SIGKILL)
    net: InstanceNetwork | None = None
    volume: Path | None = None
    cgroup: VmCgroup | None = None
    gpus: GpuRelease | None = None


@dataclass
class Evidence:
    """What the teardown removed, and the proof of each wipe: the contents of `instance.destroyed`."""

    removed: list[str] = field(default_factory=list)
    ram: MemoryScrub | None = None
    volume: VolumeErasure | None = None
    gpus: tuple[VramScrub, ...] = ()

    def report(self, instance_id: str, *also: str) -> InstanceDestroyed:
        """The `instance.destroyed` payload; `also` ends the removed list (a reclaim's reason)."""
        return InstanceDestroyed(instance_id=instance_id, removed=(*self.removed, *also), volume=self.volume,
                                 ram=self.ram, gpus=self.gpus)


async def tear_down(remains: Remains) -> Evidence:
    """Release everything in `remains`, in the order of this module's table, and return the evidence."""
    ev = Evidence()
    stopped = await remains.stop() if remains.stop is not None else Stopped()
    ev.removed += stopped.removed
    if stopped.ram_fd is not None:  # the VMM has stopped: wipe the guest's RAM, prove it, then let it go
        try:
            ev.ram = await asyncio.to_thread(scrub_memfd, stopped.ram_fd)
        finally:
            os.close(stopped.ram_fd)
        ev.removed.append("guest-ram")
    if remains.net is not None and await remains.net.remove():
        ev.removed.append(f"netns:{remains.net.netns}")
        remains.net = None
    if remains.volume is not None:  # the VMM has stopped: nothing writes the file any more
        erasure = await asyncio.to_thread(erase_volume, remains.volume)
        if stopped.volume_erasure is not None:
            erasure = stopped.volume_erasure  # the guest wrote the jail's copy: that one's evidence counts
        ev.volume = erasure
        if erasure.removed:
            ev.removed.append("volume")
        remains.volume = None
    if remains.cgroup is not None:
        for _ in range(CGROUP_TRIES):
            if remains.cgroup.remove():
                ev.removed.append(f"cgroup:v{remains.cgroup.version}")
                remains.cgroup = None
                break
            await asyncio.sleep(CGROUP_WAIT_S)
    if remains.workdir.exists():
        await asyncio.to_thread(shutil.rmtree, remains.workdir, True)
        ev.removed.append(f"workdir:{remains.workdir.name}")
    if remains.gpus is not None:  # the VM is gone: GPUs back to the host driver, then scrubbed
        release = remains.gpus
        ev.gpus = await asyncio.to_thread(release.passthrough.detach, release.bindings, release.claimed)
        ev.removed.append(f"gpus:{len(release.bindings)} released")
        remains.gpus = None
    return ev
