"""kill -9 of each service once, mid-job, on the supervised stack `qvm up` runs (every service its own process,
restarted with back-off by `LocalStack.supervise_once`), with a second replica of each stateless service
(scheduler, attestation-verifier, key-broker) running beside the first: every job ends done or failed with a
complete teardown record, no job's key outlives it, a new job then reaches done on the same node, and the
audit replay is clean."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.cli.stack import SERVICE_MODULES, Child, LocalStack
from shared.config import StackSettings
from shared.events import Domain, EventType, JobSubmitted, TeardownRecord
from shared.identity import Identity, Role
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from tests.framework.flow import audited, events_of, eventually, job_book
from tests.framework.images import IMAGE, build_test_image

pytestmark = [pytest.mark.nats, pytest.mark.timeout(600)]
STATELESS = ("scheduler", "attestation-verifier", "key-broker")
NODE = "node-k"


@contextlib.asynccontextmanager
async def supervised(stack: LocalStack) -> AsyncIterator[None]:
    """`qvm up`'s loop: restart what died."""
    done = asyncio.Event()

    async def loop() -> None:
        while not done.is_set():
            stack.supervise_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.3)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        done.set()
        await task


async def _terminal(admin: Bus, job: str) -> JobState | None:
    view = (await job_book(admin, strict=False)).get(job)
    return view.state if view is not None and view.terminal else None


async def _record(admin: Bus, job: str) -> TeardownRecord | None:
    found = await events_of(admin, Domain.TEARDOWN, f"qvm.teardown.{job}.record")
    return found[0].payload if found else None  # type: ignore[return-value]


async def test_each_service_killed_mid_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"QVM_NODE_DOCTOR": "off", "QVM_HEARTBEAT_INTERVAL_S": "0.5", "QVM_SWEEP_INTERVAL_S": "0.5",
                       "QVM_OFFLINE_AFTER_S": "30", "QVM_ATTEST_INTERVAL_S": "3600"}.items():
        monkeypatch.setenv(key, value)
    settings = StackSettings(state_dir=tmp_path / "state", pki_dir=tmp_path / "state" / "pki")
    build_test_image(settings.images_path)  # before start: the verifier's policy approves what is there
    stack = LocalStack(settings, NODE, TrustState.TRUSTED)
    url = await stack.start()
    for name in STATELESS:  # a second replica of each stateless service
        child = Child(f"{name}-2", SERVICE_MODULES[name], settings.state_dir / "logs" / f"{name}-2.log")
        stack._spawn(child, url)
        stack.children.append(child)
    admin = await Bus.connect(url, stack.pki, Identity(Role.ADMIN))
    market = await Bus.connect(url, stack.pki, Identity(Role.MARKETPLACE))
    try:
        async with supervised(stack):
            for target in ("scheduler", "attestation-verifier", "key-broker", "janitor", "node-agent"):
                job = f"kill-{target}"
                await market.publish(JobSubmitted(owner="alice", image=IMAGE, command=("sleep", "4"), max_runtime_s=300,
                                                  volume_mib=16, profile=HardwareProfile(cpu_cores=1, ram_mib=256)),
                                     job_id=job)

                async def running(job: str = job) -> bool:
                    return any(e.spec.type is EventType.INSTANCE_RUNNING
                               for e in await events_of(admin, subject=f"qvm.jobs.{job}.>"))

                await eventually(running, timeout=240, what=f"{job} running")
                victim = next(c for c in stack.children if c.name == target)
                assert victim.proc is not None
                os.kill(victim.proc.pid, signal.SIGKILL)

                async def ended(job: str = job) -> bool:
                    return await _terminal(admin, job) is not None and await _record(admin, job) is not None

                await eventually(ended, timeout=240, what=f"{job} ended with a teardown record")
                record = await _record(admin, job)
                assert record is not None and record.complete, (job, record)
                assert victim.last_exit == -signal.SIGKILL and victim.restarts >= 1

            # After all that, the same node still takes and finishes work (it attested again after its kill).
            await market.publish(JobSubmitted(owner="alice", image=IMAGE, command=("true",), max_runtime_s=300,
                                              profile=HardwareProfile(cpu_cores=1, ram_mib=256)), job_id="after")

            async def after_done() -> bool:
                return await _terminal(admin, "after") is JobState.DONE

            await eventually(after_done, timeout=300, what="a new job done after the kills")

        book = await job_book(admin)
        assert all(v.node_id == NODE or v.node_id is None for v in book.jobs.values())
        destroyed = {e.job_id for e in await events_of(admin, Domain.KEYS, "qvm.keys.*.destroyed")}
        assert {f"kill-{t}" for t in ("scheduler", "attestation-verifier", "key-broker", "janitor", "node-agent")
                } <= destroyed, "every job's key was destroyed"
        report = await audited(admin, stack.pki)
        assert report.ok, report.violations
    finally:
        await admin.close()
        await market.close()
        await asyncio.to_thread(stack.stop)
