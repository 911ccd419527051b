"""Every service's settings in one object, for tests that run several services in one process.

`running_stack` builds one `AllSettings`, and tests hand it (or a `model_copy(update=...)` of it) to any
service: it is a subclass of each service's own settings class. Services themselves load only theirs.
"""

from __future__ import annotations

from services.attestation_verifier.settings import VerifierSettings
from services.janitor.settings import JanitorSettings
from services.key_broker.settings import KeyBrokerSettings
from services.node_agent.settings import NodeAgentSettings
from services.scheduler.settings import SchedulerSettings
from shared.config import StackSettings

__all__ = ["AllSettings"]


class AllSettings(SchedulerSettings, JanitorSettings, VerifierSettings, KeyBrokerSettings, NodeAgentSettings,
                  StackSettings):
    """The union of every service's fields (each defined once, in its own class or in `shared.config`)."""
