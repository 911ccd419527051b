"""Helpers to run services in-process against a test stack and to watch the job stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from shared.bus import Bus
from shared.codec import Event
from shared.events import STREAMS, Domain
from shared.lifecycle import JobBook
from shared.models import GpuInfo, Inventory
from shared.replay import fold_jobs, read_stream


def gpu_inventory(node: str, gpus: int = 8, cores: int = 64, ram_mib: int = 512 * 1024) -> Inventory:
    """A GPU host's inventory for tests: these machines have no GPU (fake at the NVML boundary)."""
    return Inventory(
        hostname=node, cpu_model="test cpu", cpu_cores=cores, ram_mib=ram_mib, vmms=("qemu-microvm",),
        gpus=tuple(GpuInfo(index=i, uuid=f"GPU-{node}-{i}", name="NVIDIA H100 80GB HBM3", memory_mib=81559,
                           pci_bus_id=f"0000:{i + 1:02x}:00.0") for i in range(gpus)),
    )


@contextlib.asynccontextmanager
async def running(*services: object) -> AsyncIterator[asyncio.Event]:
    """Run services' `run(stop)` as tasks; stop and await them on exit (re-raising a crash)."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in services]  # type: ignore[attr-defined]
    try:
        yield stop
        for t in tasks:
            if t.done():
                t.result()
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=15)
        for t in tasks:
            t.cancel()


async def events_of(admin: Bus, domain: Domain = Domain.JOBS, subject: str = ">") -> list[Event]:
    out = []
    async for batch in read_stream(admin.js, STREAMS[domain].name, subject):
        out += [admin.codec.decode(m.subject, m.data) for m in batch]
    return out


async def job_book(admin: Bus, strict: bool = True) -> JobBook:
    """The fold of the job stream; `strict` fails on an illegal transition (as the audit does)."""
    book, _ = await fold_jobs(admin.js, admin.codec, strict=strict)
    return book


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
