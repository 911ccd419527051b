"""Security against the real server: mutual TLS, generated permissions, and the consumer's guard
(dead letters for forged events, dedupe of replays, bounded redelivery of failing handlers)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from nats.js.api import ConsumerConfig, RawStreamMsg
from nats.js.errors import NotFoundError

from shared.bus import Bus, Handler
from shared.codec import Codec, Event
from shared.consumers import CONSUMERS, ConsumerSpec
from shared.errors import Reason
from shared.events import EventRejected, JobPlaced, JobSubmitted, NodeHeartbeat, NodeRegistered
from shared.identity import Identity, Role
from shared.ids import new_event_id
from shared.models import Inventory, ResourceClaim
from shared.pki import Pki
from tests.framework.stack import Stack

pytestmark = pytest.mark.nats

DENIED = (nats.errors.Error, asyncio.TimeoutError)  # a refused JetStream publish/request times out
REFUSED = (OSError, nats.errors.Error)  # ssl.SSLError (a TLS alert from the server) is an OSError
SCHED_JOBS = CONSUMERS[0]
assert SCHED_JOBS.role is Role.SCHEDULER and SCHED_JOBS.key == "jobs"
DL_SCHED = "qvm.dead.raw.scheduler.scheduler-jobs"  # dead letters of its job.submitted durable


# ---------------------------------------------------------------- helpers


async def eventually(cond: Callable[[], Awaitable[bool] | bool], within: float = 10.0,
                     task: asyncio.Task[None] | None = None) -> None:
    """Poll `cond` until true; fail after `within` seconds (or at once if the consumer task died)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = cond()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if task is not None and task.done():
            task.result()  # re-raise the consumer's exception
            pytest.fail("consumer stopped before the condition held")
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def consuming(bus: Bus, spec: ConsumerSpec, handler: Handler) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(bus.consume(spec, handler, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def last_msg(admin: Bus, stream: str, subject: str) -> RawStreamMsg | None:
    try:
        return await admin.js.get_last_msg(stream, subject)
    except NotFoundError:
        return None


async def count(admin: Bus, stream: str, subject: str | None = None) -> int:
    info = await admin.js.stream_info(stream, subjects_filter=subject)
    if subject is None:
        return int(info.state.messages)
    return int(sum((info.state.subjects or {}).values()))


def foreign_pki(tmp_path: Path) -> Pki:
    other = Pki(tmp_path / "other-ca")
    other.init(nodes=("node-z", "node-a"))
    return other


async def swallow(_: Exception) -> None:
    return None


async def connect_raw(url: str, ctx: ssl.SSLContext) -> Any:
    return await nats.connect(url, tls=ctx, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                              error_cb=swallow)


# ---------------------------------------------------------------- TLS


async def test_client_without_certificate_is_refused(stack: Stack) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(stack.pki.ca_cert))
    with pytest.raises(Exception) as info:
        nc = await connect_raw(stack.url, ctx)
        await nc.close()
    assert not isinstance(info.value, AssertionError)


async def test_client_certificate_from_other_ca_is_refused(stack: Stack, tmp_path: Path) -> None:
    other = foreign_pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(stack.pki.ca_cert))
    cert, key = other.tls_files(Identity(Role.MARKETPLACE))  # a name the server knows, the wrong issuer
    ctx.load_cert_chain(str(cert), str(key))
    with pytest.raises(Exception) as info:
        nc = await connect_raw(stack.url, ctx)
        await nc.close()
    assert not isinstance(info.value, AssertionError)
    # The same settings with our CA's certificate connect (the refusal was about the certificate).
    ok = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(stack.pki.ca_cert))
    cert, key = stack.pki.tls_files(Identity(Role.MARKETPLACE))
    ok.load_cert_chain(str(cert), str(key))
    nc = await connect_raw(stack.url, ok)
    try:
        assert nc.is_connected
    finally:
        await nc.close()


# ---------------------------------------------------------------- permissions


async def test_node_agent_cannot_publish_for_another_node(stack: Stack) -> None:
    admin = await stack.bus(Role.ADMIN)
    node_a = await stack.bus(Role.NODE_AGENT, "node-a")
    inv = Inventory(hostname="a", cpu_model="c", cpu_cores=4, ram_mib=1024)
    raw = node_a.codec.encode(NodeRegistered(inventory=inv, agent_version="1")).data
    for subject in ("qvm.nodes.node-b.heartbeat", "qvm.nodes.node-b.registered"):
        with pytest.raises(DENIED):
            await node_a.js.publish(subject, raw, timeout=2)
    await eventually(lambda: node_a.permission_errors >= 1)
    assert await count(admin, "QVM_NODES") == 0
    assert await last_msg(admin, "QVM_NODES", "qvm.nodes.node-b.heartbeat") is None
    # Its own subjects work over the same connection.
    assert await node_a.publish(NodeHeartbeat(seq=1))
    assert await count(admin, "QVM_NODES") == 1
    msg = await last_msg(admin, "QVM_NODES", "qvm.nodes.node-a.heartbeat")
    assert msg is not None and msg.data
    assert await last_msg(admin, "QVM_NODES", "qvm.nodes.node-b.heartbeat") is None


async def test_node_agent_cannot_read_another_nodes_assignments(stack: Stack) -> None:
    admin = await stack.bus(Role.ADMIN)
    node_a = await stack.bus(Role.NODE_AGENT, "node-a")
    name = "node-agent_node-a-assignments"
    spy = ConsumerConfig(name=name, durable_name=name, filter_subject="qvm.jobs.*.placed.node-b")
    with pytest.raises(DENIED):
        await node_a.js.add_consumer("QVM_JOBS", config=spy, timeout=2)
    with pytest.raises(NotFoundError):
        await admin.js.consumer_info("QVM_JOBS", name)
    # Node-b's own consumer name is not node-a's to create either.
    other = ConsumerConfig(name="node-agent_node-b-assignments",
                           durable_name="node-agent_node-b-assignments",
                           filter_subject="qvm.jobs.*.placed.node-b")
    with pytest.raises(DENIED):
        await node_a.js.add_consumer("QVM_JOBS", config=other, timeout=2)
    with pytest.raises(NotFoundError):
        await admin.js.consumer_info("QVM_JOBS", "node-agent_node-b-assignments")
    # Its own consumer is allowed, and cannot be re-pointed at node-b afterwards.
    assert await node_a.ensure_consumer(CONSUMERS[3]) == [name]
    with pytest.raises(DENIED):
        await node_a.js.add_consumer("QVM_JOBS", config=spy, timeout=2)
    info = await admin.js.consumer_info("QVM_JOBS", name)
    assert info.config.filter_subject == "qvm.jobs.*.placed.node-a"


async def test_services_cannot_repoint_or_delete_a_node_agents_consumer(stack: Stack) -> None:
    admin = await stack.bus(Role.ADMIN)
    node_a = await stack.bus(Role.NODE_AGENT, "node-a")
    [name] = await node_a.ensure_consumer(CONSUMERS[3])
    hijack = ConsumerConfig(name=name, durable_name=name, filter_subject="qvm.jobs.*.placed.*")
    for role in (Role.JANITOR, Role.SCHEDULER):
        other = await stack.bus(role)
        with pytest.raises(DENIED):
            await other.js.add_consumer("QVM_JOBS", config=hijack, timeout=2)
        with pytest.raises(DENIED):  # the API request is dropped by the server: no answer, a time-out
            await asyncio.wait_for(other.js.delete_consumer("QVM_JOBS", name), 2)
    info = await admin.js.consumer_info("QVM_JOBS", name)
    assert info.config.filter_subject == "qvm.jobs.*.placed.node-a"


async def test_only_scheduler_may_publish_job_placed(stack: Stack) -> None:
    admin = await stack.bus(Role.ADMIN)
    market = await stack.bus(Role.MARKETPLACE)
    sched = await stack.bus(Role.SCHEDULER)
    placed = JobPlaced(node_id="node-a", attempt=0, claim=ResourceClaim(cpu_cores=1, ram_mib=64), job=JobSubmitted(owner='o', image='i'))
    # Even a correctly scheduler-signed event is refused when the marketplace connection publishes it.
    out = sched.codec.encode(placed, job_id="j1", node_id="node-a")
    assert out.subject == "qvm.jobs.j1.placed.node-a"
    with pytest.raises(DENIED):
        await market.js.publish(out.subject, out.data, timeout=2)
    node_a = await stack.bus(Role.NODE_AGENT, "node-a")
    with pytest.raises(DENIED):
        await node_a.js.publish(out.subject, out.data, timeout=2)
    assert await count(admin, "QVM_JOBS", out.subject) == 0
    assert await sched.publish(placed, job_id="j1", node_id="node-a")
    assert await count(admin, "QVM_JOBS", out.subject) == 1


# ---------------------------------------------------------------- forged events are dead-lettered


def _forged(stack: Stack, tmp_path: Path, kind: str, job_id: str) -> tuple[str, bytes, Reason]:
    """A message on a job.submitted subject that the marketplace connection may publish, but forged."""
    payload = JobSubmitted(owner="mallory", image="evil")
    subject = f"qvm.jobs.{job_id}.submitted"
    if kind == "unknown_signer":  # a key our CA never issued
        codec = Codec(foreign_pki(tmp_path).signer(Identity(Role.NODE_AGENT, "node-z")), stack.pki.load_trust())
        return subject, codec.encode(payload, job_id=job_id).data, Reason.UNKNOWN_SIGNER
    if kind == "wrong_role":  # signed correctly, by a trusted identity that may not submit jobs
        codec = Codec(stack.pki.signer(Identity(Role.SCHEDULER)), stack.pki.load_trust())
        return subject, codec.encode(payload, job_id=job_id).data, Reason.PRODUCER_NOT_ALLOWED
    if kind == "forged_producer":  # node-b's key, envelope claims node-a
        codec = Codec(stack.pki.signer(Identity(Role.NODE_AGENT, "node-a")), stack.pki.load_trust())
        _, env_bytes, _, _ = msgpack.unpackb(codec.encode(payload, job_id=job_id).data, raw=False)[:4]
        signer = stack.pki.signer(Identity(Role.NODE_AGENT, "node-b"))
        data = msgpack.packb([1, env_bytes, "node-agent.node-b", signer.sign(env_bytes)], use_bin_type=True)
        return subject, data, Reason.PRODUCER_NOT_ALLOWED
    assert kind == "bad_signature"
    codec = Codec(stack.pki.signer(Identity(Role.MARKETPLACE)), stack.pki.load_trust())
    v, env_bytes, signer_name, sig = msgpack.unpackb(codec.encode(payload, job_id=job_id).data, raw=False)
    env_bytes = env_bytes[:-1] + bytes([env_bytes[-1] ^ 1])
    return subject, msgpack.packb([v, env_bytes, signer_name, sig], use_bin_type=True), Reason.BAD_SIGNATURE


@pytest.mark.parametrize("kind", ["unknown_signer", "wrong_role", "forged_producer", "bad_signature"])
async def test_forged_event_is_dead_lettered(stack: Stack, tmp_path: Path, kind: str) -> None:
    admin = await stack.bus(Role.ADMIN)
    market = await stack.bus(Role.MARKETPLACE)
    sched = await stack.bus(Role.SCHEDULER)
    subject, data, reason = _forged(stack, tmp_path, kind, "forged-1")

    # The server lets it through (the marketplace may publish job.submitted); only the codec can tell.
    ack = await market.js.publish(subject, data, headers={"Nats-Msg-Id": new_event_id()})
    forged_seq = ack.seq
    assert await market.publish(JobSubmitted(owner="alice", image="img"), job_id="good-1")

    handled: list[Event] = []

    async def handler(ev: Event) -> None:
        handled.append(ev)

    async with consuming(sched, SCHED_JOBS, handler) as task:
        await eventually(lambda: any(e.job_id == "good-1" for e in handled), task=task)

        async def dead_lettered() -> bool:
            return (await last_msg(admin, "QVM_DEAD", "qvm.dead.rejected.scheduler")) is not None

        await eventually(dead_lettered, task=task)
        # The consumer keeps going after the poison message.
        assert await market.publish(JobSubmitted(owner="bob", image="img"), job_id="good-2")
        await eventually(lambda: any(e.job_id == "good-2" for e in handled), task=task)

    assert [e.job_id for e in handled] == ["good-1", "good-2"]
    assert all(e.envelope.producer == "marketplace" for e in handled)

    raw = await last_msg(admin, "QVM_DEAD", DL_SCHED)
    assert raw is not None
    assert raw.data == data  # stored unchanged
    headers = raw.headers or {}
    assert headers["Qvm-Reason"] == reason.value
    assert headers["Qvm-Subject"] == subject
    assert headers["Qvm-Consumer"] == "scheduler-jobs"
    assert headers["Qvm-Stream-Seq"] == str(forged_seq)
    assert headers["Qvm-Detail"]
    assert await count(admin, "QVM_DEAD", DL_SCHED) == 1

    report_msg = await last_msg(admin, "QVM_DEAD", "qvm.dead.rejected.scheduler")
    assert report_msg is not None
    report = Codec(None, stack.pki.load_trust()).decode(report_msg.subject, report_msg.data)
    assert report.envelope.producer == "scheduler"
    assert isinstance(report.payload, EventRejected)
    assert report.payload.reason is reason
    assert report.payload.consumer == "scheduler-jobs"
    assert report.payload.subject == subject
    assert report.payload.stream_seq == forged_seq
    assert report.payload.size == len(data)
    assert await count(admin, "QVM_DEAD", "qvm.dead.rejected.scheduler") == 1

    # Everything was acked: nothing waits for redelivery.
    info = await admin.js.consumer_info("QVM_JOBS", "scheduler-jobs")
    assert info.num_ack_pending == 0
    assert info.num_pending == 0


# ---------------------------------------------------------------- replays


async def test_replayed_event_is_stored_once(stack: Stack) -> None:
    admin = await stack.bus(Role.ADMIN)
    market = await stack.bus(Role.MARKETPLACE)
    eid = new_event_id()
    job = JobSubmitted(owner="alice", image="img")
    assert await market.publish(job, job_id="replay-1", event_id=eid) is True
    assert await market.publish(job, job_id="replay-1", event_id=eid) is False
    # A replay with a different body but the same id is not stored either.
    assert await market.publish(JobSubmitted(owner="eve", image="x"), job_id="replay-1", event_id=eid) is False
    assert await count(admin, "QVM_JOBS", "qvm.jobs.replay-1.submitted") == 1
    stored = await last_msg(admin, "QVM_JOBS", "qvm.jobs.replay-1.submitted")
    assert stored is not None
    ev = Codec(None, stack.pki.load_trust()).decode(stored.subject, stored.data)
    assert ev.id == eid
    assert isinstance(ev.payload, JobSubmitted) and ev.payload.owner == "alice"
    # A new id is a new event.
    assert await market.publish(job, job_id="replay-1") is True
    assert await count(admin, "QVM_JOBS", "qvm.jobs.replay-1.submitted") == 2


async def test_raw_replay_of_stored_bytes_is_deduplicated(stack: Stack) -> None:
    """An attacker re-publishing captured bytes with the original event id gets a duplicate ack."""
    admin = await stack.bus(Role.ADMIN)
    market = await stack.bus(Role.MARKETPLACE)
    out = market.codec.encode(JobSubmitted(owner="alice", image="img"), job_id="replay-2")
    first = await market.js.publish(out.subject, out.data, headers={"Nats-Msg-Id": out.event_id})
    second = await market.js.publish(out.subject, out.data, headers={"Nats-Msg-Id": out.event_id})
    assert not first.duplicate and second.duplicate
    assert second.seq == first.seq
    assert await count(admin, "QVM_JOBS", out.subject) == 1


# ---------------------------------------------------------------- failing handlers


async def test_failing_handler_is_redelivered_then_dead_lettered(stack: Stack) -> None:
    admin = await stack.bus(Role.ADMIN)
    market = await stack.bus(Role.MARKETPLACE)
    sched = await stack.bus(Role.SCHEDULER)
    spec = dataclasses.replace(SCHED_JOBS, max_deliver=2, backoff_s=(0.1,))
    attempts: dict[str, int] = {}
    handled: list[str] = []

    async def handler(ev: Event) -> None:
        job = ev.job_id or ""
        attempts[job] = attempts.get(job, 0) + 1
        if job == "poison":
            raise RuntimeError("handler exploded")
        handled.append(job)

    assert await market.publish(JobSubmitted(owner="alice", image="img"), job_id="poison")
    assert await market.publish(JobSubmitted(owner="alice", image="img"), job_id="ok-1")

    async with consuming(sched, spec, handler) as task:
        async def dead_lettered() -> bool:
            return (await last_msg(admin, "QVM_DEAD", DL_SCHED)) is not None

        await eventually(dead_lettered, task=task)
        await eventually(lambda: "ok-1" in handled, task=task)
        assert await market.publish(JobSubmitted(owner="bob", image="img"), job_id="ok-2")
        await eventually(lambda: "ok-2" in handled, task=task)
        await asyncio.sleep(0.5)  # a third delivery of the poison message would show up here
        assert attempts["poison"] == 2

    assert attempts == {"poison": 2, "ok-1": 1, "ok-2": 1}
    assert handled == ["ok-1", "ok-2"]

    raw = await last_msg(admin, "QVM_DEAD", DL_SCHED)
    assert raw is not None
    headers = raw.headers or {}
    assert headers["Qvm-Reason"] == "handler_failed"
    assert headers["Qvm-Subject"] == "qvm.jobs.poison.submitted"
    assert "RuntimeError" in headers["Qvm-Detail"] and "after 2 deliveries" in headers["Qvm-Detail"]
    original = await last_msg(admin, "QVM_JOBS", "qvm.jobs.poison.submitted")
    assert original is not None and raw.data == original.data
    assert headers["Qvm-Stream-Seq"] == str(original.seq)

    report_msg = await last_msg(admin, "QVM_DEAD", "qvm.dead.rejected.scheduler")
    assert report_msg is not None
    report = Codec(None, stack.pki.load_trust()).decode(report_msg.subject, report_msg.data)
    assert isinstance(report.payload, EventRejected)
    assert report.payload.reason is Reason.HANDLER_FAILED
    assert report.payload.subject == "qvm.jobs.poison.submitted"

    info = await admin.js.consumer_info("QVM_JOBS", "scheduler-jobs")
    assert info.config.max_deliver == SCHED_JOBS.max_deliver  # the operator's durable; the budget is the spec's
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0  # the poison message was acked after dead-lettering
