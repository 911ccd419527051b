"""The attestation verifier's settings (`QVM_*`): the common ones, its policy, consumer and sweep."""

from __future__ import annotations

from shared.config import ConsumerSettings, PolicySettings, SweepSettings

__all__ = ["VerifierSettings"]


class VerifierSettings(PolicySettings, ConsumerSettings, SweepSettings):
    """Nothing of its own: the policy file (`QVM_ATTEST_POLICY`), `QVM_MAX_INFLIGHT`, `QVM_SWEEP_INTERVAL_S`."""
