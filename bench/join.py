"""8. Joining: a hoster's token to the node's first heartbeat, and a withdrawal to the certificate refused."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Figure, say, section
from bench.stack import bench_stack
from shared.buckets import JOIN_INVITES
from shared.bus import Bus
from shared.errors import Unauthorized
from shared.events import Domain
from shared.identity import Identity, Role
from shared.join import client
from shared.join.controlplane import start_join_service
from shared.join.invites import create_invite
from shared.pki import Pki
from shared.tpm.swtpm import Swtpm, SwtpmState

__all__ = ["run"]

ROUNDS = 5


def _agent(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "services.node_agent"], env=env, stdout=subprocess.DEVNULL,
                                stderr=out)


async def _first_heartbeat(admin: Bus, node: str, deadline_s: float = 60.0) -> None:
    subject = f"qvm.nodes.{node}.heartbeat"
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        async for batch in admin.read(Domain.NODES, subject):
            if batch:
                return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no heartbeat from {node} within {deadline_s:.0f} s")


async def run(tmp: Path) -> list[Figure]:
    section(
        "8. Joining a node",
        f"{ROUNDS} rounds on one control plane (nats-server + the registrar over HTTPS on loopback) and one swtpm "
        "as the host's TPM: `qvm node invite` (a token in KV), then, timed from the token in hand: "
        "client.join (CA fetched and pinned, CSRs, EK certificate chain, MakeCredential / ActivateCredential, "
        "certificates issued, NATS authorization reloaded) and `python -m services.node_agent` started with the "
        "written node.env until its first node.heartbeat is in the stream (doctor in its default warn mode, "
        "no VMs). Then the operator's revoke, timed until the node's certificate is refused by the server; the "
        "TPM joins again as the next node (one EK, one member at a time)",
    )
    pki = Pki(tmp / "pki")
    pki.init()
    tpm = Swtpm(SwtpmState(tmp / "tpm").manufacture()).start()
    joins_s: list[float] = []
    protocol_s: list[float] = []
    revokes_s: list[float] = []
    try:
        async with bench_stack(pki, tmp / "cp") as stack:
            admin = await stack.bus(Role.ADMIN)
            service = await start_join_service(admin, stack.server, ek_ca=tpm.state.ek_ca)
            try:
                for i in range(ROUNDS):
                    node = f"bench-join-{i}"
                    token, _ = await create_invite(await admin.kv(JOIN_INVITES), node, pki.ca_der, 600)
                    etc = tmp / f"etc-{i}"
                    t0 = time.perf_counter()
                    result, _ = await asyncio.to_thread(client.join, str(token), service.url, etc, tpm.tcti,
                                                        tunnel=False)
                    t1 = time.perf_counter()
                    env = {**os.environ, **client.read_env(result.env_file), "QVM_STATE_DIR": str(tmp / f"state-{i}"),
                           "QVM_TPM": "", "QVM_HEARTBEAT_INTERVAL_S": "5"}
                    agent = _agent(env, tmp / f"agent-{i}.log")
                    try:
                        await _first_heartbeat(admin, node)
                        t2 = time.perf_counter()
                        protocol_s.append(t1 - t0)
                        joins_s.append(t2 - t0)
                        r0 = time.perf_counter()
                        await asyncio.to_thread(client.revoke, service.url, pki, node, "operator_revoked", "bench")
                        try:
                            await Bus.connect(stack.server.url, Pki(result.pki_dir), Identity(Role.NODE_AGENT, node),
                                              connect_timeout=5)
                            raise AssertionError("a withdrawn node's certificate still opens the bus")
                        except Unauthorized:
                            revokes_s.append(time.perf_counter() - r0)
                        await asyncio.to_thread(agent.wait, 30)
                    finally:
                        if agent.poll() is None:
                            agent.kill()
                            agent.wait()
                    say(f"  round {i + 1}: join {1000 * (t1 - t0):.0f} ms, to first heartbeat "
                        f"{1000 * (t2 - t0):.0f} ms, revoke to refused {1000 * revokes_s[-1]:.0f} ms; agent exit "
                        f"{agent.returncode}")
            finally:
                service.stop()
    finally:
        tpm.stop()
    figs = [
        Figure("join: token to first heartbeat, p50", statistics.median(joins_s), "s",
               note=f"max {max(joins_s):.2f} s over {ROUNDS}; agent start included"),
        Figure("join protocol (TPM enrolment, certificates, NATS reload), p50", statistics.median(protocol_s) * 1000,
               "ms", note=f"max {max(protocol_s) * 1000:.0f} ms"),
        Figure("revoke: request to certificate refused, p50", statistics.median(revokes_s) * 1000, "ms",
               note=f"max {max(revokes_s) * 1000:.0f} ms"),
    ]
    for f in figs:
        say(f.line())
    return figs
