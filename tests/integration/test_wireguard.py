"""A node reaches the control plane's NATS through WireGuard only.

The control plane is this machine's root network namespace; the node is a namespace of its own, joined to
it by a veth pair (the "underlay", the hoster's internet). Each side has a WireGuard interface
(`shared.wireguard`); NATS listens on the control plane's WireGuard address only. The real node-agent runs
in the node's namespace, dials NATS at that address, registers and heartbeats; the control plane reads its
events. A capture on the underlay shows only WireGuard's UDP: no TCP, no TLS, no NATS port. And outside
the tunnel the node cannot reach NATS at all.

The second test does it as a hoster would: the node joins through the real join protocol (its WireGuard key
offered, an address granted by the control plane's hub), `qvm node tunnel up` brings its end up from what the
join saved, and the node-agent runs a job in a micro VM with all of its bus traffic inside the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.janitor.service import Janitor
from services.scheduler.service import Scheduler
from shared.buckets import JOIN_INVITES
from shared.bus import Bus
from shared.events import Domain, EventType, JobSubmitted
from shared.identity import Identity, Role
from shared.join import client
from shared.join.controlplane import start_join_service
from shared.join.invites import create_invite
from shared.join.tunnel import WireGuardHub
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from shared.natsserver import EmbeddedNats
from shared.pki import Pki
from shared.provision import provision
from shared.tpm.swtpm import Swtpm
from shared.wireguard import WgInterface, WgPeer, generate_keypair
from tests.framework.flow import events_of, eventually, job_book, running, stop_process
from tests.framework.images import IMAGE, build_test_image
from tests.framework.netns import (
    Capture,
    Netns,
    capture,
    free_subnet,
    missing_prerequisites,
    netns,
    unique_name,
    veth_pair,
)
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


def _assert_wireguard_only(cap: Capture, summary: str, cp_underlay: str, node_underlay: str, wg_port: int,
                           nats_port: int) -> None:
    """The underlay carried WireGuard's UDP only: every IPv4 packet is UDP to or from the WireGuard port
    between the two underlay addresses; nothing is TCP (no TLS, no NATS port). ARP is link noise."""
    ipv4 = cap.read("ip")
    assert len(ipv4) >= 10, summary
    assert cap.read("tcp") == []
    assert cap.read(f"ip and not (udp port {wg_port})") == []
    assert cap.read(f"port {nats_port}") == []
    assert cap.read("not arp and not ip") == []  # IPv6 is off on the underlay
    pattern = re.compile(rf"IP ({re.escape(cp_underlay)}|{re.escape(node_underlay)})\.(\d+) > "
                         rf"({re.escape(cp_underlay)}|{re.escape(node_underlay)})\.(\d+): UDP, length \d+$")
    for line in ipv4:
        m = pattern.search(line)
        assert m is not None, line
        assert m[1] != m[3] and wg_port in (int(m[2]), int(m[4])), line
    # ...and each datagram is a WireGuard message: handshake initiation (1), response (2), data (4).
    messages = _wireguard_messages(cap.path)
    assert len(messages) == len(ipv4)
    kinds = {m[4] for m in messages}
    assert {1, 2, 4} <= kinds and kinds <= {1, 2, 3, 4}, kinds


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
            stop_process(agent)
            summary = cap.stop()

        # The node's handshake happened and data moved through the tunnel (both ends agree).
        (peer,) = t.cp.peers()
        assert peer.latest_handshake > 0 and peer.rx_bytes > 0 and peer.tx_bytes > 0
        assert peer.endpoint is not None and peer.endpoint.startswith(f"{t.node_underlay}:")  # learnt from it
        (cp_peer,) = t.node.peers()
        assert cp_peer.model_dump(include={"public_key", "allowed_ips", "endpoint", "persistent_keepalive"}) \
            == t.control_plane_peer.model_dump()
        assert cp_peer.latest_handshake > 0 and cp_peer.rx_bytes > 0

        _assert_wireguard_only(cap, summary, t.cp_underlay, t.node_underlay, t.wg_port, nats_port)

        # Outside the tunnel NATS is unreachable: it listens on the WireGuard address only, so the control
        # plane's underlay address (what the node can reach without WireGuard) refuses the connection, and
        # so does loopback on the control plane itself; through the tunnel it answers.
        node = t.node_ns.argv([])
        assert _tcp_connects(node, t.cp_underlay, nats_port) == "ConnectionRefusedError"
        assert _tcp_connects([], "127.0.0.1", nats_port) == "ConnectionRefusedError"
        assert _tcp_connects(node, t.cp_addr, nats_port) == "connected"
    finally:
        if agent is not None:
            stop_process(agent)
        if admin is not None:
            await admin.close()
        server.stop()


# ---------------------------------------------------------------- a joined node runs a job through its tunnel

JOINED = "hoster-wg-1"


async def test_a_joined_node_runs_a_job_with_its_bus_traffic_only_in_the_tunnel(tmp_path: Path, swtpm: Swtpm
                                                                                 ) -> None:
    images = tmp_path / "images"
    build_test_image(images)  # skips (with the reason) where the micro VM's tools are missing
    underlay, inner = free_subnet("underlay"), free_subnet("tunnel")
    cp_u, node_u = str(underlay[1]), str(underlay[2])
    cp_a = str(inner[1])
    wg_port = _free_udp_port()
    etc, node_state = tmp_path / "node" / "etc", tmp_path / "node" / "state"
    # The node's interface gets a name of its own: wireguard-go's control sockets (/var/run/wireguard) are
    # shared by all namespaces, so a parallel run's "qvm0" would collide with this one.
    tunnel_env = {**os.environ, "QVM_WG_INTERFACE": unique_name("qvmn")}
    tunnel_cli = [sys.executable, "-m", "shared.cli.main", "node", "tunnel"]
    pki = Pki(tmp_path / "cp" / "pki")
    # Names in the server certificate: the join's HTTPS is dialled at the underlay address, NATS at the
    # tunnel address.
    pki.init(nodes=(), server_names=[cp_a, cp_u])
    agent: subprocess.Popen[bytes] | None = None
    async with contextlib.AsyncExitStack() as stack:
        # The control plane (root namespace): the hub's interface, NATS on its tunnel address only, and
        # joins served on the underlay address only.
        ns = stack.enter_context(netns(unique_name("qwjns")))
        host_veth = unique_name("qwh")
        stack.enter_context(veth_pair(host_veth, unique_name("qwp"), ns, f"{cp_u}/30", f"{node_u}/30"))
        hub_if = WgInterface(unique_name("qwc"), generate_keypair().private, listen_port=wg_port,
                             address=f"{cp_a}/24")
        stack.callback(hub_if.down)
        hub_if.up()
        hub = WireGuardHub(hub_if, inner, endpoint=f"{cp_u}:{wg_port}")
        server = EmbeddedNats(pki, tmp_path / "cp" / "nats", host=cp_a)
        url = server.start()
        stack.callback(server.stop)
        nats_port = int(url.rsplit(":", 1)[1])
        assert url == f"tls://{cp_a}:{nats_port}"
        settings = AllSettings(state_dir=tmp_path / "cp", nats_url=url, pki_dir=pki.root,
                               min_trust=TrustState.UNVERIFIED)
        buses: list[Bus] = []

        async def close_buses() -> None:
            for b in buses:
                await b.close()
        stack.push_async_callback(close_buses)

        async def bus(role: Role) -> Bus:
            buses.append(await Bus.connect(url, pki, Identity(role)))
            return buses[-1]
        admin = await bus(Role.ADMIN)
        await provision(admin.js, settings)
        joins = await start_join_service(admin, server, host=cp_u, port=0, nats_url=url, ek_ca=swtpm.state.ek_ca,
                                         tunnel=hub)
        stack.callback(joins.stop)
        assert joins.url.startswith(f"https://{cp_u}:")

        # The join. The swtpm stands for the node's TPM, but it listens on the root namespace's loopback,
        # which the node's namespace cannot reach: so the join runs from the test process. It is HTTPS to
        # the underlay address and happens before the capture; the bus traffic is what this test is about.
        token, _ = await create_invite(await admin.kv(JOIN_INVITES), JOINED, pki.ca_der, 600)
        result, grant = await asyncio.to_thread(client.join, str(token), joins.url, etc, swtpm.tcti)
        assert result.node_id == JOINED and result.nats_url == url and result.wireguard
        assert grant.wireguard is not None
        assert grant.wireguard.node_address == f"{inner[2]}/24"  # the first free address
        assert grant.wireguard.server_address == cp_a and grant.wireguard.endpoint == f"{cp_u}:{wg_port}"
        assert grant.wireguard.server_public_key == hub_if.public_key
        assert (etc / "wireguard" / "private.key").stat().st_mode & 0o777 == 0o600
        assert (etc / "wireguard" / "tunnel.json").is_file()
        (member,) = hub_if.peers()  # the hub added the node's key, allowed its address only
        assert member.allowed_ips == (f"{inner[2]}/32",) and member.latest_handshake == 0

        def tunnel_down() -> None:
            ns.run([*tunnel_cli, "down", "--etc", str(etc)], check=False, env=tunnel_env)
        stack.callback(tunnel_down)

        # The platform: a scheduler and a janitor. The node-agent has no TPM (the swtpm is out of its
        # namespace's reach), so it is never more than unverified, and that is what the scheduler asks.
        market = await bus(Role.MARKETPLACE)
        services = (await Scheduler.create(await bus(Role.SCHEDULER), settings),
                    Janitor(await bus(Role.JANITOR), settings))
        await stack.enter_async_context(running(*services))

        cap = stack.enter_context(capture(host_veth, tmp_path / "underlay.pcap"))
        # The node's end, brought up in its namespace by the real CLI from what the join saved (node_tunnel
        # with no netns: the command itself runs inside the namespace).
        up = await asyncio.to_thread(ns.run, [*tunnel_cli, "up", "--etc", str(etc)], True, tunnel_env)
        assert f"tunnel {tunnel_env['QVM_WG_INTERFACE']} up" in up.stdout, up.stdout + up.stderr

        # The real node-agent in the node's namespace, configured by the join's node.env (the tunnel's NATS
        # URL, the joined identity and its certificates). `nsenter --net` rather than `ip netns exec`: the
        # latter remounts /sys, hiding the cgroup hierarchy the agent puts each VMM in.
        env = client.read_env(etc / "node.env")
        assert env["QVM_NATS_URL"] == url and env["QVM_NODE_ID"] == JOINED
        agent_env = {**os.environ, **env, "QVM_TPM": "", "QVM_NODE_DOCTOR": "off", "QVM_MIN_TRUST": "unverified",
                     "QVM_IMAGES_DIR": str(images), "QVM_INSTANCES_DIR": str(node_state / "instances"),
                     "QVM_STATE_DIR": str(node_state), "QVM_HEARTBEAT_INTERVAL_S": "0.3"}
        node_state.mkdir(parents=True)
        log_path = tmp_path / "agent.log"
        with open(log_path, "ab") as log:
            agent = ns.popen([sys.executable, "-m", "services.node_agent"], net_only=True, env=agent_env, cwd=REPO,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        stack.callback(stop_process, agent)

        def alive() -> None:
            assert agent is not None
            if agent.poll() is not None:
                raise AssertionError(f"node-agent exited ({agent.returncode}): {log_path.read_text()[-3000:]}")

        async def registered() -> bool:
            alive()
            kinds = [e.spec.type for e in await events_of(admin, Domain.NODES) if e.node_id == JOINED]
            return EventType.NODE_REGISTERED in kinds and EventType.NODE_HEARTBEAT in kinds
        await eventually(registered, timeout=60, what=f"{JOINED}'s registration")

        await market.publish(JobSubmitted(owner="alice", image=IMAGE, command=("sleep", "2"), max_runtime_s=300,
                                          profile=HardwareProfile(cpu_cores=1, ram_mib=256)), job_id="job-1")

        async def done() -> bool:
            alive()
            book = await job_book(admin, strict=False)
            job = book.jobs.get("job-1")
            if job is not None and job.state in (JobState.FAILED, JobState.CANCELLED):
                raise AssertionError(f"job-1 ended {job.state}: {log_path.read_text()[-3000:]}")
            return job is not None and job.state is JobState.DONE
        await eventually(done, timeout=180, what="job-1 done")
        stop_process(agent)
        summary = cap.stop()

        # The job ran on the joined node: what a node says about it was said by node-agent.<its id>.
        events = await events_of(admin, Domain.JOBS, "qvm.jobs.job-1.>")
        from_node = [e for e in events if e.node_id == JOINED and e.spec.type is not EventType.JOB_PLACED]
        assert {e.envelope.producer for e in from_node} == {f"node-agent.{JOINED}"}
        kinds = {e.spec.type for e in from_node}
        assert {EventType.JOB_ACCEPTED, EventType.INSTANCE_RUNNING, EventType.INSTANCE_EXITED} <= kinds, kinds

        # The hub shook hands with the node at its underlay address, and data moved.
        (member,) = hub_if.peers()
        assert member.latest_handshake > 0 and member.rx_bytes > 0 and member.tx_bytes > 0
        assert member.endpoint is not None and member.endpoint.startswith(f"{node_u}:")
        # From the tunnel's start to the agent's end the underlay carried WireGuard's UDP only.
        _assert_wireguard_only(cap, summary, cp_u, node_u, wg_port, nats_port)
