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
from pathlib import Path

from shared.consumers import durables_for, readable_streams
from shared.events import CATALOGUE, DEAD_LETTER_SUBJECT, subject_filter
from shared.identity import Identity, Role
from shared.pki import Pki

__all__ = ["inbox_prefix", "permissions_for", "render_server_config"]

KV_BUCKETS: dict[str, tuple[Role, float]] = {
    "qvm_nodes": (Role.SCHEDULER, 0.0),  # node registry + capacity
    "qvm_jobs": (Role.SCHEDULER, 0.0),  # jobs waiting for capacity
    "qvm_attest_challenges": (Role.ATTESTATION_VERIFIER, 3600.0),  # single-use challenges (expire on their own)
    "qvm_attest_nodes": (Role.ATTESTATION_VERIFIER, 0.0),  # enrolled AKs, boot counters, revocations
    "qvm_attest_eks": (Role.ATTESTATION_VERIFIER, 0.0),  # EK fingerprint -> node (one EK, one node)
    "qvm_keys": (Role.KEY_BROKER, 0.0),  # wrapped (never plaintext) job keys, their holder; revoked nodes
}
"""JetStream KV buckets: owner role (the only identity that may read or write them) and max age (0: none)."""


def inbox_prefix(ident: Identity) -> str:
    return f"_INBOX_{ident.token}"


def permissions_for(ident: Identity) -> dict[str, dict[str, list[str]]]:
    """Least privilege, from the declarations alone. Every JetStream API subject granted names the stream,
    and for consumers the consumer's own name and its one filter: the server checks subjects, not request
    bodies, so nothing granted here lets a body name another consumer or another filter."""
    inbox = inbox_prefix(ident)
    sub: list[str] = [f"{inbox}.>"]
    if ident.role is Role.ADMIN:
        # Operator: manage streams, read everything (incl. ordered consumers' flow control); emit no events.
        return {"publish": {"allow": ["$JS.API.>", "$JS.FC.>"]}, "subscribe": {"allow": sub}}
    pub: list[str] = []
    fixed = {"node_id": ident.node_id} if ident.node_id else {}
    for spec in CATALOGUE.values():
        if ident.role in spec.producers:
            pub.append(subject_filter(spec, producer=str(ident), **fixed))
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
    for bucket, (owner, _) in KV_BUCKETS.items():
        if ident.role is owner:
            # A bucket is private to its owner: the watchers it creates there (unnamed consumers on the
            # bucket's own stream) can touch nothing of anyone else's.
            pub += [f"$KV.{bucket}.>", f"$JS.API.STREAM.INFO.KV_{bucket}", f"$JS.API.STREAM.MSG.GET.KV_{bucket}",
                    f"$JS.API.DIRECT.GET.KV_{bucket}.>", f"$JS.API.CONSUMER.CREATE.KV_{bucket}",
                    f"$JS.FC.KV_{bucket}.>", f"$JS.API.CONSUMER.INFO.KV_{bucket}.*",
                    f"$JS.API.STREAM.MSG.DELETE.KV_{bucket}"]
    return {"publish": {"allow": sorted(set(pub))}, "subscribe": {"allow": sub}}


def _q(s: str) -> str:
    return json.dumps(s)


def render_server_config(
    pki: Pki,
    *,
    store_dir: Path,
    host: str = "127.0.0.1",
    port: int = -1,
    server_name: str = "qvm-embedded",
    identities: Iterable[Identity] | None = None,
    cluster: str = "",
) -> str:
    """A complete nats-server config (TLS required, client certificates mapped to users, JetStream)."""
    users = []
    for ident in identities if identities is not None else pki.identities():
        perms = permissions_for(ident)
        pub = ", ".join(_q(s) for s in perms["publish"]["allow"])
        sub = ", ".join(_q(s) for s in perms["subscribe"]["allow"])
        users.append(
            f"    {{ user: {_q(str(ident))}, permissions: {{ publish: {{ allow: [{pub}] }}, "
            f"subscribe: {{ allow: [{sub}] }} }} }}"
        )
    return f"""# generated by qvm from the event catalogue; do not edit by hand
server_name: {_q(server_name)}
host: {_q(host)}
port: {port}
max_payload: 1MB
jetstream {{ store_dir: {_q(str(store_dir))} }}
tls {{
  cert_file: {_q(str(pki.server_cert))}
  key_file: {_q(str(pki.server_key))}
  ca_file: {_q(str(pki.ca_cert))}
  verify_and_map: true
  timeout: 5
}}
authorization {{
  users = [
{chr(10).join(users)}
  ]
}}
{cluster}"""
