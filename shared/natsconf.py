"""NATS server configuration generated from the catalogue: mutual TLS and least-privilege users.

Every identity in the PKI becomes a NATS user mapped from its client certificate (`verify_and_map`).
Its permissions are derived, never hand-written:
  publish   the event subjects its role may produce (node-agents: with their own node id only), its own
            dead-letter subjects, and the JetStream API calls for the consumers it owns;
  subscribe only its own inbox prefix (`_INBOX_<identity>.>`), where pull consumers deliver.
The admin identity (operator CLI) manages streams and reads everything, and publishes no events.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from shared.consumers import consumers_for
from shared.events import CATALOGUE, DEAD_LETTER_SUBJECT, STREAMS, Domain, subject_filter
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
    inbox = inbox_prefix(ident)
    pub: list[str] = ["$JS.API.INFO"]
    sub: list[str] = [f"{inbox}.>"]
    if ident.role is Role.ADMIN:
        # Operator: manage streams, read everything (incl. ordered consumers' flow control); emit no events.
        return {"publish": {"allow": ["$JS.API.>", "$JS.FC.>"]}, "subscribe": {"allow": sub}}
    fixed = {"node_id": ident.node_id} if ident.node_id else {}
    for spec in CATALOGUE.values():
        if ident.role in spec.producers:
            pub.append(subject_filter(spec, producer=str(ident), **fixed))
    pub.append(DEAD_LETTER_SUBJECT.format(producer=str(ident)))
    for c in consumers_for(ident):
        name = c.name(ident)
        filters = c.filters(ident)
        stream = c.stream
        create = f"$JS.API.CONSUMER.CREATE.{stream}.{name}"
        pub += [f"{create}.{filters[0]}"] if len(filters) == 1 else [create]
        pub += [
            f"$JS.API.CONSUMER.INFO.{stream}.{name}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
            f"$JS.ACK.{stream}.{name}.>",
            f"$JS.API.STREAM.INFO.{stream}",
        ]
    if ident.role in (Role.SCHEDULER, Role.JANITOR):
        # Folding job history at start: ordered (ephemeral) consumers on the jobs stream.
        pub += _ordered_reader(Domain.JOBS)
    if ident.role is Role.JANITOR:
        # Teardown records need the key-broker's destruction reports and the janitor's own earlier records.
        pub += _ordered_reader(Domain.KEYS) + _ordered_reader(Domain.TEARDOWN)
    if ident.role is Role.MARKETPLACE:
        # A client checks an instance's evidence itself (quote, log, AK enrollment) before it releases its
        # secrets: it reads the job's events and the node's attestation history.
        for domain in (Domain.JOBS, Domain.ATTESTATION, Domain.KEYS):
            pub += _ordered_reader(domain)
    if ident.role is Role.SCHEDULER:
        # Reading a job's submission back when a node refuses it.
        pub += [f"$JS.API.STREAM.MSG.GET.{STREAMS[Domain.JOBS].name}",
                f"$JS.API.DIRECT.GET.{STREAMS[Domain.JOBS].name}.>"]
    for bucket, (owner, _) in KV_BUCKETS.items():
        if ident.role is owner:
            pub += [f"$KV.{bucket}.>", f"$JS.API.STREAM.INFO.KV_{bucket}", f"$JS.API.STREAM.MSG.GET.KV_{bucket}",
                    f"$JS.API.DIRECT.GET.KV_{bucket}.>", f"$JS.API.CONSUMER.CREATE.KV_{bucket}",
                    f"$JS.FC.KV_{bucket}.>", f"$JS.API.CONSUMER.INFO.KV_{bucket}.*"]
    return {"publish": {"allow": sorted(set(pub))}, "subscribe": {"allow": sub}}


def _ordered_reader(domain: Domain) -> list[str]:
    """Ordered (ephemeral) consumers on one stream. Only unnamed (server-named) consumers: no way to
    create, re-point or delete a named durable such as a node-agent's assignment queue."""
    stream = STREAMS[domain].name
    return [f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.FC.{stream}.>", f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.CONSUMER.INFO.{stream}.*"]


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
