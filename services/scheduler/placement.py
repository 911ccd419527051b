"""Placement decisions, pure: which registered node can take a job, and what to reserve there.

Filters, in order (the first that rules out every node becomes the pending reason):
  online      the node's heartbeats are current
  draining    the node's hoster drains it (`qvm node drain`, said in its heartbeats): nothing new goes there
  trust       node trust >= the scheduler's minimum (default `trusted`)
  security    confidential jobs need a host with a CPU confidential-computing feature
  cpu / ram   free cores and RAM after existing claims
  gpu         enough free GPUs whose name contains the requested model and with enough memory

Packing policy (documented in the README): best fit. Among nodes that fit, prefer the one with the
fewest free GPUs left after the claim, then the fewest free cores, then the least free RAM, then the
node id. GPU-less jobs thus go to GPU-less (or already busy) nodes first, and whole GPU hosts stay free
for jobs that need many GPUs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from shared.events import JobSubmitted
from shared.models import ResourceClaim, SecurityLevel, TrustState
from shared.registry import Claim, NodeRecord, NodeStatus

__all__ = [
    "Claim", "NoFit", "NodeRecord", "NodeStatus", "Placement", "choose", "claim_still_fits", "fits", "with_claims",
]


@dataclass(frozen=True)
class Placement:
    node_id: str
    claim: ResourceClaim


@dataclass(frozen=True)
class NoFit:
    reason: str
    detail: str


_FILTER_ORDER = ("offline", "draining", "untrusted", "no_confidential_host", "no_capacity_cpu", "no_capacity_ram",
                 "no_matching_gpu")


def fits(node: NodeRecord, job: JobSubmitted, min_trust: TrustState, now_ns: int = 0) -> ResourceClaim | str:
    """The claim this node can make for the job, or the reason it cannot (`now_ns` 0: now)."""
    if node.status is not NodeStatus.ONLINE:
        return "offline"
    if node.draining:
        return "draining"
    if node.trust_at(now_ns or time.time_ns()).rank < min_trust.rank:
        return "untrusted"
    if job.security is SecurityLevel.CONFIDENTIAL and not node.inventory.confidential:
        return "no_confidential_host"
    p = job.profile
    if node.free_cpu() < p.cpu_cores:
        return "no_capacity_cpu"
    if node.free_ram() < p.ram_mib:
        return "no_capacity_ram"
    gpus: list[str] = []
    if p.gpus.count:
        want = (p.gpus.model or "").lower()
        ok = [g for g in node.free_gpus() if want in g.name.lower() and g.memory_mib >= p.gpus.min_vram_mib]
        if len(ok) < p.gpus.count:
            return "no_matching_gpu"
        gpus = [g.uuid for g in sorted(ok, key=lambda g: g.index)[: p.gpus.count]]
    # Built from validated inputs on the hot path: skip re-validation.
    return ResourceClaim.model_construct(cpu_cores=p.cpu_cores, ram_mib=p.ram_mib, gpu_uuids=tuple(gpus))


def choose(
    nodes: Iterable[NodeRecord],
    job: JobSubmitted,
    min_trust: TrustState,
    excluded: Iterable[str] = (),
    max_fitting: int = 16,
) -> Placement | NoFit:
    """Best-fit choice; `NoFit` names the deepest filter that ruled nodes out.

    `nodes` must come in ascending order of free GPUs (the registry keeps them bucketed so): the scan
    stops at the first bucket with a fit, and within it after `max_fitting` fitting nodes, which bounds
    the cost per decision on large fleets at the price of an approximate tie-break inside a bucket.
    """
    skip = set(excluded)
    now_ns = time.time_ns()
    fitting = 0
    best: tuple[tuple[int, int, int, str], Placement] | None = None
    reasons: dict[str, int] = {}
    considered = 0
    for node in nodes:
        if node.node_id in skip:
            continue
        considered += 1
        if best is not None and (fitting >= max_fitting
                                 or len(node.free_gpus()) - job.profile.gpus.count > best[0][0]):
            break
        got = fits(node, job, min_trust, now_ns)
        if isinstance(got, str):
            reasons[got] = reasons.get(got, 0) + 1
            continue
        fitting += 1
        key = (len(node.free_gpus()) - len(got.gpu_uuids), node.free_cpu() - got.cpu_cores,
               node.free_ram() - got.ram_mib, node.node_id)
        if best is None or key < best[0]:
            best = (key, Placement(node.node_id, got))
    if best is not None:
        return best[1]
    if not considered:
        return NoFit("no_nodes", "no registered node is eligible")
    # The deepest filter reached tells the client the most useful thing ("no GPU" beats "offline").
    reason = max(reasons, key=lambda r: (_FILTER_ORDER.index(r), reasons[r]))
    detail = ", ".join(f"{n} node(s) {r}" for r, n in sorted(reasons.items()))
    return NoFit(reason, detail)


def with_claims(node: NodeRecord, claims: dict[str, Claim], **changes: object) -> NodeRecord:
    """A copy of `node` with other claims (and fields); built fresh so no cached value goes stale."""
    fields = {name: getattr(node, name) for name in NodeRecord.model_fields}
    fields.update(changes)
    fields["claims"] = claims
    return NodeRecord.model_construct(**fields)


def claim_still_fits(node: NodeRecord, claim: ResourceClaim) -> bool:
    """Re-check a claim decided on an older view against the node's current record."""
    free = {g.uuid for g in node.free_gpus()}
    return (node.status is NodeStatus.ONLINE and not node.draining and node.trust is not TrustState.UNTRUSTED
            and node.free_cpu() >= claim.cpu_cores
            and node.free_ram() >= claim.ram_mib and set(claim.gpu_uuids) <= free)
