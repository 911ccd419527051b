"""The node registry's record (KV bucket `qvm_nodes`): what the scheduler knows of each node, and what the
operator's `qvm nodes` shows. The scheduler alone writes it (`services/scheduler/registry.py`, compare-and-
set); placement reads it. It lives in shared because a reader outside the scheduler (the CLI) decodes it.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cached_property

from pydantic import Field

from shared.models import Frozen, GpuInfo, Inventory, ResourceClaim, TrustState

__all__ = ["Claim", "NodeRecord", "NodeStatus"]


class NodeStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class Claim(Frozen):
    """A reservation on a node. The job's spec is not copied here (records stay small); a re-placement
    after a refusal reads it back from the job stream by `submitted_id`'s subject."""

    claim: ResourceClaim
    attempt: int = Field(ge=0)
    submitted_id: str
    excluded: tuple[str, ...] = ()


class NodeRecord(Frozen):
    """One node's entry in the registry KV bucket."""

    node_id: str
    inventory: Inventory
    agent_version: str = ""
    trust: TrustState = TrustState.UNVERIFIED
    trust_since_ns: int = Field(0, description="Time of the attestation result that set `trust`.")
    trust_expires_ns: int = Field(0, description="A `trusted` node is only `unverified` after this (0: never).")
    status: NodeStatus = NodeStatus.ONLINE
    draining: bool = Field(False, description="The node's last heartbeat said its hoster drains it: placement "
                                              "skips it; what it runs finishes there.")
    last_seen_ns: int = 0
    last_event_id: str = ""
    claims: dict[str, Claim] = Field(default_factory=dict)
    scrubbing: dict[str, str] = Field(default_factory=dict, description="GPU UUID -> the job that used it: not "
                                      "listed again until that job's teardown record shows it scrubbed.")

    # Records are immutable, so what is free is computed once per record.
    @cached_property
    def _free(self) -> tuple[int, int, tuple[GpuInfo, ...]]:
        cpu = self.inventory.cpu_cores - sum(c.claim.cpu_cores for c in self.claims.values())
        ram = self.inventory.ram_mib - sum(c.claim.ram_mib for c in self.claims.values())
        used = {u for c in self.claims.values() for u in c.claim.gpu_uuids} | set(self.scrubbing)
        return cpu, ram, tuple(g for g in self.inventory.gpus if g.uuid not in used and g.healthy)

    def trust_at(self, now_ns: int) -> TrustState:
        """Trust as of `now_ns`: a verified result that expired proves nothing any more."""
        if self.trust is TrustState.TRUSTED and self.trust_expires_ns and now_ns > self.trust_expires_ns:
            return TrustState.UNVERIFIED
        return self.trust

    def free_cpu(self) -> int:
        return self._free[0]

    def free_ram(self) -> int:
        return self._free[1]

    def free_gpus(self) -> tuple[GpuInfo, ...]:
        return self._free[2]
