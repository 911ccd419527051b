"""The NVML inventory against a fake NVML module (tests/framework/fake_gpu.py, the hardware boundary): every
optional query a GPU or driver may refuse becomes None / "unsupported", never an exception."""

from __future__ import annotations

import pynvml
import pytest

from services.node_agent import inventory
from services.node_agent.gpu import nvml as nvml_mod
from services.node_agent.gpu.nvml import read_inventory
from shared.models import GpuInfo, Inventory
from tests.framework.fake_gpu import FakeNvml, FakeNvmlGpu

H100 = FakeNvmlGpu()
V100 = FakeNvmlGpu(uuid="GPU-aaaaaaaa-0000-0000-0000-000000000001", name="Tesla V100-SXM2-32GB",
                   memory_total=32768 << 20, pci_bus_id="00000000:1A:00.0", compute_capability=(7, 0),
                   retired_pages={0: [0x1000, 0x2000], 1: [0x9000]}, retired_pending=1, remapped_rows=None,
                   mig=None)
CONSUMER = FakeNvmlGpu(uuid="GPU-bbbbbbbb-0000-0000-0000-000000000002", name="NVIDIA GeForce RTX 4090",
                       memory_total=24564 << 20, pci_bus_id="00000000:01:00.0", vbios=None, ecc=None,
                       retired_pages=None, retired_pending=None, remapped_rows=None, mig=None,
                       compute_capability=None)


def test_a_datacenter_gpu_reports_everything() -> None:
    nvml = FakeNvml([H100, FakeNvmlGpu(uuid="GPU-2", pci_bus_id="00000000:42:00.0", remapped_rows=(3, 1, 1, 0),
                                       mig=(1, 1), ecc=(0, 1))],
                    driver="550.54.15", cc_state=(2, 0, 0), cc_gpus_capable=True)
    a, b = read_inventory(nvml)
    assert a == GpuInfo(index=0, uuid=H100.uuid, name=H100.name, memory_mib=81559, pci_bus_id="00000000:41:00.0",
                        driver_version="550.54.15", vbios_version="96.00.74.00.01", compute_capability="9.0",
                        ecc_enabled=True, retired_pages=None, retired_pages_pending=None, remapped_rows=0,
                        remapped_rows_pending=False, remapped_rows_failure=False, mig_enabled=False, cc_mode="off")
    assert (b.index, b.remapped_rows, b.remapped_rows_pending, b.remapped_rows_failure) == (1, 4, True, False)
    assert b.mig_enabled is True and b.ecc_enabled is False
    assert nvml.inits == nvml.shutdowns == 1


def test_page_retirement_on_an_older_gpu() -> None:
    (g,) = read_inventory(FakeNvml([V100]))
    assert g.retired_pages == 3 and g.retired_pages_pending is True
    assert g.remapped_rows is None and g.remapped_rows_pending is None and g.remapped_rows_failure is None
    assert g.mig_enabled is None and g.compute_capability == "7.0"


def test_a_gpu_that_supports_nothing_optional_still_gets_listed() -> None:
    nvml = FakeNvml([CONSUMER], driver=None)
    (g,) = read_inventory(nvml)
    assert (g.uuid, g.name, g.memory_mib, g.pci_bus_id) == (CONSUMER.uuid, CONSUMER.name, 24564, "00000000:01:00.0")
    assert g.driver_version == "" and g.vbios_version == "" and g.compute_capability == ""
    assert g.ecc_enabled is None and g.retired_pages is None and g.retired_pages_pending is None
    assert g.remapped_rows is None and g.mig_enabled is None and g.cc_mode == "unsupported"
    assert nvml.inits == nvml.shutdowns == 1


@pytest.mark.parametrize(("capable", "state", "mode"), [
    (True, (2, 1, 0), "on"),
    (True, (2, 1, 1), "devtools"),
    (True, (2, 0, 0), "off"),
    (None, (2, 1, 0), "on"),  # capabilities query refused, state answered
    (False, (0, 0, 0), "unsupported"),  # GPUs not CC-capable
    (True, None, "unsupported"),  # state query refused
])
def test_confidential_computing_mode(capable: bool | None, state: tuple[int, int, int] | None, mode: str) -> None:
    (g,) = read_inventory(FakeNvml([H100], cc_state=state, cc_gpus_capable=capable))
    assert g.cc_mode == mode


def test_an_older_nvidia_ml_py_without_the_cc_bindings() -> None:
    nvml = FakeNvml([H100], cc_state=(2, 1, 0), cc_gpus_capable=True,
                    missing={"nvmlSystemGetConfComputeState", "nvmlSystemGetConfComputeCapabilities"})
    (g,) = read_inventory(nvml)
    assert g.cc_mode == "unsupported" and g.ecc_enabled is True


@pytest.mark.parametrize("error", [pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded,
                                   pynvml.NVMLError_NoPermission])
def test_no_driver_is_an_empty_inventory(error: type[pynvml.NVMLError]) -> None:
    nvml = FakeNvml([H100], init_error=error)
    assert read_inventory(nvml) == ()
    assert nvml.shutdowns == 0


def test_a_lost_gpu_is_left_out_and_the_rest_reported() -> None:
    nvml = FakeNvml([FakeNvmlGpu(uuid="GPU-lost", lost=True), V100])
    (g,) = read_inventory(nvml)
    assert g.index == 1 and g.uuid == V100.uuid
    assert nvml.inits == nvml.shutdowns == 1


def test_the_fake_speaks_pynvml() -> None:
    """Every NVML function the fake offers exists in pynvml under the same name, and the errors it raises
    are pynvml's own classes, so the production code cannot pass against the fake and fail on the module."""
    for name in dir(FakeNvml):
        if name.startswith("nvml"):
            assert callable(getattr(pynvml, name, None)), name
    assert FakeNvml.NVMLError is pynvml.NVMLError
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml = FakeNvml([CONSUMER])
        nvml.nvmlInit()
        nvml.nvmlDeviceGetEccMode(nvml.nvmlDeviceGetHandleByIndex(0))


def test_production_entry_points() -> None:
    assert inventory.nvml_gpus is nvml_mod.nvml_gpus
    gpus = inventory.nvml_gpus()  # real pynvml: empty on a machine without the NVIDIA driver
    assert isinstance(gpus, tuple) and all(isinstance(g, GpuInfo) for g in gpus)


def test_an_inventory_without_the_new_fields_still_validates() -> None:
    """An agent from before these fields sends only the five identity fields."""
    old = {"index": 0, "uuid": "GPU-x", "name": "NVIDIA H100", "memory_mib": 81559, "pci_bus_id": "00000000:41:00.0"}
    g = GpuInfo.model_validate(old)
    assert g.cc_mode == "unsupported" and g.ecc_enabled is None and g.driver_version == ""
    inv = Inventory(hostname="h", cpu_model="c", cpu_cores=1, ram_mib=1, gpus=(g,))
    assert Inventory.model_validate_json(inv.model_dump_json()) == inv
