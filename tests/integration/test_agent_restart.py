"""An attested node-agent killed with SIGKILL mid-job and restarted attests again and gets work again.

Issue #14: the killed agent's transient EK and AK stayed loaded in the TPM (swtpm, like a /dev/tpm0
without the kernel resource manager, never flushes objects of a dead client), so the restarted agent's
key creation failed with `out of memory for object contexts`; it never retried, stayed unverified, and
no job was placed on the node again. Here, every part real: nats-server, swtpm, QEMU, the verifier
requiring a TRUSTED node, the node-agent as its own process.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from services.attestation_verifier.service import Verifier
from services.janitor.service import Janitor
from services.scheduler.service import Scheduler
from shared.events import Domain, EventType, JobSubmitted, TeardownRecord
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from shared.tpm.policy_gen import local_policy
from shared.tpm.swtpm import Swtpm
from tests.framework.flow import agent_process, events_of, eventually, job_book, running, stop_process
from tests.framework.images import IMAGE, build_test_image
from tests.framework.stack import Stack

pytestmark = pytest.mark.nats


def _job(*command: str) -> JobSubmitted:
    return JobSubmitted(owner="alice", image=IMAGE, command=command, max_runtime_s=300,
                        profile=HardwareProfile(cpu_cores=1, ram_mib=256))


async def _verified_since(admin: Any, since_ns: int) -> bool:
    events = await events_of(admin, Domain.ATTESTATION, "qvm.attestation.node-a.verified")
    return any(e.envelope.time_ns >= since_ns for e in events)


async def _has(admin: Any, job_id: str, etype: EventType) -> bool:
    return any(e.spec.type is etype for e in await events_of(admin, subject=f"qvm.jobs.{job_id}.>"))


async def _state(admin: Any, job_id: str) -> JobState | None:
    view = (await job_book(admin)).get(job_id)
    return view.state if view is not None else None


async def _record(admin: Any, job_id: str) -> TeardownRecord | None:
    for e in await events_of(admin, Domain.TEARDOWN, f"qvm.teardown.{job_id}.record"):
        if isinstance(e.payload, TeardownRecord):
            return e.payload
    return None


async def test_killed_attested_agent_attests_again_and_runs_jobs(stack: Stack, swtpm: Swtpm, tmp_path: Path) -> None:
    images = tmp_path / "images"
    build_test_image(images)
    policy = tmp_path / "policy.json"
    policy.write_text(local_policy(images, ek_ca=swtpm.state.ek_ca).model_dump_json())
    settings = stack.settings.model_copy(update={
        "min_trust": TrustState.TRUSTED, "attest_policy": policy, "images_dir": images,
        "instances_dir": tmp_path / "instances", "sweep_interval_s": 0.3, "attest_interval_s": 3600.0,
        "attest_timeout_s": 60.0})
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")

    def start_agent() -> subprocess.Popen[bytes]:
        return agent_process(stack, tmp_path, QVM_TPM=swtpm.tcti, QVM_MIN_TRUST="trusted",
                             QVM_HEARTBEAT_INTERVAL_S="0.5", QVM_ATTEST_INTERVAL_S="3600",
                             QVM_ATTEST_TIMEOUT_S="60")

    def log_tail() -> str:
        return (tmp_path / "agent.log").read_text(errors="replace")[-3000:]

    services = (await Scheduler.create(await stack.bus("scheduler"), settings),
                Janitor(await stack.bus("janitor"), settings),
                await Verifier.create(await stack.bus("attestation-verifier"), settings))
    agent = start_agent()
    try:
        async with running(*services):
            await market.publish(_job("sleep", "60"), job_id="before-kill")
            try:
                await eventually(lambda: _has(admin, "before-kill", EventType.INSTANCE_RUNNING), timeout=180,
                                 what="the first job's VM to run, attested")
            except AssertionError:
                raise AssertionError(log_tail()) from None
            agent.send_signal(signal.SIGKILL)
            assert agent.wait(10) == -signal.SIGKILL

            restarted_ns = time.time_ns()
            agent = start_agent()
            try:
                await eventually(lambda: _verified_since(admin, restarted_ns), timeout=90,
                                 what="the restarted agent to attest again")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log_tail()}") from None

            # The killed agent's job: reclaimed by the restarted agent, ended, with a teardown record.
            async def old_ended() -> bool:
                return await _state(admin, "before-kill") in (JobState.DONE, JobState.FAILED) \
                    and await _record(admin, "before-kill") is not None
            await eventually(old_ended, timeout=120, what="the killed agent's job to end with a record")

            # And the node gets work again: a new job runs to done on it.
            await market.publish(_job("echo", "after the restart"), job_id="after-restart")

            async def new_done() -> bool:
                return await _state(admin, "after-restart") in (JobState.DONE, JobState.FAILED)
            try:
                await eventually(new_done, timeout=180, what="the job after the restart to end")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log_tail()}") from None
    finally:
        stop_process(agent)
    book = await job_book(admin)
    after = book.get("after-restart")
    assert after is not None and after.state is JobState.DONE, (after, log_tail())
    placed = [e for e in await events_of(admin, subject="qvm.jobs.after-restart.>")
              if e.spec.type is EventType.JOB_PLACED]
    assert placed and all(e.payload.node_id == "node-a" for e in placed)
    assert await _has(admin, "after-restart", EventType.INSTANCE_ATTESTED)
    record = await _record(admin, "before-kill")
    assert record is not None and record.outcome in ("done", "failed"), record
    # The way out: the restarted agent flushed what the killed one left in the TPM.
    assert "flushed handles an earlier process left in the TPM" in (tmp_path / "agent.log").read_text()
