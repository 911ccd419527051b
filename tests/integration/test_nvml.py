"""The real NVML path: runs where an NVIDIA driver is present (GPU hosts, the device check), skips here."""

from __future__ import annotations

import pytest

from services.node_agent.inventory import HostReader, nvml_gpus
from services.node_agent.service import NodeAgent
from shared.events import HardwareProfile, JobSubmitted
from shared.lifecycle import JobState
from shared.models import GpuRequest, TrustState
from tests.framework.flow import events_of, eventually, job_book, running

GPUS = nvml_gpus()
pytestmark = [pytest.mark.nats,
              pytest.mark.skipif(not GPUS, reason="no NVIDIA driver (NVML) on this machine")]


def test_inventory_reads_real_gpus() -> None:
    inv = HostReader().inventory()
    assert inv.gpus == GPUS
    for g in inv.gpus:
        assert g.uuid.startswith("GPU-") and g.memory_mib > 1024 and g.name
        assert g.pci_bus_id.count(":") == 2, g.pci_bus_id


async def test_gpu_job_is_accepted_on_the_real_gpu(stack) -> None:
    from services.scheduler.service import Scheduler

    settings = stack.settings.model_copy(update={"min_trust": TrustState.UNVERIFIED})
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    agent = NodeAgent(await stack.bus("node-agent", "node-a"), settings)  # real NVML inventory
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    job = JobSubmitted(owner="o", image="i", profile=HardwareProfile(
        cpu_cores=1, ram_mib=256, gpus=GpuRequest(count=1, min_vram_mib=GPUS[0].memory_mib // 2)))
    async with running(sched, agent):
        await market.publish(job, job_id="gpu-1")

        async def accepted() -> bool:
            view = (await job_book(admin)).get("gpu-1")
            return view is not None and view.state is JobState.PROVISIONING
        await eventually(accepted, what="acceptance on the real GPU")
    placed = next(e for e in await events_of(admin) if str(e.spec.type) == "job.placed")
    assert placed.payload.claim.gpu_uuids[0] in {g.uuid for g in GPUS}
