"""A node reaches the control plane's NATS through WireGuard only.

The control plane is this machine's root network namespace; the node is a namespace of its own, joined to
it by a veth pair (the "underlay", the hoster's internet). Each side has a WireGuard interface
(`shared.wireguard`); NATS listens on the control plane's WireGuard address only. The real node-agent runs
in the node's namespace, dials NATS at that address, registers and heartbeats; the control plane reads its
events. A capture on the underlay shows only WireGuard's UDP: no TCP, no TLS, no NATS port. And outside
the tunnel the node cannot reach NATS at all.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.events import Domain, EventType
from shared.identity import Identity, Role
from shared.natsserver import EmbeddedNats
from shared.pki import Pki
from shared.provision import provision
from shared.wireguard import WgInterface, WgPeer, generate_keypair
from tests.framework.flow import events_of, eventually
from tests.framework.netns import Netns, capture, free_subnet, missing_prerequisites, netns, unique_name, veth_pair
from tests.framework.settings import AllSettings

_SKIP = missing_prerequisites("wireguard-go", "wg", "tcpdump")
pytestmark = [pytest.mark.nats, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

REPO = Path(__file__).resolve().parents[2]
NODE = "node-a"


@dataclass
class Tunnel:
    node_ns: Netns
    host_veth: str
    cp_underlay: str  # the control plane's veth address (no prefix)
    node_underlay: str
    cp_addr: str  # the control plane's WireGuard address (no prefix)
    node_addr: str
    wg_port: int
    cp: WgInterface
    node: WgInterface
    control_plane_peer: WgPeer  # for the node to add (the test does, once its capture runs)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tunnel() -> Iterator[Tunnel]:
    """Node namespace, veth underlay, WireGuard on both ends, the control plane knowing the node's key; all
    removed on exit. The node learns the control plane's peer in the test: with a keepalive set, WireGuard
    shakes hands at once, and the capture is to see that."""
    underlay, inner = free_subnet("underlay"), free_subnet("tunnel")
    cp_u, node_u = (str(underlay[1]), str(underlay[2]))
    cp_a, node_a = (str(inner[1]), str(inner[2]))
    port = _free_udp_port()
    cp_keys, node_keys = generate_keypair(), generate_keypair()
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(netns(unique_name("qwgns")))
        host_veth, node_veth = unique_name("qwh"), unique_name("qwp")
        stack.enter_context(veth_pair(host_veth, node_veth, ns, f"{cp_u}/30", f"{node_u}/30"))
        cp = WgInterface(unique_name("qwc"), cp_keys.private, listen_port=port, address=f"{cp_a}/24")
        stack.callback(cp.down)
        cp.up()
        node = WgInterface(unique_name("qwn"), node_keys.private, address=f"{node_a}/24", netns=ns.name)
        stack.callback(node.down)
        node.up()
        cp.add_peer(WgPeer(public_key=node_keys.public, allowed_ips=(f"{node_a}/32",)))
        cp_peer = WgPeer(public_key=cp_keys.public, allowed_ips=(f"{cp_a}/32",), endpoint=f"{cp_u}:{port}",
                         persistent_keepalive=25)
        yield Tunnel(ns, host_veth, cp_u, node_u, cp_a, node_a, port, cp, node, cp_peer)


def _agent(t: Tunnel, url: str, pki: Pki, state: Path) -> subprocess.Popen[bytes]:
    """The real node-agent (`python -m services.node_agent`) inside the node's namespace."""
    env = {**os.environ, "QVM_NATS_URL": url, "QVM_PKI_DIR": str(pki.root), "QVM_STATE_DIR": str(state),
           "QVM_NODE_ID": NODE, "QVM_MIN_TRUST": "unverified", "QVM_IMAGES_DIR": str(state / "images"),
           "QVM_INSTANCES_DIR": str(state / "instances"), "QVM_HEARTBEAT_INTERVAL_S": "0.3"}
    with open(state / "agent.log", "ab") as log:
        return t.node_ns.popen([sys.executable, "-m", "services.node_agent"], env=env, cwd=REPO,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tcp_connects(argv_prefix: list[str], host: str, port: int) -> str:
    """Try a TCP connect (from a namespace when `argv_prefix` says so): "connected" or the error's name."""
    code = ("import socket,sys\n"
            "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close(); print('connected')\n"
            "except OSError as e: print(type(e).__name__)")
    done = subprocess.run([*argv_prefix, sys.executable, "-c", code, host, str(port)], capture_output=True,
                          text=True, timeout=30, check=True)
    return done.stdout.strip()


def _wireguard_messages(pcap: Path) -> list[tuple[str, str, int, int, int]]:
    """(src, dst, sport, dport, first payload byte) of every IPv4/UDP packet of an Ethernet pcap; a WireGuard
    message starts with its type (1..4) and three zero bytes."""
    data = pcap.read_bytes()
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    out, off = [], 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[off:off + 16])
        frame, off = data[off + 16:off + 16 + incl], off + 16 + incl
        if frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        udp = frame[14 + ihl:]
        sport, dport = struct.unpack("!HH", udp[:4])
        payload = udp[8:]
        kind = payload[0] if len(payload) >= 4 and payload[1:4] == b"\0\0\0" else -1
        out.append((socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), sport, dport, kind))
    return out


async def test_node_agent_reaches_nats_only_through_wireguard(tunnel: Tunnel, tmp_path: Path) -> None:
    t = tunnel
    assert t.cp.implementation in ("kernel", "wireguard-go")
    assert t.node.implementation == t.cp.implementation
    pki = Pki(tmp_path / "pki")
    pki.init(nodes=[NODE], server_names=[t.cp_addr])
    server = EmbeddedNats(pki, tmp_path / "nats", host=t.cp_addr)
    url = server.start()
    nats_port = int(url.rsplit(":", 1)[1])
    assert url == f"tls://{t.cp_addr}:{nats_port}"
    agent: subprocess.Popen[bytes] | None = None
    admin: Bus | None = None
    try:
        settings = AllSettings(state_dir=tmp_path, nats_url=url, pki_dir=pki.root)
        admin = await Bus.connect(url, pki, Identity(Role.ADMIN))
        await provision(admin.js, settings)

        with capture(t.host_veth, tmp_path / "underlay.pcap") as cap:
            t.node.add_peer(t.control_plane_peer)
            agent = _agent(t, url, pki, tmp_path)

            async def registered_and_beating() -> bool:
                assert agent is not None and admin is not None
                if agent.poll() is not None:
                    raise AssertionError(f"node-agent exited ({agent.returncode}): "
                                         f"{(tmp_path / 'agent.log').read_text()[-3000:]}")
                kinds = [e.spec.type for e in await events_of(admin, Domain.NODES) if e.node_id == NODE]
                return EventType.NODE_REGISTERED in kinds and kinds.count(EventType.NODE_HEARTBEAT) >= 3
            await eventually(registered_and_beating, timeout=60, what="node-a's registration and heartbeats")
            _stop(agent)
            summary = cap.stop()

        # The node's handshake happened and data moved through the tunnel (both ends agree).
        (peer,) = t.cp.peers()
        assert peer.latest_handshake > 0 and peer.rx_bytes > 0 and peer.tx_bytes > 0
        assert peer.endpoint is not None and peer.endpoint.startswith(f"{t.node_underlay}:")  # learnt from it
        (cp_peer,) = t.node.peers()
        assert cp_peer.model_dump(include={"public_key", "allowed_ips", "endpoint", "persistent_keepalive"}) \
            == t.control_plane_peer.model_dump()
        assert cp_peer.latest_handshake > 0 and cp_peer.rx_bytes > 0

        # The underlay carried WireGuard's UDP only: every IPv4 packet is UDP to or from the WireGuard port
        # between the two underlay addresses; nothing is TCP (no TLS, no NATS port). ARP is link noise.
        ipv4 = cap.read("ip")
        assert len(ipv4) >= 10, summary
        assert cap.read("tcp") == []
        assert cap.read(f"ip and not (udp port {t.wg_port})") == []
        assert cap.read(f"port {nats_port}") == []
        assert cap.read("not arp and not ip") == []  # IPv6 is off on the underlay
        pattern = re.compile(rf"IP ({re.escape(t.cp_underlay)}|{re.escape(t.node_underlay)})\.(\d+) > "
                             rf"({re.escape(t.cp_underlay)}|{re.escape(t.node_underlay)})\.(\d+): UDP, length \d+$")
        for line in ipv4:
            m = pattern.search(line)
            assert m is not None, line
            assert m[1] != m[3] and t.wg_port in (int(m[2]), int(m[4])), line
        # ...and each datagram is a WireGuard message: handshake initiation (1), response (2), data (4).
        messages = _wireguard_messages(tmp_path / "underlay.pcap")
        assert len(messages) == len(ipv4)
        kinds = {m[4] for m in messages}
        assert {1, 2, 4} <= kinds and kinds <= {1, 2, 3, 4}, kinds

        # Outside the tunnel NATS is unreachable: it listens on the WireGuard address only, so the control
        # plane's underlay address (what the node can reach without WireGuard) refuses the connection, and
        # so does loopback on the control plane itself; through the tunnel it answers.
        node = t.node_ns.argv([])
        assert _tcp_connects(node, t.cp_underlay, nats_port) == "ConnectionRefusedError"
        assert _tcp_connects([], "127.0.0.1", nats_port) == "ConnectionRefusedError"
        assert _tcp_connects(node, t.cp_addr, nats_port) == "connected"
    finally:
        if agent is not None:
            _stop(agent)
        if admin is not None:
            await admin.close()
        server.stop()
