"""The registrar wired into a running control plane: its buckets, the NATS reload, the withdrawal event.

`qvm up --join-listen` and the tests start it the same way: an operator (`admin`) bus connection for the
invitations and members buckets and for `node.revoked`, the embedded NATS server whose authorization the
registrar regenerates, and the HTTPS server nodes join through.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from shared.buckets import JOIN_INVITES, MEMBERS
from shared.bus import Bus
from shared.events import NodeWithdrawn
from shared.ids import event_id_at
from shared.join.registrar import Registrar, Tunnel
from shared.join.server import JoinServer
from shared.natsserver import EmbeddedCluster, EmbeddedNats
from shared.tpm.ek import load_ek_cas

__all__ = ["JoinService", "start_join_service"]


@dataclass
class JoinService:
    registrar: Registrar
    server: JoinServer

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()


async def start_join_service(admin: Bus, nats: EmbeddedNats | EmbeddedCluster, *, host: str = "127.0.0.1",
                             port: int = 0,
                             nats_url: str | None = None, ek_ca: Path | None = None,
                             require_ek_certificate: bool = True, tunnel: Tunnel | None = None) -> JoinService:
    """Serve joins on host:port (0: a free port). `nats_url` is what nodes dial (default: the server's, or
    every cluster member's). A grant reloads every server of a cluster."""

    async def grant() -> None:
        await asyncio.to_thread(nats.reload)

    async def publish_withdrawal(node_id: str, reason: str, detail: str, when_ns: int) -> None:
        await admin.publish(NodeWithdrawn(reason=reason, detail=detail[:1024]), node_id=node_id,
                            event_id=event_id_at(when_ns, "node.revoked", node_id))

    registrar = Registrar(pki=nats.pki, invites=await admin.kv(JOIN_INVITES), members=await admin.kv(MEMBERS),
                          grant=grant, publish_withdrawal=publish_withdrawal, nats_url=nats_url or nats.url,
                          ek_cas=load_ek_cas(ek_ca), require_ek_certificate=require_ek_certificate, tunnel=tunnel)
    await registrar.restore_tunnels()
    server = JoinServer(registrar, nats.pki, host, port, asyncio.get_running_loop())
    server.start()
    return JoinService(registrar, server)
