"""Least privilege in fact: every identity against every JetStream API and event subject, on the real server.

The expected answers are derived here, independently of the permission generator (shared/natsconf.py),
from what the catalogue declares: which events a role produces (and for which node), which durables each
identity runs (name + one filter: shared/consumers.py CONSUMERS), which streams it may read by message
gets (READERS), which KV buckets it owns. The server's answer (a permissions violation, or none) must be
exactly that, for every probe. Then the attacks from the security review, made with real API requests:
a node re-pointing its consumers at other nodes, a service re-pointing its own, the marketplace re-pointing a node's consumer through an
unnamed create, reading every key event through an ordered consumer, or forging dead letters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared.buckets import BUCKETS
from shared.bus import tls_context
from shared.consumers import CONSUMERS, READERS, Durable, durables_for
from shared.events import CATALOGUE, STREAMS, subject_filter, subject_for
from shared.identity import Identity, Role
from shared.natsconf import inbox_prefix
from tests.framework.stack import Stack

pytestmark = pytest.mark.nats

NODES = ("node-a", "node-b")
IDENTITIES = (
    Identity(Role.SCHEDULER), Identity(Role.JANITOR), Identity(Role.ATTESTATION_VERIFIER), Identity(Role.KEY_BROKER),
    Identity(Role.MARKETPLACE), Identity(Role.ADMIN), *(Identity(Role.NODE_AGENT, n) for n in NODES),
)
DENIED = (nats.errors.Error, asyncio.TimeoutError)


@dataclass(frozen=True)
class Probe:
    subject: str
    allowed: Callable[[Identity], bool]
    what: str


def _admin_only(i: Identity) -> bool:
    return i.role is Role.ADMIN


def _api(rule: Callable[[Identity], bool]) -> Callable[[Identity], bool]:
    """A JetStream API subject: the operator may call every one, others as `rule` says."""
    return lambda i: i.role is Role.ADMIN or rule(i)


def _owner_of(d: Durable) -> Identity:
    for ident in IDENTITIES:
        if d in durables_for(ident):
            return ident
    raise AssertionError(d)


def _widened(d: Durable) -> str:
    """The durable's stream-wide filter: what an attacker re-points a consumer to."""
    return f"qvm.{d.filters[0].split('.')[1]}.>"


def api_probes() -> list[Probe]:
    probes: list[Probe] = []
    event_streams = [s.name for s in STREAMS.values()]
    kv_streams = {f"KV_{b}": spec.owner for b, spec in BUCKETS.items()}
    # Stream-level calls: configuration, listings, reads.
    for stream in [*event_streams, *kv_streams]:
        kv_owner = kv_streams.get(stream)

        def owns(i: Identity, owner: Role | None = kv_owner) -> bool:
            return owner is not None and i.role is owner

        def reads(i: Identity, s: str = stream) -> bool:
            return any(r.role is i.role and r.stream == s for r in READERS)

        for verb in ("STREAM.UPDATE", "STREAM.DELETE", "STREAM.PURGE", "CONSUMER.LIST", "CONSUMER.NAMES"):
            probes.append(Probe(f"$JS.API.{verb}.{stream}", _api(lambda i: False), f"{verb} {stream}"))
        probes += [
            Probe(f"$JS.API.STREAM.INFO.{stream}", _api(owns), f"stream info {stream}"),
            Probe(f"$JS.API.STREAM.MSG.GET.{stream}", _api(owns), f"msg get {stream}"),
            Probe(f"$JS.API.STREAM.MSG.DELETE.{stream}", _api(owns), f"msg delete {stream}"),
            Probe(f"$JS.API.DIRECT.GET.{stream}", _api(reads), f"batched message gets on {stream}"),
            # Unnamed creates (ephemeral/ordered consumers; the body may name any durable): KV owners only,
            # on their own private bucket (watchers).
            Probe(f"$JS.API.CONSUMER.CREATE.{stream}", _api(owns), f"unnamed consumer on {stream}"),
            Probe(f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.evil", _api(lambda i: False), f"legacy create {stream}"),
            Probe(f"$JS.API.CONSUMER.CREATE.{stream}.evil.qvm.>", _api(lambda i: False), f"foreign name on {stream}"),
            Probe(f"$JS.FC.{stream}.x", _api(owns), f"flow control {stream}"),
            Probe(f"$JS.API.CONSUMER.INFO.{stream}.evil", _api(owns), f"consumer info on {stream}"),
        ]
    for bucket, owner in ((b, spec.owner) for b, spec in BUCKETS.items()):
        probes += [
            Probe(f"$KV.{bucket}.k", lambda i, o=owner: i.role is o, f"write kv {bucket}"),
            Probe(f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.k", _api(lambda i, o=owner: i.role is o),
                  f"read kv {bucket}"),
        ]
    probes += [Probe(s, _api(lambda i: False), s) for s in (
        "$JS.API.INFO", "$JS.API.STREAM.CREATE.EVIL", "$JS.API.STREAM.LIST", "$JS.API.STREAM.NAMES",
        "$JS.API.ACCOUNT.PURGE.x", "$JS.API.META.LEADER.STEPDOWN")]
    # Every declared durable: its owner may pull, ack, read its info and dead-letter through it; a node-agent
    # may also create its own with its one filter (services' durables are the operator's); nobody may create
    # one without the filter, widen the filter, or delete it.
    for spec in CONSUMERS:
        idents = [Identity(spec.role, n) for n in NODES] if spec.role is Role.NODE_AGENT else [Identity(spec.role)]
        for ident in idents:
            for d in spec.durables(ident):
                owner = _owner_of(d)

                def mine(i: Identity, o: Identity = owner) -> bool:
                    return i == o

                def creates(i: Identity, o: Identity = owner, made_by_operator: bool = d.provisioned) -> bool:
                    return i == o and not made_by_operator

                base = "$JS.API.CONSUMER"
                probes += [
                    Probe(f"{base}.CREATE.{d.stream}.{d.name}.{d.filters[0]}", _api(creates), f"create {d.name}"),
                    Probe(f"{base}.CREATE.{d.stream}.{d.name}", _api(lambda i: False), f"create {d.name}, no filter"),
                    Probe(f"{base}.CREATE.{d.stream}.{d.name}.{_widened(d)}", _api(lambda i: False),
                          f"re-point {d.name}"),
                    Probe(f"{base}.DURABLE.CREATE.{d.stream}.{d.name}", _api(lambda i: False), f"legacy {d.name}"),
                    Probe(f"{base}.DELETE.{d.stream}.{d.name}", _api(lambda i: False), f"delete {d.name}"),
                    Probe(f"{base}.INFO.{d.stream}.{d.name}", _api(mine), f"info {d.name}"),
                    Probe(f"{base}.MSG.NEXT.{d.stream}.{d.name}", _api(mine), f"pull {d.name}"),
                    Probe(f"$JS.ACK.{d.stream}.{d.name}.1.1.1.1.0", mine, f"ack {d.name}"),
                    Probe(f"qvm.dead.raw.{owner}.{d.name}", mine, f"dead letter through {d.name}"),
                ]
    return probes


def event_probes() -> list[Probe]:
    probes = []
    for spec in CATALOGUE.values():
        for producer in IDENTITIES:
            for node in NODES:
                subject = subject_for(spec, job_id="j1", node_id=node, producer=str(producer))

                def may(i: Identity, s: Any = spec, n: str = node, p: Identity = producer) -> bool:
                    if i.role not in s.producers:
                        return False
                    if s.node_scoped and i.node_id != n:
                        return False
                    return "{producer}" not in s.subject or i == p

                probes.append(Probe(subject, may, f"publish {spec.type} as {producer} for {node}"))
    for ident in IDENTITIES:  # dead letters outside any declared durable
        probes.append(Probe(f"qvm.dead.raw.{ident}.evil", lambda i: False, f"dead letter as {ident}, no durable"))
    return list({p.subject: p for p in probes}.values())


async def _violations(stack: Stack, ident: Identity, subjects: list[str], subs: list[str]) -> set[str]:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(stack.url, tls=tls_context(stack.pki, ident), error_cb=on_error,
                            inbox_prefix=inbox_prefix(ident), allow_reconnect=False)
    try:
        for s in subjects:
            await nc.publish(s, b"{}")
        for s in subs:
            await nc.subscribe(s)
        await nc.flush(timeout=10)  # the server answered every publish before this PONG
        await asyncio.sleep(0.05)
    finally:
        await nc.close()
    out = set()
    for e in errors:
        if "permissions violation" in e:
            kind = "sub" if "subscription to" in e else "pub"
            out.add(kind + ":" + e.split('"')[1])
    return out


async def test_every_identity_gets_exactly_the_declared_permissions(stack: Stack) -> None:
    probes = api_probes() + event_probes()
    assert len(probes) > 450
    mismatches: list[str] = []
    for ident in IDENTITIES:
        own_inbox = f"{inbox_prefix(ident)}.x"
        subs = [own_inbox, "qvm.>", "qvm.jobs.>", "$JS.API.>", "_INBOX_scheduler.>", "_INBOX.>",
                f"{inbox_prefix(Identity(Role.NODE_AGENT, 'node-b'))}.>"]
        violated = await _violations(stack, ident, [p.subject for p in probes], subs)
        for p in probes:
            denied = f"pub:{p.subject.lower()}" in violated
            if denied == p.allowed(ident):
                mismatches.append(f"{ident}: {p.what} ({p.subject}): server {'denied' if denied else 'allowed'}")
        for s in subs:
            denied = f"sub:{s.lower()}" in violated
            if denied == s.startswith(f"{inbox_prefix(ident)}."):
                mismatches.append(f"{ident}: subscribe {s}: server {'denied' if denied else 'allowed'}")
    assert not mismatches, "\n".join(mismatches[:40]) + f"\n({len(mismatches)} in all)"


# ---------------------------------------------------------------- the review's attacks


def _durable(ident: Identity, key: str) -> Durable:
    spec = next(c for c in CONSUMERS if c.role is ident.role and c.key == key)
    return spec.durables(ident)[0]


async def test_a_node_cannot_point_its_consumers_at_other_nodes(stack: Stack) -> None:
    admin = await stack.bus(Role.ADMIN)
    node_a = await stack.bus(Role.NODE_AGENT, "node-a")
    for key in ("attestation", "verdicts", "keys", "assignments"):
        for d in next(c for c in CONSUMERS if c.role is Role.NODE_AGENT and c.key == key).durables(node_a.identity):
            everyone = d.filters[0].replace("node-a", "*")
            spy = ConsumerConfig(name=d.name, durable_name=d.name, filter_subject=everyone)
            with pytest.raises(DENIED):
                await node_a.js.add_consumer(d.stream, config=spy, timeout=0.5)
            multi = ConsumerConfig(name=d.name, durable_name=d.name, filter_subjects=[d.filters[0], everyone])
            with pytest.raises(DENIED):
                await node_a.js.add_consumer(d.stream, config=multi, timeout=0.5)
    # No ordered (unnamed) consumer on any stream either, and no reading a stream by message gets.
    for stream in ("QVM_JOBS", "QVM_KEYS", "QVM_ATTESTATION"):
        with pytest.raises(DENIED):
            await node_a.js.add_consumer(stream, config=ConsumerConfig(filter_subject=">"), timeout=0.5)
        with pytest.raises(DENIED):
            await node_a.nc.request(f"$JS.API.DIRECT.GET.{stream}", b'{"seq":1}', timeout=0.5)
    # What it may do: its own durables, with their one filter each.
    [name] = await node_a.ensure_consumer(next(c for c in CONSUMERS if c.role is Role.NODE_AGENT
                                               and c.key == "assignments"))
    info = await admin.js.consumer_info("QVM_JOBS", name)
    assert info.config.filter_subject == "qvm.jobs.*.placed.node-a"


async def test_the_marketplace_cannot_repoint_a_nodes_consumer_or_read_keys(stack: Stack) -> None:
    admin = await stack.bus(Role.ADMIN)
    node_a = await stack.bus(Role.NODE_AGENT, "node-a")
    market = await stack.bus(Role.MARKETPLACE)
    assignments = next(c for c in CONSUMERS if c.role is Role.NODE_AGENT and c.key == "assignments")
    [name] = await node_a.ensure_consumer(assignments)
    # The review's re-point: an unnamed create whose body names the node's durable.
    body = {"stream_name": "QVM_JOBS", "config": {"name": name, "durable_name": name, "ack_policy": "explicit",
                                                  "filter_subject": "qvm.jobs.nothing.>"}}
    with pytest.raises(DENIED):
        await market.nc.request("$JS.API.CONSUMER.CREATE.QVM_JOBS", json.dumps(body).encode(), timeout=0.5)
    with pytest.raises(DENIED):
        await market.js.add_consumer("QVM_JOBS", config=ConsumerConfig(
            name=name, durable_name=name, filter_subject="qvm.jobs.nothing.>"), timeout=0.5)
    info = await admin.js.consumer_info("QVM_JOBS", name)
    assert info.config.filter_subject == "qvm.jobs.*.placed.node-a"
    # Consumer positions of other identities are not the marketplace's to read.
    with pytest.raises(DENIED):
        await market.js.consumer_info("QVM_JOBS", name, timeout=0.5)
    # No ordered consumer on the keys stream, no message gets there either.
    with pytest.raises(DENIED):
        await market.js.subscribe("qvm.keys.>", stream="QVM_KEYS", ordered_consumer=True,
                                  deliver_policy=DeliverPolicy.ALL)
    with pytest.raises(DENIED):
        await market.nc.request("$JS.API.DIRECT.GET.QVM_KEYS", b'{"seq":1}', timeout=0.5)
    # What it may read: the jobs stream, by message gets (no server-side state).
    reply = await market.nc.request("$JS.API.DIRECT.GET.QVM_JOBS", b'{"seq":1}', timeout=0.5)
    assert reply.headers and reply.headers.get("Status") == "404"  # nothing stored yet: a JetStream answer


async def test_dead_letters_only_through_ones_own_durables(stack: Stack) -> None:
    admin = await stack.bus(Role.ADMIN)
    market = await stack.bus(Role.MARKETPLACE)
    sched = await stack.bus(Role.SCHEDULER)
    forged = b"\x00not an event"
    with pytest.raises(DENIED):  # the marketplace consumes nothing, so it dead-letters nothing
        await market.js.publish("qvm.dead.raw.marketplace.x", forged, timeout=0.5)
    with pytest.raises(DENIED):  # nor under another identity's durable
        await market.js.publish("qvm.dead.raw.scheduler.scheduler-jobs", forged, timeout=0.5)
    with pytest.raises(DENIED):  # a service only under its own durables' names
        await sched.js.publish("qvm.dead.raw.scheduler.janitor-offline-node_offline", forged, timeout=0.5)
    info = await admin.js.stream_info("QVM_DEAD")
    assert info.state.messages == 0
    # A service cannot make or change a consumer at all: the operator provisioned its durable.
    d = _durable(sched.identity, "jobs")
    assert d.provisioned and d.filters == tuple(subject_filter(CATALOGUE[e]) for e in d.events)
    with pytest.raises(DENIED):
        await sched.js.add_consumer(d.stream, config=ConsumerConfig(
            name=d.name, durable_name=d.name, filter_subjects=[*d.filters, "qvm.jobs.>"]), timeout=0.5)
    assert (await admin.js.consumer_info(d.stream, d.name)).config.filter_subjects == list(d.filters)
