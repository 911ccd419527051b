"""`python -m services.node_agent`: the agent a hoster installs (one per host)."""

import re
import socket

from services.node_agent.service import NodeAgent
from services.node_agent.settings import NodeAgentSettings
from shared.identity import Identity, Role
from shared.runtime import serve


def node_identity(settings: NodeAgentSettings) -> Identity:
    node = settings.node_id or re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:63]
    return Identity(Role.NODE_AGENT, node)


if __name__ == "__main__":
    serve("node-agent", NodeAgentSettings, node_identity, NodeAgent.create)
