"""The backbone end to end against a real nats-server: placement, acceptance, refusal, pending,
two scheduler replicas under a burst, deadlines and lost nodes."""

from __future__ import annotations

import msgpack
import pytest

from services.janitor.service import Janitor
from services.node_agent.service import NodeAgent
from services.scheduler.placement import NodeRecord, with_claims
from services.scheduler.service import Scheduler
from shared.events import (
    Domain,
    EventType,
    HardwareProfile,
    JobCancelRequested,
    JobPlaced,
    JobSubmitted,
    NodeRegistered,
    NodeSwept,
    TeardownRecord,
    TeardownRequested,
)
from shared.lifecycle import JobState
from shared.models import GpuRequest, ResourceClaim, TrustState, VramScrub
from tests.framework.flow import events_of, eventually, gpu_inventory, job_book, running

pytestmark = pytest.mark.nats

GPU_JOB = JobSubmitted(owner="alice", image="img", profile=HardwareProfile(
    cpu_cores=2, ram_mib=1024, gpus=GpuRequest(count=1, model="H100", min_vram_mib=40000)))


def settings_for(stack, **kw):
    return stack.settings.model_copy(update={"min_trust": TrustState.UNVERIFIED, **kw})


async def agent(stack, node, settings, live_gpus=None):
    inv = gpu_inventory(node)
    bus = await stack.bus("node-agent", node)
    return NodeAgent(bus, settings, inventory=inv, read_gpus=lambda: inv.gpus if live_gpus is None else live_gpus)


async def state_of(admin, job_id):
    view = (await job_book(admin)).get(job_id)
    return view.state if view else None


async def test_job_is_placed_and_accepted_in_one_trace(stack):
    settings = settings_for(stack)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    async with running(sched, await agent(stack, "node-a", settings)):
        await eventually(lambda: _registered(admin, "node-a"), what="registration")
        await market.publish(GPU_JOB, job_id="job-1")
        await eventually(lambda: _is(admin, "job-1", JobState.PROVISIONING), what="acceptance")
    evs = await events_of(admin, subject="qvm.jobs.job-1.>")
    assert [str(e.spec.type) for e in evs] == ["job.submitted", "job.placed", "job.accepted"]
    assert evs[1].payload.node_id == "node-a" and evs[1].payload.claim.gpu_uuids == ("GPU-node-a-0",)
    trace_ids = {e.envelope.trace["traceparent"].split("-")[1] for e in evs}
    assert len(trace_ids) == 1, "one job is one trace across services"


async def test_untrusted_nodes_get_no_work_by_default(stack):
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    sched = await Scheduler.create(await stack.bus("scheduler"), stack.settings)  # default: trusted only
    async with running(sched, await agent(stack, "node-a", stack.settings)):
        await eventually(lambda: _registered(admin, "node-a"), what="registration")
        await market.publish(GPU_JOB, job_id="job-1")
        await eventually(lambda: _has(admin, "job-1", EventType.JOB_PENDING), what="pending")
    pending = [e for e in await events_of(admin) if e.spec.type is EventType.JOB_PENDING]
    assert pending[0].payload.reason == "untrusted"
    assert await state_of(admin, "job-1") is JobState.PENDING


async def test_refusal_moves_the_job_to_another_node(stack):
    settings = settings_for(stack)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    # node-a registered 8 GPUs but its live NVML shows none: its own hardware check must refuse.
    liar = await agent(stack, "node-a", settings, live_gpus=())
    async with running(sched, liar):
        await eventually(lambda: _registered(admin, "node-a"), what="registration")
        await market.publish(GPU_JOB, job_id="job-1")
        await eventually(lambda: _has(admin, "job-1", EventType.JOB_REFUSED), what="refusal")
        async with running(await agent(stack, "node-b", settings)):
            await eventually(lambda: _is(admin, "job-1", JobState.PROVISIONING), what="accepted on node-b")
    view = (await job_book(admin)).get("job-1")
    assert view.node_id == "node-b" and view.attempt == 1
    refused = [e for e in await events_of(admin) if e.spec.type is EventType.JOB_REFUSED][0]
    assert refused.payload.reason == "gpu_missing"
    nodes = await _records(admin)
    assert "job-1" not in nodes["node-a"].claims and "job-1" in nodes["node-b"].claims


async def test_two_replicas_never_double_book_a_gpu(stack):
    settings = settings_for(stack, max_inflight=4)  # small windows: both replicas get a share of the burst
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    for node in ("node-a", "node-b"):
        nb = await stack.bus("node-agent", node)
        await nb.publish(NodeRegistered(inventory=gpu_inventory(node), agent_version="test"))
    s1 = await Scheduler.create(await stack.bus("scheduler"), settings)
    s2 = await Scheduler.create(await stack.bus("scheduler"), settings)
    async with running(s1, s2):
        await eventually(lambda: _registered(admin, "node-b"), what="registration")
        for i in range(40):
            await market.publish(GPU_JOB, job_id=f"burst-{i}")

        async def settled() -> bool:
            evs = await events_of(admin)
            decided = {e.job_id for e in evs if e.spec.type in (EventType.JOB_PLACED, EventType.JOB_PENDING)}
            return len(decided) == 40
        await eventually(settled, timeout=60, what="40 decisions")
    placed = [e for e in await events_of(admin) if e.spec.type is EventType.JOB_PLACED]
    assert len(placed) == 16 == len({e.job_id for e in placed}), "16 GPUs, each job placed once"
    gpus = [u for e in placed for u in e.payload.claim.gpu_uuids]
    assert len(gpus) == len(set(gpus)) == 16
    claims = [u for rec in (await _records(admin)).values() for c in rec.claims.values() for u in c.claim.gpu_uuids]
    assert sorted(claims) == sorted(gpus)
    assert s1.placed + s2.placed == 16 and s1.placed and s2.placed, "both replicas did work"
    assert s1.bus.handler_failures == s2.bus.handler_failures == 0, "write conflicts are resolved, not retried"


async def test_janitor_fails_a_job_past_its_deadline_and_requests_teardown(stack):
    settings = settings_for(stack, deadline_placed_s=0.5, sweep_interval_s=0.2)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    nb = await stack.bus("node-agent", "node-a")  # registered, but no agent answers its assignments
    await nb.publish(NodeRegistered(inventory=gpu_inventory("node-a"), agent_version="test"))
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    janitor = Janitor(await stack.bus("janitor"), settings)
    async with running(sched, janitor):
        await market.publish(GPU_JOB, job_id="slow-1")
        await eventually(lambda: _is(admin, "slow-1", JobState.FAILED), what="deadline failure")
        await eventually(lambda: _claims_empty(admin, "node-a"), what="claim released")
        await eventually(lambda: _gpus_listed(admin, "node-a"), what="the GPUs listed again after the record")
    failed = [e for e in await events_of(admin) if e.spec.type is EventType.JOB_FAILED]
    assert (failed[0].payload.reason, failed[0].payload.phase) == ("deadline_exceeded", "placed")
    teardown = await events_of(admin, Domain.TEARDOWN)
    requests = [e for e in teardown if isinstance(e.payload, TeardownRequested)]
    assert [(e.job_id, e.payload.node_id) for e in requests] == [("slow-1", "node-a")]
    records = [e.payload for e in teardown if isinstance(e.payload, TeardownRecord)]
    placed = next(e.payload for e in await events_of(admin) if e.spec.type is EventType.JOB_PLACED)
    assert len(records) == 1 and records[0].complete and records[0].outcome == "failed"
    assert records[0].gpus_clean == placed.claim.gpu_uuids != ()  # never handed to a VM: clean
    assert [st.status for st in records[0].steps if st.name == "instance"] == ["not_needed"]


async def test_jobs_on_a_silent_node_fail_as_node_lost(stack):
    settings = settings_for(stack, heartbeat_interval_s=0.2, offline_after_s=1.0, sweep_interval_s=0.2)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    janitor = Janitor(await stack.bus("janitor"), settings)
    async with running(sched, janitor):
        a = await agent(stack, "node-a", settings)
        async with running(a):
            await eventually(lambda: _registered(admin, "node-a"), what="registration")
            await market.publish(GPU_JOB, job_id="job-1")
            await eventually(lambda: _is(admin, "job-1", JobState.PROVISIONING), what="acceptance")
        # the agent is gone: heartbeats stop
        await eventually(lambda: _is(admin, "job-1", JobState.FAILED), timeout=30, what="node_lost")
    failed = [e for e in await events_of(admin) if e.spec.type is EventType.JOB_FAILED][0]
    assert failed.payload.reason == "node_lost"
    offline = [e for e in await events_of(admin, Domain.NODES)
               if e.spec.type is EventType.NODE_OFFLINE]
    assert [e.node_id for e in offline] == ["node-a"]


# ---------------------------------------------------------------- helpers
async def _records(admin) -> dict[str, NodeRecord]:
    kv = await admin.js.key_value("qvm_nodes")
    out = {}
    for k in await kv.keys():
        entry = await kv.get(k)
        out[k] = NodeRecord.model_validate(msgpack.unpackb(entry.value, raw=False))
    return out


async def _registered(admin, node) -> bool:
    try:
        return node in await _records(admin)
    except Exception:
        return False


async def _claims_empty(admin, node) -> bool:
    return not (await _records(admin))[node].claims


async def _gpus_listed(admin, node) -> bool:
    return not (await _records(admin))[node].scrubbing


async def _is(admin, job_id, state) -> bool:
    return await state_of(admin, job_id) is state


async def _has(admin, job_id, etype) -> bool:
    return any(e.spec.type is etype for e in await events_of(admin, subject=f"qvm.jobs.{job_id}.>"))



async def test_scheduler_skips_a_job_that_was_cancelled_before_it_got_to_it(stack):
    settings = settings_for(stack, sweep_interval_s=0.2)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    janitor = Janitor(await stack.bus("janitor"), settings)
    async with running(janitor):
        await market.publish(GPU_JOB, job_id="job-1")
        await market.publish(JobCancelRequested(reason="changed my mind"), job_id="job-1")
        await eventually(lambda: _is(admin, "job-1", JobState.CANCELLED), what="cancellation")
        sched = await Scheduler.create(await stack.bus("scheduler"), settings)
        async with running(sched, await agent(stack, "node-a", settings)):
            await eventually(lambda: _consumer_idle(admin, "scheduler-jobs"), what="scheduler caught up")
    types = [str(e.spec.type) for e in await events_of(admin, subject="qvm.jobs.job-1.>")]
    assert types == ["job.submitted", "job.cancel_requested", "job.cancelled"]
    assert (await job_book(admin, strict=True)).get("job-1").state is JobState.CANCELLED


async def test_a_placement_racing_a_cancellation_is_torn_down(stack):
    """A replica that placed a job just as it was cancelled: the janitor tears the late placement down."""
    settings = settings_for(stack, sweep_interval_s=0.2)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    janitor = Janitor(await stack.bus("janitor"), settings)
    node_a = await agent(stack, "node-a", settings)
    async with running(janitor, node_a):
        await market.publish(GPU_JOB, job_id="job-1")
        await market.publish(JobCancelRequested(reason="changed my mind"), job_id="job-1")
        await eventually(lambda: _is(admin, "job-1", JobState.CANCELLED), what="cancellation")
        racer = await stack.bus("scheduler")
        claim = ResourceClaim(cpu_cores=2, ram_mib=1024, gpu_uuids=("GPU-node-a-0",))
        await racer.publish(JobPlaced(node_id="node-a", attempt=0, claim=claim, job=JobSubmitted(owner='o', image='i')), job_id="job-1", node_id="node-a")
        await eventually(lambda: _has(admin, "job-1", EventType.JOB_ACCEPTED), what="late acceptance")
        await eventually(lambda: _teardowns(admin), what="teardown of the late placement")

        async def released() -> bool:
            return "job-1" not in node_a.held
        await eventually(released, what="node released the job")
    teardowns = [e for e in await events_of(admin, Domain.TEARDOWN) if isinstance(e.payload, TeardownRequested)]
    assert {(e.payload.node_id, e.payload.reason) for e in teardowns} <= {
        ("node-a", "late_job.placed"), ("node-a", "late_job.accepted")}
    assert (await job_book(admin, strict=False)).get("job-1").state is JobState.CANCELLED


async def _consumer_idle(admin, name) -> bool:
    try:
        info = await admin.js.consumer_info("QVM_JOBS", name)
    except Exception:  # not created yet
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq >= 3


async def _teardowns(admin) -> bool:
    return bool(await events_of(admin, Domain.TEARDOWN))


async def test_a_pending_job_is_placed_when_capacity_appears(stack):
    settings = settings_for(stack, sweep_interval_s=0.2)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    async with running(sched):
        await market.publish(GPU_JOB, job_id="job-1")
        await eventually(lambda: _has(admin, "job-1", EventType.JOB_PENDING), what="pending")
        async with running(await agent(stack, "node-a", settings)):
            await eventually(lambda: _is(admin, "job-1", JobState.PROVISIONING), what="placed once a node came")
    types = [str(e.spec.type) for e in await events_of(admin, subject="qvm.jobs.job-1.>")]
    assert types == ["job.submitted", "job.pending", "job.placed", "job.accepted"]
    kv = await admin.js.key_value("qvm_jobs")
    with pytest.raises(Exception, match=r"(?i)not ?found|deleted|no keys"):
        await kv.get("job-1")  # no longer parked


async def test_a_job_asking_for_egress_is_refused_where_it_cannot_be_enforced(stack):
    settings = settings_for(stack)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    job = GPU_JOB.model_copy(update={"egress": ("pypi.org:443",)})
    async with running(sched, await agent(stack, "node-a", settings)):
        await eventually(lambda: _registered(admin, "node-a"), what="registration")
        await market.publish(job, job_id="job-egress")
        await eventually(lambda: _has(admin, "job-egress", EventType.JOB_REFUSED), what="refusal")
    refused = next(e for e in await events_of(admin) if e.spec.type is EventType.JOB_REFUSED)
    assert refused.payload.reason == "egress_unsupported"


async def test_a_verified_scrub_from_a_node_sweep_lists_a_held_back_gpu_again(stack):
    """A GPU held back for a job (no verified scrub yet) comes back when the node's sweep reports it scrubbed
    and verified; an unverified scrub changes nothing."""
    settings = settings_for(stack)
    admin = await stack.bus("admin")
    nb = await stack.bus("node-agent", "node-a")
    inv = gpu_inventory("node-a", gpus=2)
    await nb.publish(NodeRegistered(inventory=inv, agent_version="test"))
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    held = {g.uuid: "old-job" for g in inv.gpus}
    async with running(sched):
        await eventually(lambda: _registered(admin, "node-a"), what="the node registered")
        await sched.registry.update("node-a", lambda rec: with_claims(rec, dict(rec.claims), scrubbing=held))
        first, second = (g.uuid for g in inv.gpus)
        await nb.publish(NodeSwept(reason="sweep", gpus=(_scrub(first, True), _scrub(second, False))))

        async def relisted() -> bool:
            return set((await _records(admin))["node-a"].scrubbing) == {second}
        await eventually(relisted, what="the scrubbed GPU listed again")


def _scrub(uuid: str, verified: bool) -> VramScrub:
    return VramScrub(gpu_uuid=uuid, method="cuda-memset-verify", bytes_total=1, bytes_scrubbed=1 if verified else 0,
                     verified=verified, duration_ms=1.0, rate_gbps=1.0)
