"""Network isolation: each instance in its own network namespace, with its own tap device and an
nftables default-deny policy, so the guest reaches nothing (not the host, not the control plane, not
other instances). The VMM joins the namespace between fork and exec; the host's own ruleset is never
touched.

Egress allowlists: a job may list `address[/prefix]:port` TCP destinations. The instance namespace is then
joined by a veth pair to the node's uplink namespace (`QVM_EGRESS_NETNS`, prepared once by the operator
with the host's real uplink and NAT); the instance namespace forwards only new TCP connections from the
guest to the listed destinations (plus their replies), masquerading them, and drops everything else.
Nodes without an uplink namespace refuse jobs that ask for egress (`egress_unsupported`).
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import hashlib
import ipaddress
import itertools
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ReasonedError

__all__ = ["EgressRule", "InstanceNetwork", "NetworkError", "guest_net_arg", "leftover_namespaces", "parse_egress"]

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


GUEST_IP, GATEWAY = "172.31.255.2", "172.31.255.1"  # the same /30 in every namespace: they never meet
LINK_POOL = ipaddress.ip_network("100.64.0.0/16")  # RFC 6598 shared space: one /30 per instance veth


@dataclass(frozen=True)
class EgressRule:
    net: ipaddress.IPv4Network
    port: int

    def nft(self, oif: str) -> str:
        return f'iifname "{TAP}" oifname "{oif}" ip daddr {self.net} tcp dport {self.port} ct state new accept'


def guest_net_arg() -> str:
    """Kernel argument the guest init turns into eth0's address and default route."""
    return f"qvm.net={GUEST_IP}/30,{GATEWAY}"


class NetworkError(ReasonedError):
    """A failure with a stable reason code (see `ReasonedError`)."""


def parse_egress(entries: Iterable[str]) -> list[EgressRule]:
    """`address[/prefix]:port` entries (IPv4, TCP). Anything else is refused, never widened."""
    rules = []
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        try:
            net = ipaddress.ip_network(host, strict=False)
            number = int(port)
        except ValueError:
            raise NetworkError("egress_invalid", f"{entry[:80]!r} is not address[/prefix]:port") from None
        if not sep or not isinstance(net, ipaddress.IPv4Network) or not 1 <= number <= 65535:
            raise NetworkError("egress_invalid", f"{entry[:80]!r} is not an IPv4 address[/prefix]:port")
        rules.append(EgressRule(net, number))
    return rules


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
    async def create(cls, instance_id: str, egress: Iterable[EgressRule] = (), uplink: str | None = None
                     ) -> InstanceNetwork:
        for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
            if shutil.which(tool) is None:
                raise NetworkError("no_network_isolation", f"{tool} not found (install {package})")
        rules = list(egress)
        if rules and not uplink:
            raise NetworkError("egress_unsupported", "this node has no uplink namespace for egress")
        net = cls(_netns_name(instance_id))
        await _run("ip", "netns", "add", net.netns)
        try:
            await _run("ip", "-n", net.netns, "-batch", "-",
                       stdin=f"tuntap add dev {TAP} mode tap\nlink set {TAP} up\n".encode())
            if rules:
                assert uplink is not None
                await net._connect_uplink(instance_id, uplink, rules)
            else:
                # The tap must exist before a netdev chain can hook it.
                await _run("ip", "netns", "exec", net.netns, "nft", "-f", "-", stdin=RULESET.encode())
        except NetworkError:
            await net.remove()
            raise
        return net

    async def _connect_uplink(self, instance_id: str, uplink: str, rules: list[EgressRule]) -> None:
        h = hashlib.sha256(instance_id.encode()).hexdigest()[:10]
        inner, outer = f"qv{h}", f"qu{h}"
        lock_dir = Path("/run/qvm") if os.access("/run", os.W_OK) else Path("/tmp/qvm-run")
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / "egress.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one /30 per instance: allocate under a lock
            used = await _run("ip", "-n", uplink, "-o", "-4", "addr", "show")
            start = int(h, 16) % (LINK_POOL.num_addresses // 4)
            subnets: list[ipaddress.IPv4Network] = list(LINK_POOL.subnets(new_prefix=30))  # type: ignore[arg-type]
            link = next(subnets[(start + i) % len(subnets)] for i in range(len(subnets))
                        if f" {subnets[(start + i) % len(subnets)][1]}/30" not in used)
            up_ip, in_ip = link[1], link[2]
            await _run("ip", "-n", self.netns, "link", "add", inner, "type", "veth", "peer", "name", outer,
                       "netns", uplink)
            await _run("ip", "-n", uplink, "-batch", "-",
                       stdin=f"addr add {up_ip}/30 dev {outer}\nlink set {outer} up\n".encode())
        await _run("ip", "-n", self.netns, "-batch", "-", stdin=(
            f"addr add {in_ip}/30 dev {inner}\nlink set {inner} up\naddr add {GATEWAY}/30 dev {TAP}\n"
            f"route add default via {up_ip}\n").encode())
        await _run("ip", "netns", "exec", self.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        allow = "\n    ".join(r.nft(inner) for r in rules)
        ruleset = f"""
table inet qvm {{
  chain input   {{ type filter hook input priority 0; policy drop; }}
  chain output  {{ type filter hook output priority 0; policy drop; }}
  chain forward {{ type filter hook forward priority 0; policy drop;
    ct state established,related accept
    {allow}
    counter
  }}
  chain postrouting {{ type nat hook postrouting priority 100; policy accept; oifname "{inner}" masquerade; }}
}}
"""
        await _run("ip", "netns", "exec", self.netns, "nft", "-f", "-", stdin=ruleset.encode())

    def joiner(self) -> tuple[Callable[[], None], int]:
        """(join, fd): `join()` enters the namespace in the VMM's child before exec; libc and the namespace
        descriptor are prepared here, in the agent, so the child only makes one syscall. Close `fd` after
        the launch."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY | os.O_CLOEXEC)

        def join() -> None:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")

        return join, fd

    async def dropped_packets(self) -> int:
        """Packets from the guest that reached a drop policy (tap ingress, or the end of forward)."""
        out = await _run("ip", "netns", "exec", self.netns, "nft", "list", "ruleset")
        words = out.split()
        return sum(int(n) for w, n in itertools.pairwise(words) if w == "packets")

    @classmethod
    def leftover(cls, instance_id: str) -> InstanceNetwork | None:
        """The instance's namespace if it is still on the host (a teardown after an agent crash)."""
        net = cls(_netns_name(instance_id))
        return net if net.netns in leftover_namespaces() else None

    async def remove(self) -> bool:
        try:
            await _run("ip", "netns", "del", self.netns)
        except NetworkError:
            return False
        return True


def _netns_name(instance_id: str) -> str:
    return PREFIX + instance_id[-40:]


def leftover_namespaces() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(PREFIX))
    except FileNotFoundError:
        return []
