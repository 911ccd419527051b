"""11. Warm instances: assignment -> workload running, with a warm instance and with a cold boot, on the demo's
whole stack (nats-server, swtpm, the five services as processes, the verifier checking every instance quote).

The node-agent keeps one warm instance of the demo image (`QVM_WARM_POOL`). Each job (`true`, 1 vCPU, 256
MiB, no volume, no secrets) is submitted once the pool has a fresh one; its figure is the time from its
`job.placed` event to its `instance.running` event (both stamped by their producers on this host's clock):
the assignment, the TPM log's assignment entry, `instance.booted`, the attestation round trip (challenge,
quote, verification, verdict) and the agent's `instance.running`. Nothing is excluded. A job of another size
(384 MiB) then boots cold, for comparison.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import Figure, say, section
from shared.bus import Bus
from shared.cli.common import local_node_id
from shared.cli.stack import LocalStack
from shared.config import StackSettings
from shared.events import Domain, EventType, InstanceBooted, JobSubmitted, scope_filter
from shared.identity import Identity, Role
from shared.image.demo import DEMO_IMAGE, ensure_demo_image
from shared.models import HardwareProfile, TrustState
from shared.replay import fold_jobs

__all__ = ["run"]

TARGET_MS = 100.0
JOBS = 5


def _job(ram_mib: int = 256) -> JobSubmitted:
    return JobSubmitted(owner="bench", image=DEMO_IMAGE, command=("true",), max_runtime_s=300,
                        profile=HardwareProfile(cpu_cores=1, ram_mib=ram_mib))


def _ready_count(log: Path) -> int:
    try:
        return log.read_text(errors="replace").count("warm instance ready")
    except OSError:
        return 0


async def _wait(cond: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


async def _placed_to_running(admin: Bus, job_id: str) -> tuple[float, InstanceBooted]:
    async def ended() -> bool:
        book, _ = await fold_jobs(admin.js, admin.codec, scope_filter(Domain.JOBS, job_id))
        view = book.get(job_id)
        return view is not None and view.terminal
    await _wait(ended, 240, f"{job_id} to end")
    _, events = await fold_jobs(admin.js, admin.codec, scope_filter(Domain.JOBS, job_id))
    at = {e.spec.type: e.envelope.time_ns for e in events}
    if EventType.INSTANCE_RUNNING not in at:
        raise RuntimeError(f"{job_id} never ran: {[str(e.spec.type) for e in events]}")
    booted = next(e.payload for e in events if isinstance(e.payload, InstanceBooted))
    t0 = at[EventType.JOB_PLACED]
    steps = [f"{e.spec.type} +{(e.envelope.time_ns - t0) / 1e6:.0f}" for e in events
             if e.envelope.time_ns >= t0 and e.spec.type is not EventType.INSTANCE_OUTPUT]
    say(f"    {job_id}: " + ", ".join(steps)[:400])
    return (at[EventType.INSTANCE_RUNNING] - t0) / 1e6, booted


async def run(tmp: Path) -> list[Figure]:
    section("11. Warm instances: assignment -> workload running (demo stack, attested)", __doc__.split("\n\n")[1]
            .replace("\n", " ") if __doc__ else "")
    settings = StackSettings(state_dir=tmp / "stack")
    await asyncio.to_thread(ensure_demo_image, settings.images_path)
    os.environ["QVM_WARM_POOL"] = json.dumps([{"image": DEMO_IMAGE, "cpu_cores": 1, "ram_mib": 256, "count": 1}])
    node_id = local_node_id()
    stack = LocalStack(settings, node_id, TrustState.TRUSTED)
    warm: list[float] = []
    try:
        url = await stack.start()
        admin = await Bus.connect(url, stack.pki, Identity(Role.ADMIN))
        market = await Bus.connect(url, stack.pki, Identity(Role.MARKETPLACE))
        log = settings.state_dir / "logs" / "node-agent.log"
        try:
            for i in range(JOBS):
                async def ready(n: int = i + 1) -> bool:
                    return _ready_count(log) >= n
                await _wait(ready, 240, f"warm instance {i + 1}")
                await market.publish(_job(), job_id=f"warm-{i}")
                ms, booted = await _placed_to_running(admin, f"warm-{i}")
                if not booted.warm:
                    raise RuntimeError(f"warm-{i} was not served by a warm instance")
                warm.append(ms)
            await market.publish(_job(ram_mib=384), job_id="cold-0")
            cold, cold_booted = await _placed_to_running(admin, "cold-0")
        finally:
            await admin.close()
            await market.close()
    finally:
        os.environ.pop("QVM_WARM_POOL", None)
        await asyncio.to_thread(stack.stop)
    say(f"  warm: {', '.join(f'{x:.0f}' for x in warm)} ms; cold: {cold:.0f} ms (boot {cold_booted.boot_ms:.0f} ms)")
    figs = [
        Figure("assignment -> running, warm instance (p50)", statistics.median(warm), "ms", TARGET_MS,
               note=f"{JOBS} jobs, attested; max {max(warm):.0f} ms"),
        Figure("assignment -> running, cold boot", cold, "ms", note="same stack, a size the pool does not keep"),
    ]
    for f in figs:
        say(f.line())
    return figs
