"""`python -m services.node_agent`: the agent a hoster installs (one per host)."""

import re
import socket

from services.node_agent.service import NodeAgent
from shared.config import Settings
from shared.identity import Identity, Role
from shared.runtime import serve


def node_identity(settings: Settings) -> Identity:
    node = settings.node_id or re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:63]
    return Identity(Role.NODE_AGENT, node)


if __name__ == "__main__":
    serve("node-agent", node_identity, NodeAgent.create)
