"""Warm instances with real parts (nats-server, swtpm, QEMU microvm under TCG, the verifier): a node keeps one
micro VM of the image's size booted with no job; a job of that shape takes it, is attested for it (the TPM log
binds the job to that launch and key) and runs; the pool boots a fresh one; no warm instance serves two jobs;
a job of another shape boots its own; everything is torn down, the pool too when the agent stops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.attestation_verifier.service import Verifier
from services.janitor.service import Janitor
from services.node_agent.service import NodeAgent
from services.node_agent.settings import WarmPoolEntry
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from services.scheduler.service import Scheduler
from shared.client.output import new_output_key, open_output_events, with_output_key
from shared.events import EventType, InstanceBooted, JobSubmitted
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from shared.tpm.policy_gen import local_policy
from shared.tpm.swtpm import Swtpm
from tests.framework.flow import attested_agent, events_of, eventually, job_book, running
from tests.framework.images import IMAGE, build_test_image
from tests.framework.stack import Stack

pytestmark = pytest.mark.nats
OUTPUT_KEY = new_output_key()


def _job(ram_mib: int = 256) -> JobSubmitted:
    return with_output_key(JobSubmitted(owner="alice", image=IMAGE, command=("sh", "-c", "echo hello from $(hostname)"),
                                        max_runtime_s=300, profile=HardwareProfile(cpu_cores=1, ram_mib=ram_mib)),
                           OUTPUT_KEY)


async def _ended(admin: Any, job_id: str) -> Any:
    async def done() -> bool:
        view = (await job_book(admin)).get(job_id)
        return view is not None and view.terminal
    await eventually(done, timeout=240, what=f"{job_id} to end")
    return (await job_book(admin)).get(job_id), await events_of(admin, subject=f"qvm.jobs.{job_id}.>")


def _booted(events: list[Any]) -> InstanceBooted:
    return next(e.payload for e in events if e.spec.type is EventType.INSTANCE_BOOTED)


async def test_a_warm_instance_serves_one_job_attested_and_the_pool_refills(stack: Stack, swtpm: Swtpm,
                                                                              tmp_path: Path) -> None:
    build_test_image(tmp_path / "images")
    (tmp_path / "policy.json").write_text(local_policy(tmp_path / "images", ek_ca=swtpm.state.ek_ca).model_dump_json())
    log = tmp_path / "measurements.jsonl"
    settings = stack.settings.model_copy(update={
        "images_dir": tmp_path / "images", "instances_dir": tmp_path / "instances", "tpm": swtpm.tcti,
        "attest_policy": tmp_path / "policy.json", "measurement_log": log, "min_trust": TrustState.TRUSTED,
        "attest_interval_s": 3600.0, "attest_timeout_s": 60.0,
        "warm_pool": (WarmPoolEntry(image=IMAGE, cpu_cores=1, ram_mib=256, count=1),)})
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    agent: NodeAgent = await attested_agent(stack, settings, vmm=QemuMicrovm(accel=settings.vm_accel), cores=2)
    assert agent.runtime is not None and agent.runtime.pool is not None
    pool = agent.runtime.pool

    async def one_warm(not_this: str = "") -> str:
        async def ready() -> bool:
            return pool.ready == 1 and not_this not in pool.instance_ids()
        await eventually(ready, timeout=180, what="a (fresh) warm instance")
        return next(iter(pool.instance_ids()))

    async with running(agent, await Verifier.create(await stack.bus("attestation-verifier"), settings),
                       await Scheduler.create(await stack.bus("scheduler"), settings),
                       Janitor(await stack.bus("janitor"), settings)):
        first = await one_warm()
        await market.publish(_job(), job_id="warm-a")
        view_a, events_a = await _ended(admin, "warm-a")
        second = await one_warm(not_this=first)
        await market.publish(_job(), job_id="warm-b")
        view_b, events_b = await _ended(admin, "warm-b")
        await market.publish(_job(ram_mib=384), job_id="cold-c")  # no warm instance of this size
        view_c, events_c = await _ended(admin, "cold-c")
    for view in (view_a, view_b, view_c):
        assert view.state is JobState.DONE and view.exit_code == 0, (view.state, view.reason)
    booted_a, booted_b, booted_c = _booted(events_a), _booted(events_b), _booted(events_c)
    assert (booted_a.instance_id, booted_b.instance_id) == (first, second) and first != second
    assert booted_a.warm and booted_b.warm and not booted_c.warm and booted_c.instance_id.startswith("i-")
    assert booted_a.breakdown is not None and booted_a.kernel.endswith("-qvm")  # qvm's minimal kernel
    for events in (events_a, events_b, events_c):  # each attested for its own job, then ran
        types = [e.spec.type for e in events]
        assert types.index(EventType.INSTANCE_ATTESTED) < types.index(EventType.INSTANCE_RUNNING)
        assert open_output_events(events, events[0].job_id, OUTPUT_KEY).data.startswith(b"hello from")
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assigned = [(e["instance_id"], e["job_id"]) for e in entries if e["kind"] == "assignment"]
    assert assigned == [(first, "warm-a"), (second, "warm-b")]
    warm_launches = [e["instance_id"] for e in entries if e["kind"] == "instance" and not e["job_id"]]
    assert {first, second} <= set(warm_launches)
    assert not any((tmp_path / "instances").iterdir()), "the pool's instance was torn down with the agent"
