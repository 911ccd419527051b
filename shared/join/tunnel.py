"""WireGuard between nodes and the control plane: the control plane's hub, and the node's end.

Nodes reach NATS only through the tunnel: the control plane's NATS listens on its tunnel address
(`qvm up --wireguard`), and the grant a node gets on joining names that address. The node makes its
WireGuard key itself; only the public key travels in the join. The hub gives each node one address of the
tunnel's network (recorded with the member, so a restarted control plane re-adds every peer as it was).

On the node, `<etc>/wireguard/` holds the private key (0600, like `/etc/wireguard/*.conf`: the interface
needs it at every boot) and the grant; `qvm node tunnel up` (the unit's first step) brings the interface up.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigError
from shared.join.invites import JoinRefused
from shared.join.protocol import WireGuardGrant
from shared.pki import write_private
from shared.wireguard import WgInterface, WgPeer, generate_keypair, parse_private_key, parse_public_key

__all__ = ["NODE_INTERFACE", "NodeTunnel", "WireGuardHub", "new_node_key", "node_tunnel", "save_node_tunnel"]

NODE_INTERFACE = "qvm0"  # QVM_WG_INTERFACE overrides it (see `node_tunnel`)
KEEPALIVE_S = 25  # a node behind NAT keeps its mapping open; the hub can then reach it too


@dataclass
class WireGuardHub:
    """The control plane's interface (up already) and the network its nodes get addresses in."""

    interface: WgInterface
    network: ipaddress.IPv4Network
    endpoint: str  # host:port nodes dial (the control plane's public address and the interface's port)
    server_address: ipaddress.IPv4Address = field(init=False)

    def __post_init__(self) -> None:
        if self.interface.address is None:
            raise ConfigError("the hub's interface needs its tunnel address")
        self.server_address = ipaddress.IPv4Interface(self.interface.address).ip
        if self.server_address not in self.network:
            raise ConfigError(f"the hub's address {self.server_address} is outside {self.network}")

    def add_peer(self, public_key: str, taken: Iterable[str]) -> WireGuardGrant:
        """Give the node the first free address and add it as a peer allowed only that address."""
        try:
            key = parse_public_key(public_key)
        except ValueError as exc:
            raise JoinRefused("wireguard_key_invalid", str(exc)) from None
        used = {ipaddress.IPv4Interface(t).ip for t in taken} | {self.server_address}
        address = next((a for a in self.network.hosts() if a not in used), None)
        if address is None:
            raise ConfigError(f"no free tunnel address left in {self.network}")
        node_address = f"{address}/{self.network.prefixlen}"
        self.restore(key, node_address)
        return WireGuardGrant(server_public_key=self.interface.public_key, endpoint=self.endpoint,
                              node_address=node_address, server_address=str(self.server_address))

    def restore(self, public_key: str, node_address: str) -> None:
        """(Re-)add a member's peer at its recorded address (after a control plane restart)."""
        ip = ipaddress.IPv4Interface(node_address).ip
        self.interface.add_peer(WgPeer(public_key=public_key, allowed_ips=(f"{ip}/32",)))

    def remove_peer(self, public_key: str) -> None:
        self.interface.remove_peer(public_key)


# ---------------------------------------------------------------- the node's end

def _dir(etc: Path) -> Path:
    return etc / "wireguard"


def new_node_key() -> tuple[str, str]:
    """(private, public) for a joining node: only the public key leaves it."""
    keys = generate_keypair()
    return keys.private, keys.public


def save_node_tunnel(etc: Path, private_key: str, grant: WireGuardGrant) -> Path:
    """Keep what the node's interface needs at every start: its key (0600) and the control plane's grant."""
    d = _dir(etc)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    write_private(d / "private.key", (private_key + "\n").encode())
    (d / "tunnel.json").write_text(grant.model_dump_json(indent=2))
    return d


@dataclass
class NodeTunnel:
    """The node's interface and its one peer, the control plane."""

    interface: WgInterface
    control_plane: WgPeer

    def up(self) -> None:
        """Bring the interface up (again: a stale one of the same name is replaced) with its peer."""
        self.interface.down()
        self.interface.up()
        self.interface.add_peer(self.control_plane)

    def down(self) -> None:
        self.interface.down()


def node_tunnel(etc: Path, netns: str | None = None) -> NodeTunnel | None:
    """The node's interface as the join configured it (None when it joined without a tunnel).

    Its name is `NODE_INTERFACE` unless `QVM_WG_INTERFACE` names another: wireguard-go's control sockets
    (`/var/run/wireguard/<name>.sock`) are shared by every network namespace, so two nodes on one machine
    (tests, one namespace per node) need different names."""
    d = _dir(etc)
    if not (d / "tunnel.json").exists():
        return None
    try:
        grant = WireGuardGrant.model_validate(json.loads((d / "tunnel.json").read_text()))
        private = parse_private_key((d / "private.key").read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{d}: the tunnel's configuration is unreadable: {exc}") from None
    peer = WgPeer(public_key=grant.server_public_key, allowed_ips=(f"{grant.server_address}/32",),
                  endpoint=grant.endpoint, persistent_keepalive=KEEPALIVE_S)
    name = os.environ.get("QVM_WG_INTERFACE") or NODE_INTERFACE
    return NodeTunnel(WgInterface(name, private, address=grant.node_address, netns=netns), peer)
