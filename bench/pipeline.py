"""Sign+publish+verify with producer and consumer in separate processes, as the services run.

The parent signs and publishes N events as `marketplace`; a child process (`python -m bench.pipeline`)
reads them as `admin` from QVM_JOBS while they arrive and verifies each with Codec.decode. The figure is
wall time from the first publish to the last verified event, divided by N.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import windowed
from bench.stack import BenchStack
from shared.bus import Bus
from shared.events import JobSubmitted
from shared.identity import Identity, Role
from shared.pki import Pki

__all__ = ["pipelined_us"]


async def pipelined_us(stack: BenchStack, payload: JobSubmitted, n: int, window: int) -> tuple[float, int]:
    """Returns (µs per event, events verified by the consumer process)."""
    result = stack.root / "pipeline-result.json"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "bench.pipeline", stack.server.url, str(stack.pki.root), str(n),
                             str(result)], env=env, stdin=subprocess.DEVNULL)
    try:
        while not (stack.root / "pipeline-result.json.ready").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"consumer exited with {proc.returncode}")
            await asyncio.sleep(0.05)
        market = await stack.bus(Role.MARKETPLACE)
        t0 = time.time()

        async def publish(i: int) -> None:
            await market.publish(payload, job_id=f"pipe-{i:05d}")

        await windowed(list(range(n)), publish, window)
        await asyncio.to_thread(proc.wait, 120)
        data = json.loads(result.read_text())
        return (data["last_verified"] - t0) / n * 1e6, int(data["verified"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _consume(url: str, pki_dir: str, n: int, out: Path) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    bus = await Bus.connect(url, Pki(Path(pki_dir)), Identity(Role.ADMIN))
    sub = await bus.js.pull_subscribe("qvm.jobs.*.submitted", stream="QVM_JOBS", config=ConsumerConfig(
        deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.NONE, inactive_threshold=30.0))
    Path(f"{out}.ready").write_text("1")
    verified, last = 0, 0.0
    deadline = time.monotonic() + 120
    while verified < n and time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(512, timeout=0.5)
        except Exception:  # nothing yet
            continue
        for m in msgs:
            bus.codec.decode(m.subject, m.data)
            verified += 1
        last = time.time()
    out.write_text(json.dumps({"verified": verified, "last_verified": last}))
    await bus.close()


if __name__ == "__main__":
    asyncio.run(_consume(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])))
