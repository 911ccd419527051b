"""Replays never re-run a job, whatever the transport's dedupe window (a real micro VM, a real server).

The review's attack: a finished job's genuine `job.submitted`, re-published verbatim after the stream's
duplicate window and a scheduler restart, was placed, accepted and booted again. Here the window is one
second; the scheduler is restarted; the submission is replayed twice (same `Nats-Msg-Id`, new one), and
the original `job.placed` is replayed at the node. Nothing runs again: the scheduler and the node each
dead-letter their copy as `job_exists` with a signed report, and the audit flags the stored duplicates.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from services.janitor.service import Janitor
from services.node_agent.service import NodeAgent
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from services.scheduler.service import Scheduler
from shared import reader
from shared.codec import Codec
from shared.events import EventRejected, EventType, JobSubmitted
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from tests.framework.flow import audited, events_of, eventually, job_book, running
from tests.framework.images import IMAGE, build_test_image
from tests.framework.stack import Stack, running_stack

pytestmark = pytest.mark.nats


def _settings(stack: Stack, tmp_path: Path) -> Any:
    return stack.settings.model_copy(update={
        "min_trust": TrustState.UNVERIFIED, "images_dir": tmp_path / "images", "instances_dir": tmp_path / "instances",
        "sweep_interval_s": 0.3})


async def _rejections(stack: Stack, admin: Any) -> list[EventRejected]:
    codec = Codec(None, stack.pki.load_trust())
    out = []
    async for batch in reader.read(admin.nc, "QVM_DEAD", "qvm.dead.rejected.>"):
        out += [codec.decode(m.subject, m.data).payload for m in batch]
    return [r for r in out if isinstance(r, EventRejected)]


async def _count(admin: Any, subject: str) -> int:
    n = 0
    async for batch in reader.read(admin.nc, "QVM_JOBS", subject):
        n += len(batch)
    return n


async def test_a_late_replay_of_a_finished_job_runs_nothing(tmp_path: Path) -> None:
    build_test_image(tmp_path / "images")
    async with running_stack(tmp_path / "stack", duplicate_window_s=1.0) as stack:
        settings = _settings(stack, tmp_path)
        admin, market = await stack.bus("admin"), await stack.bus("marketplace")
        sched_bus = await stack.bus("scheduler")
        agent = NodeAgent(await stack.bus("node-agent", "node-a"), settings, vmm=QemuMicrovm(accel=settings.vm_accel))
        job = JobSubmitted(owner="alice", image=IMAGE, command=("true",), profile=HardwareProfile(cpu_cores=1,
                                                                                                  ram_mib=256))
        async with running(agent, Janitor(await stack.bus("janitor"), settings)):
            async with running(await Scheduler.create(sched_bus, settings)):
                await market.publish(job, job_id="rp-1")

                async def done() -> bool:
                    view = (await job_book(admin)).get("rp-1")
                    return view is not None and view.state is JobState.DONE
                await eventually(done, timeout=180, what="the job to finish")
            # The scheduler is down; the duplicate window passes.
            await asyncio.sleep(1.5)
            submitted = await reader.first(admin.nc, "QVM_JOBS", "qvm.jobs.rp-1.submitted")
            placed = await reader.first(admin.nc, "QVM_JOBS", "qvm.jobs.rp-1.placed.node-a")
            assert submitted is not None and placed is not None
            for msg_id in (submitted.headers["Nats-Msg-Id"], "a-new-id"):  # verbatim, and under a new id
                await market.js.publish(submitted.subject, submitted.data, headers={"Nats-Msg-Id": msg_id})
            assert await _count(admin, "qvm.jobs.rp-1.submitted") == 3  # the transport stored both copies
            async with running(await Scheduler.create(await stack.bus("scheduler"), settings)):
                async def scheduler_refused() -> bool:
                    return sum(r.reason.value == "job_exists" and r.consumer.startswith("scheduler-")
                               for r in await _rejections(stack, admin)) == 2
                await eventually(scheduler_refused, timeout=30, what="the scheduler to refuse both copies")
                # The same at the node: the original assignment, replayed past the window.
                await sched_bus.js.publish(placed.subject, placed.data, headers={"Nats-Msg-Id": "placed-again"})

                async def node_refused() -> bool:
                    return any(r.reason.value == "job_exists" and r.consumer.startswith("node-agent_node-a-")
                               for r in await _rejections(stack, admin))
                await eventually(node_refused, timeout=30, what="the node to refuse the replayed assignment")
                await asyncio.sleep(1.0)  # a second run would show up here
        types = [e.spec.type for e in await events_of(admin, subject="qvm.jobs.rp-1.>")]
        assert types.count(EventType.JOB_ACCEPTED) == 1
        assert types.count(EventType.INSTANCE_PROVISIONING) == 1
        assert types.count(EventType.JOB_PLACED) == 2  # the original and the test's replayed copy, nothing new
        assert (await job_book(admin)).get("rp-1").state is JobState.DONE  # type: ignore[union-attr]
        assert not any((tmp_path / "instances").iterdir())

        report = await audited(admin, stack.pki)
        assert not report.ok
        duplicates = [v for v in report.violations if "rp-1" in v or submitted.headers["Nats-Msg-Id"] in v]
        assert duplicates, report.violations
        assert sum("job_exists" in d for d in report.dead_letters) == 3, report.dead_letters
