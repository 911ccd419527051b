"""The node's own check of an assignment: does this host really have what the scheduler reserved?

The scheduler decides from registered inventory; the agent re-checks against the live machine (RAM
available now, GPUs present now) minus what its accepted jobs already hold, so a stale registry or a
lying peer cannot overcommit the host. A claimed GPU must also be healthy now (NVML) and isolable for
passthrough (its IOMMU group, checked by the agent through `isolation.gpus`), else the job goes elsewhere.
A confidential job needs a host that proved it can start a confidential VM (its live inventory).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.events import JobPlaced
from shared.models import Inventory, ResourceClaim, SecurityLevel

__all__ = ["Refusal", "check_assignment"]


@dataclass(frozen=True)
class Refusal:
    reason: str
    detail: str


def check_assignment(
    placed: JobPlaced, live: Inventory, mem_available_mib: int, held: Iterable[ResourceClaim]
) -> Refusal | None:
    held = list(held)
    claim = placed.claim
    if placed.job.security is SecurityLevel.CONFIDENTIAL and not live.confidential:
        return Refusal("no_confidential_vm", "the job needs a confidential VM (SEV-SNP or TDX); this host cannot "
                                             "start one")
    cores_free = live.cpu_cores - sum(c.cpu_cores for c in held)
    if claim.cpu_cores > cores_free:
        return Refusal("insufficient_cpu", f"needs {claim.cpu_cores} cores, {cores_free} free")
    ram_free = min(live.ram_mib - sum(c.ram_mib for c in held), mem_available_mib)
    if claim.ram_mib > ram_free:
        return Refusal("insufficient_ram", f"needs {claim.ram_mib} MiB, {ram_free} MiB available")
    present = {g.uuid for g in live.gpus}
    missing = [u for u in claim.gpu_uuids if u not in present]
    if missing:
        return Refusal("gpu_missing", f"{len(missing)} claimed GPU(s) not present on this host")
    busy = {u for c in held for u in c.gpu_uuids} & set(claim.gpu_uuids)
    if busy:
        return Refusal("gpu_busy", f"{len(busy)} claimed GPU(s) already held by another job")
    sick = [g.uuid for g in live.gpus if g.uuid in claim.gpu_uuids and not g.healthy]
    if sick:
        return Refusal("gpu_unhealthy", f"{len(sick)} claimed GPU(s) have failed or pending memory row remaps or "
                                        "page retirements (NVML): they need a reset or repair first")
    return None
