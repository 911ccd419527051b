"""Network namespaces, veth pairs and packet captures for tests that need a second host on one machine.

Everything is named and numbered at random (interface names fit IFNAMSIZ, subnets are private and checked
against the routes already here) so that parallel workers never collide, and every helper is a context
manager that removes what it made, also when the test fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Capture",
    "Netns",
    "capture",
    "free_subnet",
    "missing_prerequisites",
    "netns",
    "unique_name",
    "veth_pair",
]


def missing_prerequisites(*binaries: str) -> str | None:
    """Why these tests cannot run here (a skip reason), or None: root, /dev/net/tun and the binaries."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, WireGuard interfaces)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (no TUN: wireguard-go cannot run)"
    missing = [b for b in ("ip", *binaries) if shutil.which(b) is None]
    if missing:
        return f"missing binaries: {', '.join(missing)}"
    return None


def unique_name(prefix: str) -> str:
    """`prefix` plus random hex, 15 characters at most (an interface name's limit)."""
    if len(prefix) > 7:
        raise ValueError("prefix too long for a 15-character interface name")
    return prefix + secrets.token_hex(4)


def _routes() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                         check=True).stdout
    nets = []
    for line in out.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "prohibit", "blackhole"):
            word = line.split()[1]
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.IPv4Network(word, strict=False))
    return [n for n in nets if n.prefixlen > 0]


def free_subnet(kind: str) -> ipaddress.IPv4Network:
    """A random private subnet no route here overlaps: `kind` "tunnel" gives 10.a.b.0/24, "underlay"
    172.(16..31).c.d/30."""
    taken = _routes()
    for _ in range(200):
        if kind == "tunnel":
            net = ipaddress.IPv4Network(f"10.{random.randint(64, 254)}.{random.randint(0, 255)}.0/24")
        elif kind == "underlay":
            net = ipaddress.IPv4Network(
                f"172.{random.randint(16, 31)}.{random.randint(0, 255)}.{4 * random.randint(0, 63)}/30")
        else:
            raise ValueError(kind)
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError(f"no free {kind} subnet found")


def _run(argv: list[str], check: bool = True, env: dict[str, str] | None = None,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class Netns:
    """A named network namespace; `argv` prefixes a command to run inside it.

    `ip netns exec` (the default) also gives the command a mount namespace of its own with a fresh /sys
    (the namespace's interfaces), which hides the cgroup hierarchy mounted under /sys/fs/cgroup. A process
    that needs it (a node-agent putting each VMM in a cgroup) runs with `net_only`: `nsenter --net` switches
    the network namespace only, the mounts stay the host's."""

    name: str

    def argv(self, argv: list[str], net_only: bool = False) -> list[str]:
        if net_only:
            return ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv]
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(argv), check=check, env=env, timeout=timeout)

    def popen(self, argv: list[str], net_only: bool = False, **kwargs: Any) -> subprocess.Popen[bytes]:
        """A process inside the namespace (`ip netns exec` and `nsenter` exec it: the pid is the command's own)."""
        return subprocess.Popen(self.argv(argv, net_only), **kwargs)


@contextlib.contextmanager
def netns(name: str) -> Iterator[Netns]:
    """A fresh namespace with loopback up; deleted on exit (which also destroys interfaces left in it)."""
    _run(["ip", "netns", "add", name])
    try:
        ns = Netns(name)
        ns.run(["ip", "link", "set", "dev", "lo", "up"])
        yield ns
    finally:
        _run(["ip", "netns", "del", name], check=False)


def _no_ipv6(argv_prefix: list[str], ifname: str) -> None:
    """No IPv6 on an underlay link: the capture then holds only what the test is about (and ARP)."""
    _run([*argv_prefix, "sysctl", "-q", "-w", f"net.ipv6.conf.{ifname}.disable_ipv6=1"], check=False)


@contextlib.contextmanager
def veth_pair(host_if: str, peer_if: str, ns: Netns, host_addr: str, peer_addr: str) -> Iterator[None]:
    """A veth pair: `host_if` in the root namespace with `host_addr`, `peer_if` in `ns` with `peer_addr`
    (both CIDRs), both up, IPv6 off. Deleting one end deletes both; done on exit."""
    _run(["ip", "link", "add", "dev", host_if, "type", "veth", "peer", "name", peer_if, "netns", ns.name])
    try:
        _no_ipv6([], host_if)
        _no_ipv6(ns.argv([]), peer_if)
        _run(["ip", "address", "add", host_addr, "dev", host_if])
        _run(["ip", "link", "set", "dev", host_if, "up"])
        ns.run(["ip", "address", "add", peer_addr, "dev", peer_if])
        ns.run(["ip", "link", "set", "dev", peer_if, "up"])
        yield
    finally:
        _run(["ip", "link", "del", "dev", host_if], check=False)


@dataclass
class Capture:
    """A running `tcpdump -w`; `stop()` ends it (SIGINT: it flushes the file) and returns its summary."""

    proc: subprocess.Popen[bytes]
    path: Path

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace")

    def read(self, bpf_filter: str = "") -> list[str]:
        """The captured packets as `tcpdump -nn -r` prints them (one line each), those matching the filter."""
        argv = ["tcpdump", "-nn", "-r", str(self.path)]
        if bpf_filter:
            argv.append(bpf_filter)
        return [line for line in _run(argv).stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def capture(ifname: str, path: Path, timeout: float = 10.0) -> Iterator[Capture]:
    """Capture everything on `ifname` (root namespace) into `path`; yields once tcpdump says it is
    listening, so nothing sent afterwards is missed. Stopped on exit if the test did not stop it."""
    proc = subprocess.Popen(["tcpdump", "-i", ifname, "-nn", "-U", "--immediate-mode", "-Z", "root",
                             "-w", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    cap = Capture(proc, path)
    try:
        assert proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            while b"listening on" not in seen:
                left = deadline - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    raise RuntimeError(f"tcpdump did not start listening: {seen.decode(errors='replace')}")
                if sel.select(left):
                    chunk = os.read(proc.stderr.fileno(), 4096)
                    if not chunk:
                        proc.wait(5)
                        continue
                    seen += chunk
        yield cap
    finally:
        cap.stop()
