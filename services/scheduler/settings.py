"""The scheduler's settings (`QVM_*`): the common ones, its consumer and sweep, and what it places on."""

from __future__ import annotations

from pydantic import Field

from shared.config import ConsumerSettings, SweepSettings
from shared.models import TrustState

__all__ = ["SchedulerSettings"]


class SchedulerSettings(ConsumerSettings, SweepSettings):
    min_trust: TrustState = Field(TrustState.TRUSTED, description="Lowest node trust the scheduler places on.")
    offline_after_s: float = Field(20.0, gt=0, description="A node silent this long is offline.")
