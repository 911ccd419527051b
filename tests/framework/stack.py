"""Test harness: a real nats-server with qvm's PKI and permissions, per test, on a free loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.bus import Bus
from shared.identity import Identity, Role
from shared.natsserver import EmbeddedNats
from shared.pki import Pki
from shared.provision import provision
from tests.framework.settings import AllSettings


@dataclass
class Stack:
    """A running embedded NATS with provisioned streams; `bus(role)` connects as an identity."""

    root: Path
    pki: Pki
    server: EmbeddedNats
    settings: AllSettings
    buses: list[Bus] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    async def bus(self, role: Role | str, node_id: str | None = None) -> Bus:
        ident = Identity(Role(role), node_id)
        b = await Bus.connect(self.url, self.pki, ident)
        self.buses.append(b)
        return b

    async def close(self) -> None:
        for b in self.buses:
            await b.close()
        self.server.stop()


@contextlib.asynccontextmanager
async def running_stack(root: Path, nodes: tuple[str, ...] = ("node-a", "node-b"), **overrides: object
                        ) -> AsyncIterator[Stack]:
    pki = Pki(root / "pki")
    pki.init(nodes=nodes)
    server = EmbeddedNats(pki, root / "nats")
    server.start()
    settings = AllSettings(state_dir=root, nats_url=server.url, pki_dir=pki.root, **overrides)  # type: ignore[arg-type]
    stack = Stack(root, pki, server, settings)
    try:
        admin = await stack.bus(Role.ADMIN)
        await provision(admin.js, settings)
        yield stack
    finally:
        await stack.close()
