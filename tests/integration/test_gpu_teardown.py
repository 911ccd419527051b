"""A GPU job from claim to pool, with a real micro VM, scheduler and janitor: the GPU is isolated and bound to
vfio-pci for the VM, given back to the host driver after it, its VRAM scrubbed and verified; only then is
it listed again. A scrub that does not verify keeps it out of the pool.

These machines have no GPU and no IOMMU, so the hardware boundaries are fakes, named as such: sysfs is a
fixture tree with a tiny "kernel" that moves drivers (tests/framework/sysfs.py), libcuda is FakeLibcuda
over a simulated device (tests/framework/fake_gpu.py), and the VMM launch drops the vfio-pci device it was
given (no host device to open) after recording it. The real paths are checked by deploy/gpu-check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from services.janitor.service import Janitor
from services.node_agent.gpu.cuda import format_uuid
from services.node_agent.gpu.vram import scrub_vram
from services.node_agent.isolation.gpus import GpuPassthrough
from services.node_agent.service import NodeAgent
from services.node_agent.vmm.base import LaunchSpec, VmProcess
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from services.scheduler.placement import NodeRecord
from services.scheduler.service import Scheduler
from shared.events import Domain, InstanceDestroyed, JobSubmitted, TeardownRecord
from shared.models import GpuInfo, GpuRequest, HardwareProfile, Inventory, TrustState
from tests.framework.fake_gpu import FakeDevice, FakeLibcuda
from tests.framework.flow import events_of, eventually, running
from tests.framework.images import IMAGE, build_test_image
from tests.framework.stack import Stack
from tests.framework.sysfs import SysfsTree

pytestmark = pytest.mark.nats

BDF = "0000:01:00.0"
WORD = (0xDEADBEEFCAFEF00D).to_bytes(8, "little")
SIZES = {"chunk_bytes": 4 << 20, "min_chunk_bytes": 256 << 10}


class NoIommuQemu(QemuMicrovm):
    """QEMU microvm, minus the one thing this machine cannot do: open a vfio-pci host device."""

    def __init__(self) -> None:
        super().__init__()
        self.given: list[tuple[str, ...]] = []

    async def launch(self, spec: LaunchSpec) -> VmProcess:
        self.given.append(spec.vfio_devices)
        spec = LaunchSpec(**{**spec.__dict__, "vfio_devices": ()})
        return await super().launch(spec)


def _skip_second_large_memset() -> Any:
    """A memset fault at the libcuda boundary: the second chunk's memset reports success and writes nothing."""
    seen = [0]

    def fault(ptr: int, nbytes: int, index: int) -> bool:
        if nbytes < 1 << 20:
            return False
        seen[0] += 1
        return seen[0] == 2
    return fault


async def _run(stack: Stack, tmp_path: Path, broken_memset: bool) -> tuple[Any, TeardownRecord, NodeRecord, Any]:
    build_test_image(tmp_path / "images")
    settings = stack.settings.model_copy(update={
        "min_trust": TrustState.UNVERIFIED, "images_dir": tmp_path / "images", "instances_dir": tmp_path / "instances",
        "sweep_interval_s": 0.3})
    tree = SysfsTree(tmp_path / "sys-root")
    tree.add_device(BDF, group=5)
    dev = FakeDevice(pci_bus_id=BDF)
    dev.fill_free(WORD)  # what a tenant's job leaves in VRAM
    gpu = GpuInfo(index=0, uuid=format_uuid(dev.uuid), name="NVIDIA H100 80GB HBM3", memory_mib=81559,
                  pci_bus_id="00000000:01:00.0")
    inventory = Inventory(hostname="node-a", cpu_model="test", cpu_cores=4, ram_mib=8192, gpus=(gpu,),
                          vmms=("qemu-microvm",))

    def scrub(uuid: str) -> Any:
        lib = FakeLibcuda([dev], fault_memset=_skip_second_large_memset() if broken_memset else None)
        return scrub_vram(uuid, lib=lib, **SIZES)

    vmm = NoIommuQemu()
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    agent = NodeAgent(await stack.bus("node-agent", "node-a"), settings, inventory=inventory,
                      read_gpus=lambda: (gpu,), vmm=vmm,
                      gpus=GpuPassthrough((gpu,), sysfs=tree.sysfs(), scrub=scrub))
    job = JobSubmitted(owner="alice", image=IMAGE, command=("true",), max_runtime_s=300,
                       profile=HardwareProfile(cpu_cores=1, ram_mib=256, gpus=GpuRequest(count=1, model="H100")))
    async with running(await Scheduler.create(await stack.bus("scheduler"), settings), agent,
                       Janitor(await stack.bus("janitor"), settings)):
        await market.publish(job, job_id="gpu-job")

        async def recorded() -> bool:
            return any(isinstance(e.payload, TeardownRecord) for e in await events_of(admin, Domain.TEARDOWN))
        await eventually(recorded, timeout=180, what="the teardown record")
        record = next(e.payload for e in await events_of(admin, Domain.TEARDOWN)
                      if isinstance(e.payload, TeardownRecord))

        async def node() -> NodeRecord:
            entry = await (await admin.js.key_value("qvm_nodes")).get("node-a")
            return NodeRecord.model_validate(msgpack.unpackb(entry.value, raw=False))

        async def settled() -> bool:
            return not (await node()).claims
        await eventually(settled, what="the claim released")
        destroyed = next(e.payload for e in await events_of(admin, subject="qvm.jobs.gpu-job.>")
                         if isinstance(e.payload, InstanceDestroyed))
        rec = await node()
    assert vmm.given == [(BDF,)], "the VMM was handed the GPU bound to vfio-pci"
    assert tree.driver_of(BDF) == "nvidia", "the GPU went back to its host driver"
    return destroyed, record, rec, dev


async def test_a_gpu_is_listed_again_only_after_its_verified_scrub(stack: Stack, tmp_path: Path) -> None:
    destroyed, record, node, dev = await _run(stack, tmp_path, broken_memset=False)
    (scrub,) = destroyed.gpus
    assert scrub.verified and scrub.bytes_scrubbed > 0 and scrub.gpu_uuid == record.gpus_clean[0]
    assert dev.count_physical(WORD) == 0, "the tenant's VRAM contents are gone"
    assert record.complete and record.gpus_quarantined == ()
    assert {s.name.split(":")[0]: s.status for s in record.steps}["vram"] == "ok"
    assert node.scrubbing == {} and [g.uuid for g in node.free_gpus()] == [scrub.gpu_uuid]


async def test_a_scrub_that_does_not_verify_keeps_the_gpu_out(stack: Stack, tmp_path: Path) -> None:
    destroyed, record, node, dev = await _run(stack, tmp_path, broken_memset=True)
    (scrub,) = destroyed.gpus
    assert not scrub.verified and scrub.detail
    assert dev.count_physical(WORD) > 0, "the fault really left data behind"
    assert not record.complete and record.gpus_quarantined == (scrub.gpu_uuid,) and record.gpus_clean == ()
    assert node.scrubbing == {scrub.gpu_uuid: "gpu-job"} and node.free_gpus() == ()
