"""The attestation verifier's settings (`QVM_*`): the common ones, its policy, consumer and sweep."""

from __future__ import annotations

from pydantic import Field

from services.attestation_verifier.gpu_cc import GpuCcPolicy
from shared.config import ConsumerSettings, PolicySettings, SweepSettings

__all__ = ["NODE_GPU_POLICY", "VerifierSettings"]

NODE_GPU_POLICY = GpuCcPolicy(require_cc=False)
"""By default a GPU not in CC mode is reported, not failed (most hosts run basic micro VMs)."""


class VerifierSettings(PolicySettings, ConsumerSettings, SweepSettings):
    """The policy file (`QVM_ATTEST_POLICY`), `QVM_MAX_INFLIGHT`, `QVM_SWEEP_INTERVAL_S`, and what a node's GPU
    evidence must show (`QVM_GPU_CC`, JSON: require_cc, allow_rim_unavailable, rim_cache_dir)."""

    gpu_cc: GpuCcPolicy = Field(NODE_GPU_POLICY, description="GPU confidential-computing evidence checks.")
