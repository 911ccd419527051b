"""An embedded NATS (TLS, generated permissions, JetStream) with provisioned streams, for one benchmark."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.bus import Bus
from shared.config import Settings
from shared.identity import Identity, Role
from shared.natsserver import EmbeddedNats
from shared.pki import Pki
from shared.provision import provision

__all__ = ["BenchStack", "bench_stack"]


@dataclass
class BenchStack:
    root: Path
    pki: Pki
    server: EmbeddedNats
    settings: Settings
    buses: list[Bus] = field(default_factory=list)

    async def bus(self, role: Role) -> Bus:
        b = await Bus.connect(self.server.url, self.pki, Identity(role))
        self.buses.append(b)
        return b


@contextlib.asynccontextmanager
async def bench_stack(pki: Pki, root: Path, *, offline_after_s: float = 3600.0) -> AsyncIterator[BenchStack]:
    """Start nats-server under `root` for the identities in `pki`; stop it and close every bus on exit."""
    server = EmbeddedNats(pki, root)
    url = server.start()
    stack: BenchStack | None = None
    try:
        settings = Settings(state_dir=root, nats_url=url, pki_dir=pki.root, offline_after_s=offline_after_s)
        stack = BenchStack(root, pki, server, settings)
        admin = await stack.bus(Role.ADMIN)
        await provision(admin.js, settings)
        yield stack
    finally:
        if stack is not None:
            for b in stack.buses:
                await b.close()
        server.stop()
