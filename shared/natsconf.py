"""NATS server configuration generated from the catalogue: mutual TLS and least-privilege users.

Every identity in the PKI becomes a NATS user mapped from its client certificate (`verify_and_map`).
Its permissions are derived, never hand-written (shared/consumers.py says what each identity reads):
  publish   the event subjects its role may produce (node-agents: with their own node id only); for each
            durable it owns: info, next, ack and its dead-letter subject, and for a node-agent's durables
            create (with the name and the one filter in the subject; services' durables are made by the
            operator); message gets on the streams it may read; its own KV buckets;
  subscribe only its own inbox prefix (`_INBOX_<identity>.>`), where replies and pulled messages arrive.
No identity but the operator may create an unnamed (ephemeral, ordered) consumer on an event stream, list
or read other consumers, or touch a stream's configuration.
The admin identity (operator CLI) manages streams and reads everything, and publishes no events.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.buckets import BUCKETS
from shared.consumers import durables_for, readable_streams
from shared.events import CATALOGUE, DEAD_LETTER_SUBJECT, subject_filter
from shared.identity import Identity, Role
from shared.pki import Pki

__all__ = ["ClusterMember", "authorization_block", "cluster_block", "deploy_cluster_configs", "inbox_prefix",
           "permissions_for", "render_server_config", "server_block"]



def inbox_prefix(ident: Identity) -> str:
    return f"_INBOX_{ident.token}"


def permissions_for(ident: Identity) -> dict[str, dict[str, list[str]]]:
    """Least privilege, from the declarations alone. Every JetStream API subject granted names the stream,
    and for consumers the consumer's own name and its one filter: the server checks subjects, not request
    bodies, so nothing granted here lets a body name another consumer or another filter."""
    inbox = inbox_prefix(ident)
    sub: list[str] = [f"{inbox}.>"]
    pub: list[str] = []
    fixed = {"node_id": ident.node_id} if ident.node_id else {}
    for spec in CATALOGUE.values():
        if ident.role in spec.producers:
            pub.append(subject_filter(spec, producer=str(ident), **fixed))
    if ident.role is Role.ADMIN:
        # Operator: manage streams, read everything (incl. ordered consumers' flow control), its own buckets
        # (join invites); its only events are its decisions about nodes (`node.revoked`).
        pub += ["$JS.API.>", "$JS.FC.>"]
        pub += [f"$KV.{bucket}.>" for bucket, held in BUCKETS.items() if held.owner is Role.ADMIN]
        return {"publish": {"allow": sorted(set(pub))}, "subscribe": {"allow": sub}}
    for d in durables_for(ident):
        if not d.provisioned:
            pub.append(d.create_subject)  # its name and its one filter, both fixed in the subject
        pub += [
            f"$JS.API.CONSUMER.INFO.{d.stream}.{d.name}",
            f"$JS.API.CONSUMER.MSG.NEXT.{d.stream}.{d.name}",
            f"$JS.ACK.{d.stream}.{d.name}.>",
            DEAD_LETTER_SUBJECT.format(producer=str(ident), consumer=d.name),  # dead letters of its own durables
        ]
    for stream in readable_streams(ident.role):
        pub.append(f"$JS.API.DIRECT.GET.{stream}")  # batched message gets: reads, no server-side state
    for bucket, held in BUCKETS.items():  # a bucket's owner is the only identity that may read or write it
        if ident.role is held.owner:
            # A bucket is private to its owner: the watchers it creates there (unnamed consumers on the
            # bucket's own stream) can touch nothing of anyone else's.
            pub += [f"$KV.{bucket}.>", f"$JS.API.STREAM.INFO.KV_{bucket}", f"$JS.API.STREAM.MSG.GET.KV_{bucket}",
                    f"$JS.API.DIRECT.GET.KV_{bucket}.>", f"$JS.API.CONSUMER.CREATE.KV_{bucket}",
                    f"$JS.FC.KV_{bucket}.>", f"$JS.API.CONSUMER.INFO.KV_{bucket}.*",
                    f"$JS.API.STREAM.MSG.DELETE.KV_{bucket}"]
    return {"publish": {"allow": sorted(set(pub))}, "subscribe": {"allow": sub}}


def _q(s: str) -> str:
    return json.dumps(s)


@dataclass(frozen=True)
class ClusterMember:
    """One server of a NATS cluster: its name (also its route host and certificate name), where clients
    and routes reach it."""

    name: str
    host: str
    client_port: int
    cluster_port: int

    @property
    def route(self) -> str:
        return f"nats-route://{self.host}:{self.cluster_port}"


def cluster_block(me: ClusterMember, members: Iterable[ClusterMember], cert: Path, key: Path, ca: Path,
                  name: str = "qvm", listen: str | None = None) -> str:
    """The `cluster {}` block of `me`: routes to every other member, mutual TLS with its own certificate
    (routes check each other's names, so each server has one naming it). `listen`: the address routes are
    accepted on, when not its route host (a container's 0.0.0.0)."""
    routes = "\n".join(f"    {m.route}" for m in members if m.name != me.name)
    return f"""cluster {{
  name: {_q(name)}
  host: {_q(listen or me.host)}
  port: {me.cluster_port}
  routes: [
{routes}
  ]
  tls {{
    cert_file: {_q(str(cert))}
    key_file: {_q(str(key))}
    ca_file: {_q(str(ca))}
    verify: true
    timeout: 5
  }}
}}
"""


def server_block(*, server_name: str, host: str, port: int, store_dir: Path, cert: Path, key: Path, ca: Path,
                 http_port: int | None = None) -> str:
    """Who the server is and how clients must connect: TLS required, client certificates mapped to users."""
    monitor = f"http_port: {http_port}\n" if http_port is not None else ""
    return f"""# generated by qvm (shared/natsconf.py) from the event catalogue; do not edit by hand
server_name: {_q(server_name)}
host: {_q(host)}
port: {port}
{monitor}max_payload: 1MB
jetstream {{ store_dir: {_q(str(store_dir))} }}
tls {{
  cert_file: {_q(str(cert))}
  key_file: {_q(str(key))}
  ca_file: {_q(str(ca))}
  verify_and_map: true
  timeout: 5
}}
"""


def authorization_block(identities: Iterable[Identity]) -> str:
    """A user per identity with its generated permissions (`qvm pki nats-config` prints the same)."""
    users = []
    for ident in identities:
        perms = permissions_for(ident)
        pub = ", ".join(_q(s) for s in perms["publish"]["allow"])
        sub = ", ".join(_q(s) for s in perms["subscribe"]["allow"])
        users.append(
            f"    {{ user: {_q(str(ident))}, permissions: {{ publish: {{ allow: [{pub}] }}, "
            f"subscribe: {{ allow: [{sub}] }} }} }}"
        )
    return f"""authorization {{
  users = [
{chr(10).join(users)}
  ]
}}
"""


def render_server_config(
    pki: Pki,
    *,
    store_dir: Path,
    host: str = "127.0.0.1",
    port: int = -1,
    server_name: str = "qvm-embedded",
    identities: Iterable[Identity] | None = None,
    cluster: str = "",
    cert: Path | None = None,
    key: Path | None = None,
) -> str:
    """A complete nats-server config (TLS required, client certificates mapped to users, JetStream);
    `cluster` is this server's `cluster_block`, `cert`/`key` its own certificate in a cluster."""
    return (server_block(server_name=server_name, host=host, port=port, store_dir=store_dir,
                         cert=cert or pki.server_cert, key=key or pki.server_key, ca=pki.ca_cert)
            + authorization_block(identities if identities is not None else pki.identities()) + cluster)


DEPLOY_PKI = Path("/etc/qvm/pki")


def deploy_cluster_configs(size: int = 3) -> dict[str, str]:
    """`deploy/nats/cluster/node-<i>.conf`: the same server and cluster blocks as `qvm up --nats-servers`,
    with the container paths (the PKI volume at /etc/qvm/pki, each server's certificate from
    `qvm pki init --nats-servers nats-1,...`) and the users from `../authorization.conf` (generated by
    `qvm pki nats-config`, shared by every member)."""
    members = [ClusterMember(f"nats-{i + 1}", f"nats-{i + 1}", 4222, 6222) for i in range(size)]
    out = {}
    for i, me in enumerate(members, start=1):
        cert = DEPLOY_PKI / "servers" / me.name / "server.pem"
        key = DEPLOY_PKI / "servers" / me.name / "server-key.pem"
        out[f"node-{i}.conf"] = (
            server_block(server_name=me.name, host="0.0.0.0", port=me.client_port,
                         store_dir=Path("/data/jetstream"), cert=cert, key=key, ca=DEPLOY_PKI / "ca.pem",
                         http_port=8222)
            + "include ../authorization.conf\n"
            + cluster_block(me, members, cert, key, DEPLOY_PKI / "ca.pem", listen="0.0.0.0"))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m shared.natsconf DIR`: write the cluster configs into DIR (`make docs` does, for deploy/)."""
    import sys

    args = argv if argv is not None else sys.argv[1:]
    target = Path(args[0]) if args else Path("deploy/nats/cluster")
    target.mkdir(parents=True, exist_ok=True)
    for name, text in deploy_cluster_configs().items():
        (target / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
