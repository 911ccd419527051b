"""Instances no live job of this agent owns: left by an agent that crashed (found when the next one starts)
or missed by their own teardown (found by the periodic sweep). Each is found on the host and becomes the
same `Remains` a live instance hands over, so it goes through the same teardown sequence.

    <instances>/<instance id>/instance.json  whose it was (`write_owner` at provisioning, ids only)
                             /vmm.pid        its VMM, if still running (verified through /proc: `procfs`)
                             /volume.luks    its data volume
    /run/netns/qvm-<instance id>             its network namespace
    <cgroup root>/qvm/<instance id>          its cgroup (v1: under cpu/ and memory/)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from services.node_agent.isolation.cgroups import VmCgroup
from services.node_agent.isolation.network import InstanceNetwork
from services.node_agent.teardown.procfs import instance_vmm, open_guest_ram, wait_reaped
from services.node_agent.teardown.sequence import Remains, Stopped
from services.node_agent.volume import VOLUME_FILE

__all__ = ["OWNER_FILE", "Owner", "kill_leftover_vmm", "leftover_dirs", "leftover_remains", "read_owner",
           "write_owner"]

OWNER_FILE = "instance.json"


@dataclass(frozen=True)
class Owner:
    """Whose a leftover instance was: enough to report it destroyed under the id a live teardown would use."""

    job_id: str
    instance_id: str
    cause: str  # the assignment event's id (the report's event id derives from it)


def write_owner(workdir: Path, job_id: str, instance_id: str, node_id: str, cause: str) -> None:
    """Create the instance's work directory with its owner record (ids only, no secrets)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / OWNER_FILE).write_text(json.dumps(
        {"job_id": job_id, "instance_id": instance_id, "node_id": node_id, "cause": cause}))


def read_owner(workdir: Path) -> Owner | None:
    try:
        meta = json.loads((workdir / OWNER_FILE).read_text())
        return Owner(str(meta["job_id"]), str(meta["instance_id"]), str(meta["cause"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def leftover_dirs(work: Path, live: set[str]) -> list[Path]:
    """The instance directories under `work` that no live instance (`live`: instance ids) owns."""
    if not work.is_dir():
        return []
    return sorted(p for p in work.iterdir() if p.is_dir() and p.name not in live)


def leftover_remains(workdir: Path) -> Remains:
    """Everything the instance of `workdir` still holds on this host."""
    volume = workdir / VOLUME_FILE

    async def stop() -> Stopped:
        return await asyncio.to_thread(kill_leftover_vmm, workdir)

    return Remains(workdir, stop=stop, net=InstanceNetwork.leftover(workdir.name),
                   volume=volume if volume.exists() else None, cgroup=VmCgroup.leftover(workdir.name))


def kill_leftover_vmm(workdir: Path) -> Stopped:
    """Kill the VMM of `workdir` (only the one its command line names) and hand over its guest RAM: the memfd
    the dead agent created lives on in the VMM, so it is opened through /proc before the kill, and the
    kernel has reaped the VMM before it is returned (a live writer would spoil the scrub's verification).
    Blocking."""
    pid = instance_vmm(workdir)
    if pid is None:
        return Stopped()
    ram_fd = open_guest_ram(pid, workdir.name)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if ram_fd is not None:
        wait_reaped(pid)
    return Stopped(removed=(f"vmm:{pid}",), ram_fd=ram_fd)
