"""A job's GPUs on the node: health and isolation checked before a job is accepted, the scrub's failures
turned into evidence, GPUs left on vfio-pci by a crash given back and scrubbed (fixture sysfs, fake scrub)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.node_agent.gpu.cuda import CudaError
from services.node_agent.hardware_check import check_assignment
from services.node_agent.isolation.gpus import GpuPassthrough
from services.node_agent.isolation.vfio import VfioError, bind_vfio
from services.scheduler.placement import NodeRecord
from shared.events import JobPlaced, JobSubmitted
from shared.models import GpuInfo, Inventory, ResourceClaim, VramScrub
from tests.framework.sysfs import SysfsTree

GPU_A, GPU_B, BRIDGE = "0000:01:00.0", "0000:02:00.0", "0000:00:01.0"


def _gpu(uuid: str, bdf: str, **health: object) -> GpuInfo:
    return GpuInfo(index=0, uuid=uuid, name="NVIDIA H100", memory_mib=81559, pci_bus_id=f"0000{bdf}", **health)  # type: ignore[arg-type]


def _scrub(uuid: str) -> VramScrub:
    return VramScrub(gpu_uuid=uuid, method="cuda-memset-verify", bytes_total=1, bytes_scrubbed=1, verified=True,
                     duration_ms=1.0, rate_gbps=1.0)


def test_unhealthy_gpus_are_neither_listed_nor_accepted() -> None:
    good, bad = _gpu("GPU-good", GPU_A), _gpu("GPU-bad", GPU_B, remapped_rows_failure=True)
    inv = Inventory(hostname="n", cpu_model="c", cpu_cores=8, ram_mib=65536, gpus=(good, bad))
    assert [g.uuid for g in NodeRecord(node_id="n", inventory=inv).free_gpus()] == ["GPU-good"]
    placed = JobPlaced(node_id="n", attempt=0, claim=ResourceClaim(cpu_cores=1, ram_mib=1, gpu_uuids=("GPU-bad",)),
                       job=JobSubmitted(owner="o", image="i"))
    refusal = check_assignment(placed, inv, 65536, [])
    assert refusal is not None and refusal.reason == "gpu_unhealthy"
    pending = _gpu("GPU-p", GPU_A, retired_pages_pending=True)
    assert not pending.healthy and good.healthy


def test_isolation_is_checked_before_accepting(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path)
    tree.add_device(GPU_A, group=3)
    tree.add_device(GPU_B, group=4)
    tree.add_device(BRIDGE, vendor=0x8086, device=0x1234, pci_class=0x060400, driver="pcieport", group=4)
    gpus = GpuPassthrough((_gpu("GPU-a", GPU_A), _gpu("GPU-b", GPU_B)), sysfs=tree.sysfs(), scrub=_scrub)
    gpus.check(["GPU-a"])
    with pytest.raises(VfioError) as shared:
        gpus.check(["GPU-b"])
    assert shared.value.reason == "iommu_group_shared"
    with pytest.raises(VfioError) as unknown:
        gpus.check(["GPU-zzz"])
    assert unknown.value.reason == "gpu_unknown"
    assert tree.writes == []  # a check writes nothing


def test_attach_is_all_or_nothing_and_detach_reports_every_gpu(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path)
    tree.add_device(GPU_A, group=3)
    tree.add_device(GPU_B, group=None)  # IOMMU off for this one

    def failing_scrub(uuid: str) -> VramScrub:
        raise CudaError("no_libcuda", "libcuda.so.1 not found")

    gpus = GpuPassthrough((_gpu("GPU-a", GPU_A), _gpu("GPU-b", GPU_B)), sysfs=tree.sysfs(), scrub=failing_scrub)
    with pytest.raises(VfioError, match="iommu_off"):
        gpus.attach(["GPU-a", "GPU-b"])
    assert tree.driver_of(GPU_A) == "nvidia", "the GPU bound first was given back"
    bindings = gpus.attach(["GPU-a"])
    assert tree.driver_of(GPU_A) == "vfio-pci"
    (scrub,) = gpus.detach(bindings, ["GPU-a"])
    assert tree.driver_of(GPU_A) == "nvidia"
    assert not scrub.verified and scrub.detail.startswith("no_libcuda") and scrub.gpu_uuid == "GPU-a"


def test_a_gpu_left_on_vfio_by_a_crash_is_given_back_and_scrubbed(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path)
    tree.add_device(GPU_A, group=3)
    tree.add_device(GPU_B, group=4)
    bind_vfio(GPU_A, tree.sysfs())  # a job's binding, then the agent died
    bind_vfio(GPU_B, tree.sysfs())  # a live instance's binding
    gpus = GpuPassthrough((_gpu("GPU-a", GPU_A), _gpu("GPU-b", GPU_B)), sysfs=tree.sysfs(), scrub=_scrub)
    scrubs = gpus.reclaim_orphans(live={GPU_B})
    assert [s.gpu_uuid for s in scrubs] == ["GPU-a"] and scrubs[0].verified
    assert tree.driver_of(GPU_A) == "nvidia" and tree.driver_of(GPU_B) == "vfio-pci"
