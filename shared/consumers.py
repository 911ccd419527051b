"""Every way an identity reads the bus, declared next to the catalogue: durable consumers and stream readers.

Declaring them lets the NATS permission generator grant each identity exactly what it reads and nothing
else, and lets the services provision their consumers idempotently.

Durable consumers: a `ConsumerSpec` groups the events one handler takes. The NATS server checks
permissions on subjects only, never on the JSON body of a request, so an identity that creates its own
consumer must find both the consumer's name and its filter in the subject it is allowed
(`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`), a form that exists for single-filter consumers only (a
multi-filter consumer's filters hide in the body, where they could be re-pointed anywhere). Hence two kinds:

- platform services (scheduler, verifier, key-broker, janitor): one durable per spec with all its filters,
  so its events keep their stream order (a key-broker must see a job's submission before its instance's
  announcement). The operator makes these durables when it provisions the streams (`shared/provision.py`);
  the service may only pull, ack and read the info of its own, never create or change one;
- node-agents (on hosts the platform does not own): one durable per event, each with one filter carrying
  the node id, which the agent creates itself through that fixed subject; so it can only ever read its own
  node's events.

Readers (`ReaderSpec`): an identity that folds a stream's history (the janitor, the scheduler's replay
checks, a marketplace client checking evidence) reads it with batched message gets
(`$JS.API.DIRECT.GET.<stream>`), which create no server-side state at all: no unnamed or ordered
consumers, which could otherwise update any named durable whose name is put in the request body.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.events import CATALOGUE, STREAMS, Domain, EventType, subject_filter
from shared.identity import Identity, Role

__all__ = ["CONSUMERS", "READERS", "ConsumerSpec", "Durable", "ReaderSpec", "consumer_spec", "consumers_for",
           "consumers_of", "durables_for", "readable_streams"]


@dataclass(frozen=True)
class Durable:
    """One server-side durable consumer: a name of its identity's own and its filter subjects."""

    name: str
    stream: str
    filters: tuple[str, ...]
    events: tuple[EventType, ...]
    provisioned: bool  # made by the operator (several filters); else made by its owner (exactly one filter)

    @property
    def create_subject(self) -> str:
        """The one API subject that creates this durable with this filter (owner-created durables only)."""
        assert not self.provisioned and len(self.filters) == 1
        return f"$JS.API.CONSUMER.CREATE.{self.stream}.{self.name}.{self.filters[0]}"


@dataclass(frozen=True)
class ConsumerSpec:
    key: str
    role: Role
    domain: Domain
    events: tuple[EventType, ...]
    description: str
    max_deliver: int = 6
    backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    ack_wait_s: float = 30.0

    @property
    def stream(self) -> str:
        return STREAMS[self.domain].name

    @property
    def provisioned(self) -> bool:
        """A platform service's durable, made by the operator; node-agents make their own."""
        return self.role is not Role.NODE_AGENT

    def durables(self, ident: Identity) -> list[Durable]:
        """The durables `ident` runs for this spec: `<identity>-<key>` (provisioned, every filter), or for a
        node-agent one per event, `<identity>-<key>[-<event>]`, with one filter each."""
        if self.provisioned:
            return [Durable(f"{ident.token}-{self.key}", self.stream,
                            tuple(subject_filter(CATALOGUE[e]) for e in self.events), self.events, True)]
        fixed = {"node_id": ident.node_id} if ident.node_id else {}
        return [Durable(f"{ident.token}-{self.key}" + (f"-{e.value.replace('.', '_')}" if len(self.events) > 1
                                                        else ""),
                        self.stream, (subject_filter(CATALOGUE[e], **fixed),), (e,), False) for e in self.events]


E = EventType
CONSUMERS: tuple[ConsumerSpec, ...] = (
    ConsumerSpec("jobs", Role.SCHEDULER, Domain.JOBS,
                 (E.JOB_SUBMITTED, E.JOB_REFUSED, E.JOB_FAILED, E.JOB_CANCELLED, E.JOB_ACCEPTED, E.JOB_DONE,
                  E.INSTANCE_DESTROYED),
                 "Placement work, shared by all scheduler replicas."),
    ConsumerSpec("nodes", Role.SCHEDULER, Domain.NODES, (E.NODE_REGISTERED, E.NODE_HEARTBEAT, E.NODE_SWEPT),
                 "Registry updates (GPUs scrubbed by a node's sweep come back), shared by all scheduler replicas."),
    ConsumerSpec("teardown", Role.SCHEDULER, Domain.TEARDOWN, (E.TEARDOWN_REQUESTED, E.TEARDOWN_RECORD),
                 "Free a torn-down job's claim; list its GPUs again once its record shows them scrubbed."),
    ConsumerSpec("assignments", Role.NODE_AGENT, Domain.JOBS, (E.JOB_PLACED,),
                 "This node's assignments only."),
    ConsumerSpec("teardown", Role.NODE_AGENT, Domain.TEARDOWN, (E.TEARDOWN_REQUESTED,),
                 "Teardown requests for this node only."),
    ConsumerSpec("offline", Role.JANITOR, Domain.NODES, (E.NODE_OFFLINE,),
                 "Nodes gone offline: fail and tear down their jobs."),
    ConsumerSpec("trust", Role.SCHEDULER, Domain.ATTESTATION, (E.ATTEST_VERIFIED, E.ATTEST_FAILED, E.ATTEST_REVOKED),
                 "Node attestation results: the registry's trust state."),
    ConsumerSpec("work", Role.ATTESTATION_VERIFIER, Domain.ATTESTATION,
                 (E.ATTEST_ENROLL_REQUESTED, E.ATTEST_REQUESTED, E.ATTEST_EVIDENCE),
                 "Enrollments, challenge requests and evidence: one work queue shared by all verifier replicas.",
                 ack_wait_s=10.0, backoff_s=(0.2, 0.5, 1.0, 2.0, 5.0)),
    ConsumerSpec("withdrawals", Role.ATTESTATION_VERIFIER, Domain.NODES, (E.NODE_REVOKED, E.NODE_TAMPERED,
                                                                           E.NODE_CLEARED),
                 "Nodes the operator withdrew or a node's runtime guard caught tampering with an instance: revoke "
                 "their trust (which stops their jobs and keys); the operator's clearance lets them attest again."),
    ConsumerSpec("attestation", Role.NODE_AGENT, Domain.ATTESTATION,
                 (E.ATTEST_CHALLENGE, E.ATTEST_VERIFIED, E.ATTEST_FAILED),
                 "This node's challenges and node-level verdicts."),
    ConsumerSpec("verdicts", Role.NODE_AGENT, Domain.JOBS, (E.INSTANCE_ATTESTED, E.INSTANCE_ATTESTATION_FAILED),
                 "Verdicts on this node's instances (the workload waits for one)."),
    ConsumerSpec("revocations", Role.JANITOR, Domain.ATTESTATION, (E.ATTEST_REVOKED,),
                 "Nodes that lost their trust: fail and tear down their jobs."),
    ConsumerSpec("jobs", Role.KEY_BROKER, Domain.JOBS,
                 (E.JOB_SUBMITTED, E.INSTANCE_PROVISIONING, E.INSTANCE_ATTESTED, E.INSTANCE_ATTESTATION_FAILED,
                  E.INSTANCE_DESTROYED, E.JOB_FAILED, E.JOB_CANCELLED, E.JOB_DONE),
                 "Key-release work, shared by all key-broker replicas: make a job's key, release it to the "
                 "attested instance, destroy it when the job or its instance ends.",
                 ack_wait_s=10.0, backoff_s=(0.2, 0.5, 1.0, 2.0, 5.0)),
    ConsumerSpec("revocations", Role.KEY_BROKER, Domain.ATTESTATION, (E.ATTEST_REVOKED,),
                 "Nodes that lost their trust: destroy the keys of their jobs, release nothing to them."),
    ConsumerSpec("keys", Role.NODE_AGENT, Domain.KEYS, (E.KEY_RELEASED, E.KEY_RELEASE_REFUSED, E.SECRETS_RELEASED),
                 "Keys and client secrets sealed to this node's instances (the workload waits for them)."),
)


@dataclass(frozen=True)
class ReaderSpec:
    """`role` may read the whole of `domain`'s stream by message gets (no consumer), for `why`; `events` are
    the ones it acts on (the permission covers the stream: what else is there is sealed or harmless)."""

    role: Role
    domain: Domain
    events: tuple[EventType, ...]
    why: str

    @property
    def stream(self) -> str:
        return STREAMS[self.domain].name


_FOLDED = tuple(e for e in EventType if CATALOGUE[e].domain is Domain.JOBS and e is not E.INSTANCE_OUTPUT)
"""The job-stream events a fold of a job's state reads (`shared/lifecycle.py`)."""

READERS: tuple[ReaderSpec, ...] = (
    ReaderSpec(Role.SCHEDULER, Domain.JOBS, (E.JOB_SUBMITTED,),
               "A job's submission read back when a node refuses it; a replayed submission told from the first."),
    ReaderSpec(Role.JANITOR, Domain.JOBS, _FOLDED,
               "Every job's history, folded: deadlines, lost nodes, late instances."),
    ReaderSpec(Role.JANITOR, Domain.KEYS, (E.KEYS_DESTROYED,),
               "Key destruction reports, for the teardown records (releases are sealed)."),
    ReaderSpec(Role.JANITOR, Domain.TEARDOWN, (E.TEARDOWN_RECORD,),
               "Its own earlier teardown records (one per job, across restarts)."),
    ReaderSpec(Role.MARKETPLACE, Domain.JOBS, (*_FOLDED, E.INSTANCE_OUTPUT),
               "Its clients' jobs: state, attestation results and their output (sealed to each client's key)."),
    ReaderSpec(Role.MARKETPLACE, Domain.ATTESTATION,
               (E.ATTEST_ENROLL_REQUESTED, E.ATTEST_CHALLENGE, E.ATTEST_EVIDENCE),
               "The challenge, quote, log and AK enrollment behind an instance's result, which clients check."),
    ReaderSpec(Role.ADMIN, Domain.DEAD, (E.EVENT_REJECTED,),
               "The operator's audit: every dead letter with the signed report that proves its origin."),
)
"""Who may read which stream's history. Nodes read nothing but their own durables; the key-broker and the
verifier work from their durables and KV buckets alone."""


def consumers_for(ident: Identity) -> list[ConsumerSpec]:
    return [c for c in CONSUMERS if c.role is ident.role]


def durables_for(ident: Identity) -> list[Durable]:
    return [d for c in consumers_for(ident) for d in c.durables(ident)]


def readable_streams(role: Role) -> list[str]:
    return [r.stream for r in READERS if r.role is role]


def consumers_of(event: EventType) -> frozenset[Role]:
    """Who consumes `event`: the roles whose durables or readers declare it (the catalogue's one answer)."""
    return frozenset({c.role for c in CONSUMERS if event in c.events} | {r.role for r in READERS if event in r.events})


def consumer_spec(role: Role, key: str) -> ConsumerSpec:
    """The declared consumer `key` of `role` (a KeyError names a consumer nobody declared)."""
    for c in CONSUMERS:
        if c.role is role and c.key == key:
            return c
    raise KeyError(f"no consumer {key!r} declared for {role}")
