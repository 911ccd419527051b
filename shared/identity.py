"""Who is speaking on the bus: roles, identities, and the id formats that become subject tokens.

An identity is the NATS user (taken from the client certificate), the signer of events and the
`producer` in every envelope. Services are identified by their role alone (`scheduler`); node-agents
carry their node id (`node-agent.gpu-host-1`), which is how the bus and the codec keep one node from
speaking for another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import StringConstraints

__all__ = [
    "ID_PATTERN",
    "NODE_ID_PATTERN",
    "Identity",
    "JobId",
    "NodeId",
    "Role",
]

# Ids become NATS subject tokens: no dots, wildcards or whitespace, bounded length.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
NODE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_ID_RE = re.compile(ID_PATTERN)
_NODE_RE = re.compile(NODE_ID_PATTERN)

JobId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
NodeId = Annotated[str, StringConstraints(pattern=NODE_ID_PATTERN)]


class Role(StrEnum):
    """The parties allowed on the bus. Each service owns one lifecycle phase."""

    MARKETPLACE = "marketplace"  # publishes client jobs and cancellations
    SCHEDULER = "scheduler"
    NODE_AGENT = "node-agent"
    ATTESTATION_VERIFIER = "attestation-verifier"
    KEY_BROKER = "key-broker"
    JANITOR = "janitor"
    ADMIN = "admin"  # the operator's CLI: provisioning, status, audit (read side)


SERVICE_ROLES = (Role.SCHEDULER, Role.NODE_AGENT, Role.ATTESTATION_VERIFIER, Role.KEY_BROKER, Role.JANITOR)


@dataclass(frozen=True, slots=True)
class Identity:
    """A role, plus the node id for node-agents."""

    role: Role
    node_id: str | None = None

    def __post_init__(self) -> None:
        if (self.role is Role.NODE_AGENT) != (self.node_id is not None):
            raise ValueError("a node id is required for node-agents and only for them")
        if self.node_id is not None and not _NODE_RE.fullmatch(self.node_id):
            raise ValueError(f"invalid node id {self.node_id!r}")

    def __str__(self) -> str:
        return self.role.value if self.node_id is None else f"{self.role.value}.{self.node_id}"

    @property
    def token(self) -> str:
        """The identity as a single subject token / consumer name (no dots)."""
        return str(self).replace(".", "_")

    @classmethod
    def parse(cls, text: str) -> Identity:
        role_text, _, node = text.partition(".")
        try:
            role = Role(role_text)
        except ValueError:
            raise ValueError(f"unknown role in identity {text!r}") from None
        return cls(role, node or None)


def valid_id(text: str) -> bool:
    return bool(_ID_RE.fullmatch(text))
