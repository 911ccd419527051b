"""`python -m services.node_agent`: the agent a hoster installs (one per host)."""

import asyncio
import re
import socket

from services.node_agent.doctor import gate
from services.node_agent.service import NodeAgent
from services.node_agent.settings import NodeAgentSettings
from shared.bus import Bus
from shared.identity import Identity, Role
from shared.runtime import serve


def node_identity(settings: NodeAgentSettings) -> Identity:
    node = settings.node_id or re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:63]
    return Identity(Role.NODE_AGENT, node)


async def start(bus: Bus, settings: NodeAgentSettings) -> NodeAgent:
    """The host checks first (`QVM_NODE_DOCTOR`: enforce refuses to start on a failed hard requirement)."""
    await asyncio.to_thread(gate, settings)
    return await NodeAgent.create(bus, settings)


if __name__ == "__main__":
    serve("node-agent", NodeAgentSettings, node_identity, start)
