"""The control plane on a 3-server NATS cluster (NATS's own clustering: replicated streams and buckets),
for real: three nats-server processes on loopback with mutual TLS on client and route connections (each
server its own certificate), every stream and bucket with 3 replicas, services and a node-agent given all
three URLs. The server leading the jobs stream is killed -9 while a job runs: the job completes, nothing is
lost or applied twice, the audit replay is clean; restarted, the server catches up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from services.janitor.service import Janitor
from services.scheduler.service import Scheduler
from shared.bus import Bus
from shared.events import STREAMS, Domain, EventType, JobSubmitted, NodeHeartbeat
from shared.identity import Identity, Role
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from shared.natsserver import EmbeddedCluster
from shared.pki import Pki
from shared.provision import provision
from tests.framework.flow import audited, events_of, eventually, job_book, running
from tests.framework.images import IMAGE, build_test_image
from tests.framework.settings import AllSettings

pytestmark = [pytest.mark.nats, pytest.mark.timeout(300)]


def _agent(url: str, pki: Pki, state: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "QVM_NATS_URL": url, "QVM_PKI_DIR": str(pki.root), "QVM_STATE_DIR": str(state),
           "QVM_NODE_ID": "node-a", "QVM_IMAGES_DIR": str(state / "images"), "QVM_NODE_DOCTOR": "off",
           "QVM_INSTANCES_DIR": str(state / "instances"), "QVM_HEARTBEAT_INTERVAL_S": "0.5", "QVM_TPM": ""}
    with open(state / "agent.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "services.node_agent"], env=env, stdout=subprocess.DEVNULL,
                                stderr=log)


async def _leader(admin: Bus, domain: Domain) -> str:
    info = await admin.js.stream_info(STREAMS[domain].name)
    assert info.cluster is not None and info.cluster.leader
    return str(info.cluster.leader)


async def _caught_up(admin: Bus) -> bool:
    """Every replica of every qvm stream is current (none offline or lagging)."""
    for spec in STREAMS.values():
        try:
            info = await admin.js.stream_info(spec.name)
        except nats.errors.Error:  # asked while the cluster still settles: not yet
            return False
        replicas = (info.cluster.replicas if info.cluster else None) or []
        if len(replicas) != 2 or any(not r.current or r.offline or (r.lag or 0) > 0 for r in replicas):
            return False
    return True


async def test_the_jobs_stream_leader_killed_mid_job(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init(nodes=("node-a",))
    cluster = EmbeddedCluster(pki, tmp_path / "nats", size=3)
    url = await asyncio.to_thread(cluster.start)
    assert len(url.split(",")) == 3
    buses: list[Bus] = []
    agent: subprocess.Popen[bytes] | None = None
    try:
        settings = AllSettings(state_dir=tmp_path, nats_url=url, pki_dir=pki.root, stream_replicas=3,
                               min_trust=TrustState.UNVERIFIED)

        async def bus(role: Role) -> Bus:
            b = await Bus.connect(url, pki, Identity(role))
            buses.append(b)
            return b

        admin = await bus(Role.ADMIN)
        await provision(admin.js, settings)
        for spec in STREAMS.values():
            assert (await admin.js.stream_info(spec.name)).config.num_replicas == 3
        kv = await admin.js.stream_info("KV_qvm_nodes")
        assert kv.config.num_replicas == 3

        build_test_image(tmp_path / "images")
        market = await bus(Role.MARKETPLACE)
        async with running(await Scheduler.create(await bus(Role.SCHEDULER), settings),
                           Janitor(await bus(Role.JANITOR), settings)):
            agent = _agent(url, pki, tmp_path)
            await market.publish(JobSubmitted(owner="alice", image=IMAGE, command=("sleep", "6"), max_runtime_s=300,
                                              profile=HardwareProfile(cpu_cores=1, ram_mib=256)), job_id="job-1")

            async def running_now() -> bool:
                return any(e.spec.type is EventType.INSTANCE_RUNNING
                           for e in await events_of(admin, subject="qvm.jobs.job-1.>"))

            await eventually(running_now, timeout=180, what="job-1 running")
            leader = await _leader(admin, Domain.JOBS)
            victim = next(s for s in cluster.servers if s.server_name == leader)
            await asyncio.to_thread(victim.kill)

            async def state_is(state: JobState) -> bool:
                book = await job_book(admin, strict=False)
                return book.get("job-1") is not None and book.jobs["job-1"].state is state

            await eventually(lambda: state_is(JobState.DONE), timeout=120, what="job-1 done after the leader died")
            assert await _leader(admin, Domain.JOBS) != leader, "another server leads the jobs stream"

            # Restarted, the killed server catches up with what it missed.
            await asyncio.to_thread(victim.start)
            await eventually(lambda: _caught_up(admin), timeout=60, what="every replica current again")

            # And the platform goes on: a second job on the healed cluster.
            await market.publish(JobSubmitted(owner="alice", image=IMAGE, command=("true",), max_runtime_s=300,
                                              profile=HardwareProfile(cpu_cores=1, ram_mib=256)), job_id="job-2")

            async def second_done() -> bool:
                book = await job_book(admin, strict=False)
                return book.get("job-2") is not None and book.jobs["job-2"].state is JobState.DONE

            await eventually(second_done, timeout=180, what="job-2 done")
            await eventually(lambda: _has_record(admin, "job-1"), timeout=30, what="job-1's teardown record")

        book = await job_book(admin)  # strict: every transition legal, nothing applied twice
        assert book.jobs["job-1"].state is JobState.DONE and book.jobs["job-2"].state is JobState.DONE
        report = await audited(admin, pki)
        assert report.ok, report.violations
        assert not report.dead_letters, report.dead_letters
    finally:
        if agent is not None:
            agent.terminate()
            try:
                await asyncio.to_thread(agent.wait, 30)
            except subprocess.TimeoutExpired:
                agent.kill()
        for b in buses:
            await b.close()
        cluster.stop()


async def _has_record(admin: Bus, job: str) -> bool:
    return bool(await events_of(admin, Domain.TEARDOWN, f"qvm.teardown.{job}.record"))


async def test_a_publish_waits_out_a_stream_without_a_leader(tmp_path: Path) -> None:
    """With two of three servers down the streams have no quorum, hence no leader: JetStream answers "no
    responders", so the message was certainly not stored. The publish is sent again until a leader is back
    (found when a node-agent's instance.exited failed during an election and its job never ended)."""
    pki = Pki(tmp_path / "pki")
    pki.init(nodes=("node-a",))
    cluster = EmbeddedCluster(pki, tmp_path / "nats", size=3)
    url = await asyncio.to_thread(cluster.start)
    buses: list[Bus] = []
    try:
        settings = AllSettings(state_dir=tmp_path, nats_url=url, pki_dir=pki.root, stream_replicas=3)
        admin = await Bus.connect(url, pki, Identity(Role.ADMIN))
        node = await Bus.connect(url, pki, Identity(Role.NODE_AGENT, "node-a"))
        buses += [admin, node]
        await provision(admin.js, settings)
        leader = await _leader(admin, Domain.NODES)
        keep = next(s for s in cluster.servers if s.server_name != leader)
        down = [s for s in cluster.servers if s is not keep]
        for server in down:
            await asyncio.to_thread(server.kill)
        publishing = asyncio.create_task(node.publish(NodeHeartbeat(seq=1)))
        await asyncio.sleep(3)
        assert not publishing.done(), "nothing can be stored without a quorum"
        await asyncio.to_thread(down[0].start)
        assert await asyncio.wait_for(publishing, 60) is True
        stored = [m async for b in admin.read(Domain.NODES, "qvm.nodes.node-a.heartbeat") for m in b]
        assert len(stored) == 1
    finally:
        for b in buses:
            await b.close()
        cluster.stop()
