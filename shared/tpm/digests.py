"""What a node-agent measures, defined once for both sides: the agent extends these digests into its TPM
(services/node_agent/attest) and the policy generator predicts them (`shared.tpm.policy_gen`), so an
approved deployment and its policy cannot drift apart silently.

    code_digest             the agent's Python sources (services/node_agent and shared/)
    file_digest             a file: an image manifest, a VMM binary
    security_policy_digest  an instance's security policy (seccomp, cgroups, network)
    QEMU                    the QEMU binary the microvm driver starts, and the one a local policy approves
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from shared.tpm.measurements import digest_of

__all__ = ["QEMU", "code_digest", "file_digest", "instance_security_policy", "security_policy_digest"]

QEMU = "qemu-system-x86_64"
_ROOT = Path(__file__).resolve().parents[2]  # the directory holding `services/` and `shared/`


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
