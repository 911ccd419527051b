"""A job's GPUs, from its claim to its VM and back to the pool.

    attach  each claimed GPU (by UUID, found in the node's NVML inventory): IOMMU isolation checked, the
            GPU and its group's functions bound to vfio-pci; the VMM gets their addresses
    detach  every binding given back to its host driver, then every claimed GPU's VRAM scrubbed through
            the CUDA driver API with evidence (`VramScrub`), also when the attach failed half-way or
            never happened: the evidence is what lets the scheduler list the GPU again

A GPU whose scrub fails or cannot run (no driver, a CUDA error) gets a `VramScrub` with verified=False
and the reason: the janitor's record then keeps it out of the pool.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

from services.node_agent.isolation.vfio import (
    Binding,
    Sysfs,
    VfioError,
    bind_vfio,
    check_isolation,
    leftover_vfio,
    pci_address,
    release,
    return_to_host,
)
from shared.errors import ReasonedError
from shared.models import GpuInfo, VramScrub
from shared.telemetry import get_logger

__all__ = ["GpuPassthrough", "Scrubber"]

log = get_logger("qvm.node_agent.gpus")
Scrubber = Callable[[str], VramScrub]


def _default_scrub(uuid: str) -> VramScrub:
    """In a fresh process: CUDA enumerates GPUs once per process (a GPU that was on vfio-pci at the agent's
    first cuInit would stay invisible), and a hung GPU or a fatal CUDA error must not take the agent down."""
    from services.node_agent.gpu.vram import scrub_vram_isolated

    return scrub_vram_isolated(uuid)


class GpuPassthrough:
    def __init__(self, inventory: Sequence[GpuInfo], sysfs: Sysfs | None = None,
                 scrub: Scrubber = _default_scrub) -> None:
        """`sysfs` and `scrub` are the hardware boundaries (a fixture tree and a fake libcuda in tests)."""
        self.gpus: Mapping[str, GpuInfo] = {g.uuid: g for g in inventory}
        self.sysfs = sysfs or Sysfs()
        self.scrub = scrub

    def check(self, uuids: Sequence[str]) -> None:
        """Could these GPUs be passed through now (known, isolated in their IOMMU group, a safe driver)?
        Raises `VfioError`; writes nothing (the agent's check before it accepts a job)."""
        for uuid in uuids:
            gpu = self.gpus.get(uuid)
            if gpu is None:
                raise VfioError("gpu_unknown", f"{uuid} is not in this node's inventory")
            check_isolation(gpu.pci_bus_id, self.sysfs)

    def attach(self, uuids: Sequence[str]) -> list[Binding]:
        """Bind each claimed GPU to vfio-pci (blocking: sysfs writes). All or nothing: on a refusal the
        GPUs already bound are given back before `VfioError` is raised."""
        bindings: list[Binding] = []
        try:
            for uuid in uuids:
                gpu = self.gpus.get(uuid)
                if gpu is None:
                    raise VfioError("gpu_unknown", f"{uuid} is not in this node's inventory")
                check_isolation(gpu.pci_bus_id, self.sysfs)
                bindings.append(bind_vfio(gpu.pci_bus_id, self.sysfs))
        except VfioError:
            for b in bindings:
                try:
                    release(b, self.sysfs)
                except VfioError as exc:
                    log.error("GPU not given back after a failed attach", extra={"reason": exc.reason})
            raise
        return bindings

    def detach(self, bindings: Sequence[Binding], uuids: Sequence[str]) -> tuple[VramScrub, ...]:
        """Give every binding back to its host driver, then scrub each claimed GPU (blocking)."""
        released_failed: dict[str, str] = {}
        for b in bindings:
            try:
                release(b, self.sysfs)
            except VfioError as exc:
                released_failed[b.gpu] = f"{exc.reason}: {exc.detail}"
        out = []
        for uuid in uuids:
            gpu = self.gpus.get(uuid)
            bus = gpu.pci_bus_id if gpu else ""
            failed = released_failed.get(pci_address(bus)) if bus else None
            if failed is not None:
                out.append(_unverified(uuid, bus, f"not given back to its host driver: {failed}"))
                continue
            try:
                out.append(self.scrub(uuid))
            except ReasonedError as exc:
                out.append(_unverified(uuid, bus, f"{exc.reason}: {exc.detail}"))
        return tuple(out)

    def reclaim_orphans(self, live: set[str]) -> tuple[VramScrub, ...]:
        """GPUs of this node still on vfio-pci that no live instance holds (an agent crashed mid-job): each
        given back to its host driver and scrubbed (blocking)."""
        out = []
        by_bdf = {pci_address(g.pci_bus_id): g for g in self.gpus.values() if g.pci_bus_id}
        for bdf in leftover_vfio(self.sysfs):
            gpu = by_bdf.get(bdf)
            if gpu is None or bdf in live:
                continue  # an audio function (goes with its GPU), a device not in the inventory, or in use
            try:
                return_to_host(bdf, self.sysfs)
            except VfioError as exc:
                out.append(_unverified(gpu.uuid, gpu.pci_bus_id, f"{exc.reason}: {exc.detail}"))
                continue
            for fn in leftover_vfio(self.sysfs):  # the rest of its group (the GPU's audio function)
                if fn.rsplit(".", 1)[0] == bdf.rsplit(".", 1)[0]:
                    with contextlib.suppress(VfioError):
                        return_to_host(fn, self.sysfs)
            try:
                out.append(self.scrub(gpu.uuid))
            except ReasonedError as exc:
                out.append(_unverified(gpu.uuid, gpu.pci_bus_id, f"{exc.reason}: {exc.detail}"))
        return tuple(out)


def _unverified(uuid: str, bus: str, why: str) -> VramScrub:
    return VramScrub(gpu_uuid=uuid, pci_bus_id=bus, method="none", bytes_total=0, bytes_scrubbed=0,
                     verified=False, duration_ms=0.0, rate_gbps=0.0, detail=why[:512])
