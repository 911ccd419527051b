"""The registry's compare-and-set against the real KV bucket: two writers, one node."""

from __future__ import annotations

import asyncio

import pytest

from services.scheduler.placement import Claim, NodeRecord, claim_still_fits, with_claims
from services.scheduler.registry import Conflict, Registry
from shared.identity import Role
from shared.models import ResourceClaim
from tests.framework.flow import gpu_inventory

pytestmark = pytest.mark.nats


async def _registry(stack) -> tuple[Registry, asyncio.Event, asyncio.Task[None]]:
    bus = await stack.bus(Role.SCHEDULER)
    reg = Registry(await bus.kv("qvm_nodes"))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(reg.load_and_watch(stop, ready))
    await asyncio.wait_for(ready.wait(), 10)
    return reg, stop, task


def _claim(gpu: str) -> Claim:
    return Claim(claim=ResourceClaim(cpu_cores=1, ram_mib=64, gpu_uuids=(gpu,)), attempt=0, submitted_id="x")


async def test_a_stale_writer_rereads_and_never_takes_a_taken_gpu(stack):
    a, stop_a, ta = await _registry(stack)
    b, stop_b, tb = await _registry(stack)
    try:
        await a.update("node-a", lambda _: NodeRecord(node_id="node-a", inventory=gpu_inventory("node-a", gpus=1)))
        await asyncio.sleep(0.3)  # b's watch sees the record
        assert b.get("node-a") is not None

        def take(job: str):
            def mutate(rec: NodeRecord | None) -> NodeRecord:
                assert rec is not None
                if not claim_still_fits(rec, _claim("GPU-node-a-0").claim):
                    raise Conflict("GPU taken")
                return with_claims(rec, {**rec.claims, job: _claim("GPU-node-a-0")})
            return mutate

        await a.update("node-a", take("job-a"))
        # b still holds the old revision in its cache unless its watch already caught up; either way its
        # compare-and-set must end in a re-read and a refusal, never a second claim on the same GPU.
        with pytest.raises(Conflict):
            await b.update("node-a", take("job-b"))
        assert list(b.get("node-a").claims) == ["job-a"]
        assert b.node_of_job("job-a") == ["node-a"] and b.node_of_job("job-b") == []
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(ta, tb)


async def test_concurrent_writers_both_land_when_they_fit(stack):
    a, stop_a, ta = await _registry(stack)
    b, stop_b, tb = await _registry(stack)
    try:
        await a.update("node-a", lambda _: NodeRecord(node_id="node-a", inventory=gpu_inventory("node-a", gpus=8)))
        await asyncio.sleep(0.3)

        def add(job: str, gpu: str):
            return lambda rec: with_claims(rec, {**rec.claims, job: _claim(gpu)})

        await asyncio.gather(*(r.update("node-a", add(f"job-{i}", f"GPU-node-a-{i}"))
                               for i, r in enumerate([a, b, a, b, a, b])))
        await asyncio.sleep(0.3)
        assert sorted(a.get("node-a").claims) == [f"job-{i}" for i in range(6)]
        assert sorted(b.get("node-a").claims) == [f"job-{i}" for i in range(6)]
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(ta, tb)
