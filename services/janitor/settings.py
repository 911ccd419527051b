"""The janitor's settings (`QVM_*`): the common ones, its sweep, and how long each phase may take."""

from __future__ import annotations

from pydantic import Field

from shared.config import SweepSettings

__all__ = ["JanitorSettings"]


class JanitorSettings(SweepSettings):
    deadline_pending_s: float = Field(3600, gt=0, description="Longest a job may wait for capacity.")
    deadline_placed_s: float = Field(60, gt=0, description="Longest a node may take to accept.")
    deadline_provisioning_s: float = Field(900, gt=0, description="Longest from accept to a running VM.")
    deadline_run_grace_s: float = Field(300, gt=0, description="Beyond a job's max_runtime_s before it is failed.")
    deadline_teardown_s: float = Field(300, gt=0, description="Longest from exit to a torn-down instance.")
