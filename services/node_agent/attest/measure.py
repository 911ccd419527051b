"""What the node-agent measures: its own code and settings, and each instance's launch inputs.

The policy generator (`qvm attest policy`) computes the same digests from the same functions, so an
approved deployment and its policy cannot drift apart silently.
"""

from __future__ import annotations

import hashlib
import shutil
from functools import cache
from pathlib import Path

from shared.config import Settings
from shared.tpm.measurements import digest_of

__all__ = ["agent_config", "code_digest", "file_digest", "instance_security_policy", "vmm_binary"]

_ROOT = Path(__file__).resolve().parents[3]  # the directory holding `services/` and `shared/`


@cache
def code_digest(root: Path = _ROOT) -> str:
    """SHA-256 over the agent's Python sources (services/node_agent and the shared library): path + digest
    of every file, in sorted order, so the result depends only on what would run."""
    h = hashlib.sha256()
    for package in ("services/node_agent", "shared"):
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def agent_config(settings: Settings) -> dict[str, str]:
    """The settings that change what a guest is exposed to (paths and tuning are left out)."""
    return {"vmm": settings.vmm, "vm_seccomp": str(settings.vm_seccomp).lower(),
            "vm_cgroups": str(settings.vm_cgroups).lower(), "vm_network": settings.vm_network,
            "egress": "enabled" if settings.egress_netns else "disabled"}


def instance_security_policy(seccomp: bool, cgroups: bool, network: bool) -> dict[str, str]:
    return {"seccomp": str(seccomp).lower(), "cgroups": str(cgroups).lower(),
            "network": "netns-default-deny" if network else "none"}


def security_policy_digest(seccomp: bool, cgroups: bool, network: bool) -> str:
    return digest_of(instance_security_policy(seccomp, cgroups, network))


def file_digest(path: Path) -> str:
    """SHA-256 of a file, remembered per file version: a binary replaced in place (a QEMU upgrade) is
    hashed again, so a measurement never reports the digest of what used to be there."""
    st = path.stat()
    return _digest_of_version(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@cache
def _digest_of_version(path: Path, dev: int, ino: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def vmm_binary(vmm: object) -> Path | None:
    """The executable a VMM driver starts (QEMU, Firecracker, Cloud Hypervisor), resolved on PATH."""
    name = getattr(vmm, "qemu", None) or getattr(vmm, "binary", None)
    found = shutil.which(name) if isinstance(name, str) else None
    return Path(found).resolve() if found else None
