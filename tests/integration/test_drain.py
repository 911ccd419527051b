"""Draining a node end to end, with `qvm node drain / undrain / status` as a hoster runs them: real
nats-server, scheduler, janitor and two node-agents running jobs in QEMU micro VMs.

node-a runs a job; it is drained: the job runs to its end (job.done) there, a new job waits (pending,
reason `draining`) until node-b appears and then runs there; node-a's status file says draining, then no
job. Undrained (and node-b drained), node-a takes work again."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import typer
from typer.testing import CliRunner, Result

from services.janitor.service import Janitor
from services.node_agent.service import NodeAgent
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from services.scheduler.service import Scheduler
from shared.cli.node_ops import drain, status, undrain
from shared.events import EventType, JobSubmitted
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from shared.nodestatus import read_status
from shared.registry import NodeRecord
from tests.framework.flow import events_of, eventually, gpu_inventory, job_book, running
from tests.framework.images import IMAGE, build_test_image

pytestmark = pytest.mark.nats

NODE_CLI = typer.Typer()
for _name, _fn in (("drain", drain), ("undrain", undrain), ("status", status)):
    NODE_CLI.command(_name)(_fn)


def qvm_node(*args: str) -> Result:
    return CliRunner().invoke(NODE_CLI, list(args), env={"COLUMNS": "200"})


def _job(seconds: int) -> JobSubmitted:
    return JobSubmitted(owner="alice", image=IMAGE, command=("sleep", str(seconds)), max_runtime_s=300,
                        profile=HardwareProfile(cpu_cores=1, ram_mib=256))


async def test_a_drained_node_finishes_its_job_takes_no_new_one_and_takes_work_again(stack: Any,
                                                                                      tmp_path: Path) -> None:
    build_test_image(tmp_path / "images")
    settings = stack.settings.model_copy(update={
        "min_trust": TrustState.UNVERIFIED, "images_dir": tmp_path / "images", "sweep_interval_s": 0.3,
        "heartbeat_interval_s": 0.3})
    state = {n: tmp_path / n for n in ("node-a", "node-b")}  # each host its own state dir (drain, status)

    async def agent(node: str) -> NodeAgent:
        own = settings.model_copy(update={"state_dir": state[node], "instances_dir": state[node] / "instances"})
        return NodeAgent(await stack.bus("node-agent", node), own, read_gpus=lambda: (),
                         inventory=gpu_inventory(node, gpus=0, cores=4, ram_mib=8192),
                         vmm=QemuMicrovm(accel=settings.vm_accel))

    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    async with running(sched, Janitor(await stack.bus("janitor"), settings), await agent("node-a")):
        await eventually(lambda: _record(admin, "node-a", lambda r: True), what="node-a registered")
        await market.publish(_job(8), job_id="job-1")
        await eventually(lambda: _has(admin, "job-1", EventType.INSTANCE_RUNNING), timeout=120,
                         what="job-1 running on node-a")

        out = qvm_node("drain", "--state-dir", str(state["node-a"]))
        assert out.exit_code == 0 and "drain requested" in out.output, out.output
        await eventually(lambda: _record(admin, "node-a", lambda r: r.draining), what="the scheduler hears it")
        report = read_status(state["node-a"])
        assert report is not None and report.draining and [j.job_id for j in report.jobs] == ["job-1"]
        assert report.jobs[0].instance_id and report.jobs[0].phase == "running"

        await market.publish(_job(1), job_id="job-2")
        await eventually(lambda: _has(admin, "job-2", EventType.JOB_PENDING), what="job-2 pending")
        pending = [e for e in await events_of(admin, subject="qvm.jobs.job-2.>")
                   if e.spec.type is EventType.JOB_PENDING]
        assert pending[0].payload.reason == "draining"  # type: ignore[attr-defined]

        async with running(await agent("node-b")):
            # A hoster's `qvm node drain --wait`: blocking, so off the event loop the services run on.
            waited = await asyncio.to_thread(qvm_node, "drain", "--wait", "--timeout", "150",
                                             "--state-dir", str(state["node-a"]))
            assert waited.exit_code == 0 and "is drained" in waited.output, waited.output
            await eventually(lambda: _state(admin, "job-1", JobState.DONE), timeout=60, what="job-1 done")
            await eventually(lambda: _state(admin, "job-2", JobState.DONE), timeout=150, what="job-2 done")
            book = await job_book(admin)
            assert book.get("job-1").node_id == "node-a"  # type: ignore[union-attr]
            assert book.get("job-2").node_id == "node-b"  # type: ignore[union-attr]
            assert not any(e.spec.type is EventType.JOB_REFUSED for e in await events_of(admin))

            report = read_status(state["node-a"])
            assert report is not None and report.draining and report.jobs == ()
            shown = qvm_node("status", "--json", "--state-dir", str(state["node-a"]))
            assert shown.exit_code == 0, shown.output
            data = json.loads(shown.output)
            assert data["node_id"] == "node-a" and data["draining"] is True and data["jobs"] == []
            assert data["connected"] is True and data["registered_ns"] and data["last_heartbeat_ns"]

            # node-a back in the pool, node-b out of it: the next job can only go to node-a.
            assert qvm_node("drain", "--state-dir", str(state["node-b"])).exit_code == 0
            assert qvm_node("undrain", "--state-dir", str(state["node-a"])).exit_code == 0
            await eventually(lambda: _record(admin, "node-a", lambda r: not r.draining), what="node-a undrained")
            await eventually(lambda: _record(admin, "node-b", lambda r: r.draining), what="node-b draining")
            await market.publish(_job(1), job_id="job-3")
            await eventually(lambda: _state(admin, "job-3", JobState.DONE), timeout=150, what="job-3 done")
            assert (await job_book(admin)).get("job-3").node_id == "node-a"  # type: ignore[union-attr]
            report = read_status(state["node-a"])
            assert report is not None and not report.draining


async def _record(admin: Any, node: str, check: Any) -> bool:
    kv = await admin.js.key_value("qvm_nodes")
    try:
        entry = await kv.get(node)
    except Exception:  # not registered yet
        return False
    return bool(check(NodeRecord.model_validate(msgpack.unpackb(entry.value, raw=False))))


async def _has(admin: Any, job_id: str, etype: EventType) -> bool:
    return any(e.spec.type is etype for e in await events_of(admin, subject=f"qvm.jobs.{job_id}.>"))


async def _state(admin: Any, job_id: str, want: JobState) -> bool:
    view = (await job_book(admin)).get(job_id)
    return view is not None and view.state is want
