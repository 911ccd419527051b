"""Helpers to run services in-process (or a node-agent as its own process) against a test stack and to
watch the job stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from services.node_agent.service import NodeAgent, attester_for
from services.node_agent.settings import NodeAgentSettings
from services.node_agent.vmm.base import Vmm
from shared.audit import AuditReport, AuditWorkers, audit_replay
from shared.bus import Bus
from shared.codec import Event
from shared.errors import BusError
from shared.events import STREAMS, Domain
from shared.lifecycle import JobBook
from shared.models import GpuInfo, Inventory
from shared.pki import Pki
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


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM (a service's clean stop), then SIGKILL if it has not ended within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def audited(admin: Bus, pki: Pki) -> AuditReport:
    """`qvm audit replay` over every stream, in this process (one shard)."""
    workers = AuditWorkers(pki.trust_bundle.read_bytes(), pki.ca_cert.read_bytes(), workers=0)
    try:
        return await audit_replay(admin.js, workers)
    finally:
        workers.close()


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    """Until `cond()` holds. A bus error while asking (a read during a NATS server's failover) counts as "not
    yet"; the last one is shown if time runs out."""
    deadline = time.monotonic() + timeout
    last: BusError | None = None
    while time.monotonic() < deadline:
        try:
            if await cond():
                return
        except BusError as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last bus error: {last})" if last else ""))


async def attested_agent(stack: Any, settings: NodeAgentSettings, node: str = "node-a", vmm: Vmm | None = None,
                         cores: int = 4) -> NodeAgent:
    """A node-agent with the TPM `settings.tpm` names (it enrolls and quotes), no GPUs, optionally a VMM."""
    bus = await stack.bus("node-agent", node)
    return NodeAgent(bus, settings, inventory=gpu_inventory(node, gpus=0, cores=cores, ram_mib=4096),
                     read_gpus=lambda: (), vmm=vmm, attester=attester_for(bus, settings))


def agent_process(stack: Any, tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    """`python -m services.node_agent` for node-a as a process of its own (to kill and restart it), with the
    test's images and instances directories; `env` adds QVM_* settings. Its stderr goes to agent.log."""
    full = {**os.environ, "QVM_NATS_URL": stack.url, "QVM_PKI_DIR": str(stack.pki.root),
            "QVM_STATE_DIR": str(tmp_path), "QVM_NODE_ID": "node-a", "QVM_MIN_TRUST": "unverified",
            "QVM_IMAGES_DIR": str(tmp_path / "images"), "QVM_INSTANCES_DIR": str(tmp_path / "instances"), **env}
    with open(tmp_path / "agent.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "services.node_agent"], env=full,
                                stdout=subprocess.DEVNULL, stderr=log)
