"""Placement decisions as pure functions: filters, the pending reason, best fit."""

from __future__ import annotations

from services.scheduler.placement import Claim, NodeRecord, NodeStatus, NoFit, Placement, choose, with_claims
from shared.events import JobSubmitted
from shared.models import GpuRequest, HardwareProfile, ResourceClaim, SecurityLevel, TrustState
from tests.framework.flow import gpu_inventory


def job(gpus: int = 0, model: str | None = None, vram: int = 0, cores: int = 1, ram: int = 512,
        security: SecurityLevel = SecurityLevel.BASIC) -> JobSubmitted:
    return JobSubmitted(owner="o", image="i", security=security, profile=HardwareProfile(
        cpu_cores=cores, ram_mib=ram, gpus=GpuRequest(count=gpus, model=model, min_vram_mib=vram)))


def node(name: str, gpus: int = 8, trust: TrustState = TrustState.TRUSTED, **kw: object) -> NodeRecord:
    return NodeRecord(node_id=name, inventory=gpu_inventory(name, gpus=gpus), trust=trust, **kw)


def ordered(nodes: list[NodeRecord]) -> list[NodeRecord]:
    return sorted(nodes, key=lambda n: len(n.free_gpus()))


def test_filters_name_the_deepest_reason() -> None:
    assert choose([], job(), TrustState.TRUSTED) == NoFit("no_nodes", "no registered node is eligible")
    r = choose([node("a", trust=TrustState.UNVERIFIED)], job(), TrustState.TRUSTED)
    assert isinstance(r, NoFit) and r.reason == "untrusted"
    r = choose([node("a", status=NodeStatus.OFFLINE), node("b")], job(gpus=1, model="A100"), TrustState.TRUSTED)
    assert isinstance(r, NoFit) and r.reason == "no_matching_gpu" and "1 node(s) offline" in r.detail
    r = choose([node("a")], job(security=SecurityLevel.CONFIDENTIAL), TrustState.TRUSTED)
    assert isinstance(r, NoFit) and r.reason == "no_confidential_host"
    r = choose([node("a")], job(cores=1000), TrustState.TRUSTED)
    assert isinstance(r, NoFit) and r.reason == "no_capacity_cpu"
    r = choose([node("a")], job(gpus=1, vram=100_000), TrustState.TRUSTED)
    assert isinstance(r, NoFit) and r.reason == "no_matching_gpu"


def test_lower_minimum_trust_admits_unverified_nodes() -> None:
    r = choose([node("a", trust=TrustState.UNVERIFIED)], job(), TrustState.UNVERIFIED)
    assert isinstance(r, Placement) and r.node_id == "a"


def test_best_fit_packs_gpu_jobs_and_keeps_cpu_jobs_off_gpus() -> None:
    full = node("full")
    busy = with_claims(full, {f"j{i}": Claim(claim=ResourceClaim(cpu_cores=1, ram_mib=1, gpu_uuids=(f"GPU-full-{i}",)),
                                             attempt=0, submitted_id="x") for i in range(6)})
    nodes = ordered([node("empty"), busy, node("cpu-only", gpus=0)])
    r = choose(nodes, job(gpus=1), TrustState.TRUSTED)
    assert isinstance(r, Placement) and r.node_id == "full" and r.claim.gpu_uuids == ("GPU-full-6",)
    r = choose(nodes, job(), TrustState.TRUSTED)
    assert isinstance(r, Placement) and r.node_id == "cpu-only" and r.claim.gpu_uuids == ()


def test_claimed_gpus_are_not_offered_again_and_excluded_nodes_are_skipped() -> None:
    a = node("a", gpus=1)
    taken = with_claims(a, {"j": Claim(claim=ResourceClaim(cpu_cores=1, ram_mib=1, gpu_uuids=("GPU-a-0",)),
                                       attempt=0, submitted_id="x")})
    assert isinstance(choose([taken], job(gpus=1), TrustState.TRUSTED), NoFit)
    r = choose(ordered([node("b", gpus=1), node("c", gpus=1)]), job(gpus=1), TrustState.TRUSTED, excluded=["b"])
    assert isinstance(r, Placement) and r.node_id == "c"
