import asyncio

import pytest

from shared.consumers import CONSUMERS
from shared.events import JobSubmitted
from shared.identity import Role

pytestmark = pytest.mark.nats


async def test_signed_event_round_trip(stack):
    market = await stack.bus(Role.MARKETPLACE)
    assert await market.publish(JobSubmitted(owner="alice", image="img"), job_id="job-1")
    sched = await stack.bus(Role.SCHEDULER)
    stop = asyncio.Event()
    got = []

    async def handler(ev):
        got.append(ev)
        stop.set()

    await asyncio.wait_for(sched.consume(CONSUMERS[0], handler, stop), 10)
    assert got[0].envelope.producer == "marketplace"
    assert got[0].payload.owner == "alice"
    assert "traceparent" in got[0].envelope.trace
