"""Every durable JetStream consumer qvm uses, declared next to the catalogue.

Declaring consumers (who reads which events from which stream) lets the NATS permission generator grant
each identity exactly the consumers it owns, and lets `qvm up` and the services provision them
idempotently. Node-agent consumers are per node: their name and filter carry the node id, so an agent
can only ever read its own assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.events import CATALOGUE, STREAMS, Domain, EventType, subject_filter
from shared.identity import Identity, Role

__all__ = ["CONSUMERS", "ConsumerSpec", "consumer_spec", "consumers_for"]


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

    def name(self, ident: Identity) -> str:
        return f"{ident.token}-{self.key}"

    def filters(self, ident: Identity) -> list[str]:
        fixed = {"node_id": ident.node_id} if ident.role is Role.NODE_AGENT and ident.node_id else {}
        return [subject_filter(CATALOGUE[e], **fixed) for e in self.events]


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


def consumers_for(ident: Identity) -> list[ConsumerSpec]:
    return [c for c in CONSUMERS if c.role is ident.role]


def consumer_spec(role: Role, key: str) -> ConsumerSpec:
    """The declared consumer `key` of `role` (a KeyError names a consumer nobody declared)."""
    for c in CONSUMERS:
        if c.role is role and c.key == key:
            return c
    raise KeyError(f"no consumer {key!r} declared for {role}")
