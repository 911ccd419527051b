"""The GPUs of this host as NVML reports them: identity, memory, driver and VBIOS, memory health (ECC, retired
pages, remapped rows), MIG and confidential-computing mode.

Why the health fields: a GPU with a failed row remap or pending page retirements holds memory it cannot
repair; the scheduler and operators should see that before a job lands on it, and the scrub evidence
(`VramScrub`) is only as good as the memory under it. Why the modes: MIG splits the GPU (a whole-GPU scrub
cannot see inside other instances) and CC "devtools" lifts the protections a confidential job relies on.

NVML does not support every query on every GPU and driver (page retirement is pre-Ampere, row remapping is
Ampere and later, CC is Hopper and later, a consumer card has no ECC). Each optional query that NVML refuses,
for whatever reason, yields None or "unsupported", never an exception: an inventory is still published. A
GPU whose identity (handle, UUID, name, memory, PCI id) cannot be read is left out and logged, since it
cannot be placed anyway.

`read_inventory(nvml)` takes the NVML module as a parameter, so tests pass a fake module at that boundary
(`tests/framework/fake_gpu.py`); `nvml_gpus()` is the production entry the node-agent calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from shared.models import GpuInfo
from shared.telemetry import get_logger

__all__ = ["CcMode", "cc_mode", "nvml_gpus", "nvml_session", "read_inventory", "text"]

log = get_logger("qvm.node_agent.gpu.nvml")

CcMode = Literal["on", "off", "devtools", "unsupported"]

# NVML enum values (nvml.h). Stable ABI values; named here so the fake NVML module need not carry them.
_FEATURE_ENABLED = 1  # nvmlEnableState_t NVML_FEATURE_ENABLED
_MIG_ENABLE = 1  # NVML_DEVICE_MIG_ENABLE
_RETIRE_SINGLE_BIT = 0  # NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
_RETIRE_DOUBLE_BIT = 1  # NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
_CC_GPUS_NOT_CAPABLE = 0  # NVML_CC_SYSTEM_GPUS_CC_NOT_CAPABLE
_CC_FEATURE_ENABLED = 1  # NVML_CC_SYSTEM_FEATURE_ENABLED
_CC_DEVTOOLS_ON = 1  # NVML_CC_SYSTEM_DEVTOOLS_MODE_ON


def nvml_gpus() -> tuple[GpuInfo, ...]:
    """GPUs as NVML reports them; empty when there is no NVIDIA driver on this host."""
    try:
        import pynvml
    except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
        return ()
    return read_inventory(pynvml)


def read_inventory(nvml: Any) -> tuple[GpuInfo, ...]:
    """Every GPU NVML can identify, with its optional fields filled where NVML supports them.

    `nvml` is the `pynvml` module or an object with the same functions and `NVMLError` class. Init and
    shutdown are balanced here; no NVML error escapes (no driver: an empty tuple, logged).
    """
    with nvml_session(nvml, "no GPUs reported") as up:
        if not up:
            return ()
        driver = text(_query(nvml, "system", "nvmlSystemGetDriverVersion"))
        mode = cc_mode(nvml)
        count = _query(nvml, "system", "nvmlDeviceGetCount")
        gpus = []
        for i in range(count or 0):
            gpu = _device(nvml, i, driver, mode)
            if gpu is not None:
                gpus.append(gpu)
        return tuple(gpus)


@contextlib.contextmanager
def nvml_session(nvml: Any, without: str) -> Iterator[bool]:
    """nvmlInit ... nvmlShutdown, balanced, no NVML error escaping: yields False (logged with `without`, what
    the caller does without it) when there is no NVML on this host."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        log.info(f"no NVML on this host; {without}", extra={"error": str(exc)[:200]})
        yield False
        return
    try:
        yield True
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:  # pragma: no cover - only after a driver fault mid-read
            log.warning("nvmlShutdown failed", extra={"error": str(exc)[:200]})


def _device(nvml: Any, index: int, driver: str, cc_mode: CcMode) -> GpuInfo | None:
    try:
        h = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = text(nvml.nvmlDeviceGetUUID(h))
        name = text(nvml.nvmlDeviceGetName(h))
        memory = int(nvml.nvmlDeviceGetMemoryInfo(h).total)
        pci = text(nvml.nvmlDeviceGetPciInfo(h).busId)
    except nvml.NVMLError as exc:
        log.warning("GPU left out of the inventory: NVML cannot identify it",
                    extra={"index": index, "error": str(exc)[:200]})
        return None
    where = f"gpu {index}"
    ecc = _query(nvml, where, "nvmlDeviceGetEccMode", h)
    remap = _query(nvml, where, "nvmlDeviceGetRemappedRows", h)
    mig = _query(nvml, where, "nvmlDeviceGetMigMode", h)
    cap = _query(nvml, where, "nvmlDeviceGetCudaComputeCapability", h)
    return GpuInfo(
        index=index, uuid=uuid[:96], name=name[:96], memory_mib=memory // (1 << 20), pci_bus_id=pci[:32],
        driver_version=driver[:32],
        vbios_version=text(_query(nvml, where, "nvmlDeviceGetVbiosVersion", h))[:32],
        compute_capability=f"{int(cap[0])}.{int(cap[1])}" if cap is not None else "",
        ecc_enabled=None if ecc is None else int(ecc[0]) == _FEATURE_ENABLED,
        retired_pages=_retired_pages(nvml, h, where),
        retired_pages_pending=_flag(_query(nvml, where, "nvmlDeviceGetRetiredPagesPendingStatus", h)),
        remapped_rows=None if remap is None else int(remap[0]) + int(remap[1]),
        remapped_rows_pending=None if remap is None else bool(remap[2]),
        remapped_rows_failure=None if remap is None else bool(remap[3]),
        mig_enabled=None if mig is None else int(mig[0]) == _MIG_ENABLE,
        cc_mode=cc_mode,
    )


def _retired_pages(nvml: Any, handle: Any, where: str) -> int | None:
    """Pages retired for either cause; None when the GPU does not do page retirement (Ampere and later)."""
    total = 0
    for cause in (_RETIRE_SINGLE_BIT, _RETIRE_DOUBLE_BIT):
        pages = _query(nvml, where, "nvmlDeviceGetRetiredPages", handle, cause)
        if pages is None:
            return None
        total += len(pages)
    return total


def cc_mode(nvml: Any) -> CcMode:
    """NVML's CC state is system-wide: GPUs not CC-capable, or a driver without the query, is unsupported."""
    caps = _query(nvml, "system", "nvmlSystemGetConfComputeCapabilities")
    if caps is not None and int(caps.gpusCaps) == _CC_GPUS_NOT_CAPABLE:
        return "unsupported"
    state = _query(nvml, "system", "nvmlSystemGetConfComputeState")
    if state is None:
        return "unsupported"
    if int(state.ccFeature) != _CC_FEATURE_ENABLED:
        return "off"
    return "devtools" if int(state.devToolsMode) == _CC_DEVTOOLS_ON else "on"


def _query(nvml: Any, where: str, name: str, *args: Any) -> Any:
    """`nvml.<name>(*args)`, or None when NVML refuses it (not supported, no permission, function missing in
    this driver, GPU lost) or this nvidia-ml-py lacks the binding: the field is then reported as unknown
    rather than failing the whole inventory."""
    fn = getattr(nvml, name, None)
    if fn is None:
        log.debug("NVML binding missing", extra={"where": where, "function": name})
        return None
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        log.debug("NVML query not available", extra={"where": where, "function": name, "error": str(exc)[:200]})
        return None


def _flag(v: Any) -> bool | None:
    return None if v is None else bool(int(v))


def text(v: Any) -> str:
    if v is None:
        return ""
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
