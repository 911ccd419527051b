"""Network isolation: each instance in its own network namespace, with its own tap device and an
nftables default-deny policy, so the guest reaches nothing (not the host, not the control plane, not
other instances). The VMM joins the namespace between fork and exec; the host's own ruleset is never
touched.

Egress allowlists (a route out of the namespace for listed destinations) are not built yet: a job that
asks for egress is refused by the node with `egress_unsupported` rather than run with a policy it did
not ask for.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
from dataclasses import dataclass

from shared.errors import ReasonedError

__all__ = ["InstanceNetwork", "NetworkError", "leftover_namespaces"]

CLONE_NEWNET = 0x40000000
PREFIX = "qvm-"
TAP = "tap0"

RULESET = f"""
table inet qvm {{
  chain input   {{ type filter hook input priority 0; policy drop; }}
  chain forward {{ type filter hook forward priority 0; policy drop; }}
  chain output  {{ type filter hook output priority 0; policy drop; }}
}}
table netdev qvm_tap {{
  chain ingress {{ type filter hook ingress device "{TAP}" priority 0; policy drop; counter; }}
}}
"""


class NetworkError(ReasonedError):
    """A failure with a stable reason code (see `ReasonedError`)."""


async def _run(*argv: str, stdin: bytes | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise NetworkError("network_setup_failed", f"{' '.join(argv[:4])}: {err.decode(errors='replace')[:300]}")
    return out.decode()


@dataclass(frozen=True)
class InstanceNetwork:
    netns: str
    tap: str = TAP

    @classmethod
    async def create(cls, instance_id: str) -> InstanceNetwork:
        for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
            if shutil.which(tool) is None:
                raise NetworkError("no_network_isolation", f"{tool} not found (install {package})")
        net = cls(PREFIX + instance_id[-40:])
        await _run("ip", "netns", "add", net.netns)
        try:
            await _run("ip", "-n", net.netns, "-batch", "-",
                       stdin=f"tuntap add dev {TAP} mode tap\nlink set {TAP} up\n".encode())
            # The tap must exist before a netdev chain can hook it.
            await _run("ip", "netns", "exec", net.netns, "nft", "-f", "-", stdin=RULESET.encode())
        except NetworkError:
            await net.remove()
            raise
        return net

    def enter(self) -> None:
        """Join the namespace (runs in the VMM's child before exec)."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    async def dropped_packets(self) -> int:
        """Packets from the guest that the tap's ingress policy dropped."""
        out = await _run("ip", "netns", "exec", self.netns, "nft", "list", "table", "netdev", "qvm_tap")
        for token, nxt in zip(out.split(), out.split()[1:], strict=False):
            if token == "packets":
                return int(nxt)
        return 0

    async def remove(self) -> bool:
        try:
            await _run("ip", "netns", "del", self.netns)
        except NetworkError:
            return False
        return True


def leftover_namespaces() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(PREFIX))
    except FileNotFoundError:
        return []
