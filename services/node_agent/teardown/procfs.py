"""/proc forensics for crash reclaim: which VMM a dead agent left running for an instance directory, and
where that VMM keeps the guest RAM the dead agent created.

A pid file alone proves nothing (pids are reused): the process counts as the instance's VMM only while
its command line names the instance's directory. The guest RAM is a memfd with no path that lives on only
inside that VMM; it is found among the VMM's descriptors by the name the agent gave it
(`qvm-ram-<instance>`, `Instance.launch`) and opened anew through /proc/<pid>/fd, so the agent holds the
pages after the kill and can scrub them. All of it is blocking: callers run it off the event loop.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["instance_vmm", "open_guest_ram", "proc_state", "wait_reaped"]


def instance_vmm(workdir: Path) -> int | None:
    """The pid in `workdir`'s pid file, if that process's command line names `workdir`."""
    try:
        pid = int((workdir / "vmm.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if str(workdir).encode() not in cmdline:
        return None  # the pid was reused by an unrelated process
    return pid


def open_guest_ram(pid: int, instance_id: str) -> int | None:
    """The VMM's descriptor of the guest RAM memfd the agent named `qvm-ram-<instance>`, opened anew."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for link in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(link).startswith(f"/memfd:qvm-ram-{instance_id}"):
                    return os.open(link, os.O_RDWR)
    except OSError:
        return None
    return None


def proc_state(pid: int) -> str:
    """The process's state letter from /proc/<pid>/stat ("X" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def wait_reaped(pid: int, tries: int = 100, interval_s: float = 0.02) -> None:
    """Until a killed process is gone or a zombie (it no longer writes anything), or `tries` run out."""
    for _ in range(tries):
        if not Path(f"/proc/{pid}").exists() or "Z" in proc_state(pid):
            return
        time.sleep(interval_s)
