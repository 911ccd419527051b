"""Property tests: whatever arrives on the wire, `Codec.decode` returns a verified event or raises
`RejectedEvent`, never anything else."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shared.codec import WIRE_VERSION, Codec, Event
from shared.errors import RejectedEvent
from shared.events import (
    CATALOGUE,
    EventRejected,
    JobAccepted,
    JobPlaced,
    JobRefused,
    JobSubmitted,
    NodeHeartbeat,
    NodeRegistered,
    TeardownRequested,
    spec_for,
    subject_for,
)
from shared.identity import Identity, Role
from shared.ids import new_event_id
from shared.models import Inventory, ResourceClaim
from shared.pki import Pki, Signer

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

IDENTITIES = [
    Identity(Role.MARKETPLACE), Identity(Role.SCHEDULER), Identity(Role.JANITOR), Identity(Role.ADMIN),
    Identity(Role.KEY_BROKER), Identity(Role.ATTESTATION_VERIFIER),
    Identity(Role.NODE_AGENT, "node-a"), Identity(Role.NODE_AGENT, "node-b"),
]
ENVELOPE_FIELDS = ["id", "type", "v", "time_ns", "producer", "job_id", "node_id", "instance_id", "trace",
                   "payload"]
PAYLOAD_FIELDS = sorted({name for spec in CATALOGUE.values() for name in spec.payload.model_fields})


class Keys:
    def __init__(self, pki: Pki) -> None:
        self.signers: dict[str, Signer] = {str(i): pki.signer(i) for i in IDENTITIES}
        self.reader = Codec(None, pki.load_trust())
        self.bases: list[tuple[str, bytes]] = []
        claim = ResourceClaim(cpu_cores=1, ram_mib=64)
        samples: list[tuple[Identity, Any, dict[str, str]]] = [
            (IDENTITIES[0], JobSubmitted(owner="alice", image="img", command=("a",)), {"job_id": "j1"}),
            (IDENTITIES[1], JobPlaced(node_id="node-a", attempt=0, claim=claim, job=JobSubmitted(owner='o', image='i')), {"job_id": "j1", "node_id": "node-a"}),
            (IDENTITIES[6], JobAccepted(node_id="node-a", attempt=0), {"job_id": "j1"}),
            (IDENTITIES[7], JobRefused(node_id="node-b", attempt=1, reason="gpu_missing"), {"job_id": "j2"}),
            (IDENTITIES[7], NodeHeartbeat(seq=1, jobs=("j1",)), {}),
            (IDENTITIES[6], NodeRegistered(inventory=Inventory(hostname="h", cpu_model="c", cpu_cores=2, ram_mib=8),
                                           agent_version="1"), {}),
            (IDENTITIES[2], TeardownRequested(node_id="node-b", reason="x"), {"job_id": "j3", "node_id": "node-b"}),
            (IDENTITIES[1], EventRejected(consumer="c", subject="s", stream_seq=0, reason="malformed", detail="",
                                          size=0), {}),
        ]
        for ident, payload, ids in samples:
            out = Codec(self.signers[str(ident)], self.reader.trust).encode(payload, **ids)
            assert isinstance(self.reader.decode(out.subject, out.data), Event)  # the bases are valid
            self.bases.append((out.subject, out.data))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    pki = Pki(tmp_path_factory.mktemp("fuzz") / "pki")
    pki.init(nodes=("node-a", "node-b"))
    return Keys(pki)


def check(reader: Codec, subject: str, data: bytes) -> Event | None:
    """The property: an `Event` that is fully consistent, or `RejectedEvent`; anything else fails the test."""
    try:
        ev = reader.decode(subject, data)
    except RejectedEvent as rej:
        assert rej.reason.value in str(rej)
        event(f"rejected: {rej.reason.value}")
        return None
    event("decoded")
    assert isinstance(ev, Event)
    assert isinstance(ev.payload, ev.spec.payload)
    assert ev.spec.payload.model_validate(ev.payload.model_dump(mode="json")) == ev.payload
    assert ev.subject == subject
    signer = msgpack.unpackb(data, raw=False)[2]
    assert ev.envelope.producer == signer
    ident = Identity.parse(signer)
    assert ident.role in ev.spec.producers
    if ident.role is Role.NODE_AGENT:
        assert ev.envelope.node_id == ident.node_id
    assert ev.subject == subject_for(ev.spec, job_id=ev.job_id, node_id=ev.node_id, producer=signer)
    return ev


# ---------------------------------------------------------------- strategies

ints64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.none() | st.booleans() | ints64 | st.floats() | st.text(max_size=24) | st.binary(max_size=24)
structures = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10) | st.binary(max_size=4) | ints64, children, max_size=5),
    max_leaves=20,
)
plausible = st.one_of(
    st.sampled_from([e.value for e in CATALOGUE] + ["job.exploded", ""]),
    st.sampled_from([str(i) for i in IDENTITIES] + ["node-agent", "node-agent.node-z", "nobody"]),
    st.sampled_from(["j1", "j2", "node-a", "node-b", "has.dot", "*", ">", "x" * 70, "NODE-A"]),
    st.builds(new_event_id),
    st.integers(min_value=-2, max_value=3),
    st.dictionaries(st.sampled_from(["traceparent", "tracestate", "k" * 70]), st.text(max_size=600), max_size=3),
)
values = st.one_of(structures, plausible)
mutation = st.tuples(
    st.sampled_from(["set", "delete", "set_payload", "delete_payload"]),
    st.sampled_from(ENVELOPE_FIELDS + PAYLOAD_FIELDS + ["extra"]),
    values,
)


def _pack(obj: Any) -> bytes | None:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return None


# ---------------------------------------------------------------- properties


@FUZZ
@given(data=st.binary(max_size=512), subject=st.sampled_from(["qvm.jobs.j1.submitted", "", "x"]))
def test_random_bytes_are_rejected(keys: Keys, data: bytes, subject: str) -> None:
    assert check(keys.reader, subject, data) is None


@FUZZ
@given(obj=structures)
def test_random_msgpack_structures_are_rejected(keys: Keys, obj: Any) -> None:
    data = _pack(obj)
    if data is not None:
        assert check(keys.reader, "qvm.jobs.j1.submitted", data) is None


@FUZZ
@given(obj=structures, who=st.sampled_from(IDENTITIES), subject=st.sampled_from(["qvm.jobs.j1.submitted", "a.b"]))
def test_signed_random_envelopes_are_rejected(keys: Keys, obj: Any, who: Identity, subject: str) -> None:
    """Correctly signed by a trusted key, but the envelope is a random structure."""
    env_bytes = _pack(obj)
    if env_bytes is None:
        return
    signer = keys.signers[str(who)]
    data = msgpack.packb([WIRE_VERSION, env_bytes, str(who), signer.sign(env_bytes)], use_bin_type=True)
    # A random structure has no "payload", "id", ... so it can never be a valid envelope.
    assert check(keys.reader, subject, data) is None


def _subject_for_env(env: dict[str, Any], signer: str) -> str | None:
    spec = spec_for(env.get("type")) if isinstance(env.get("type"), str) else None
    if spec is None:
        return None
    job_id, node_id = env.get("job_id"), env.get("node_id")
    try:
        return subject_for(spec, job_id=job_id if isinstance(job_id, str) else None,
                           node_id=node_id if isinstance(node_id, str) else None, producer=signer)
    except (ValueError, KeyError, IndexError):
        return None


@FUZZ
@given(
    base=st.integers(min_value=0, max_value=7),
    mutations=st.lists(mutation, min_size=1, max_size=4),
    signer_choice=st.sampled_from(["producer", *[str(i) for i in IDENTITIES]]),
    subject_choice=st.sampled_from(["base", "computed", "other"]),
)
def test_mutated_signed_envelopes(keys: Keys, base: int, mutations: list[tuple[str, str, Any]],
                                  signer_choice: str, subject_choice: str) -> None:
    """Real events with hypothesis-mutated envelope fields, re-signed by a trusted key."""
    base_subject, base_data = keys.bases[base]
    env = msgpack.unpackb(msgpack.unpackb(base_data, raw=False)[1], raw=False)
    for op, name, value in mutations:
        target = env["payload"] if op.endswith("_payload") and isinstance(env.get("payload"), dict) else env
        if op.startswith("set"):
            target[name] = value
        else:
            target.pop(name, None)
    env_bytes = _pack(env)
    if env_bytes is None:
        return
    producer = env.get("producer")
    if signer_choice != "producer":
        signer_name = signer_choice
    elif isinstance(producer, str) and producer in keys.signers:
        signer_name = producer  # sign as whoever the envelope claims, so later checks are reached
    else:
        signer_name = str(IDENTITIES[0])
    sig = keys.signers[signer_name].sign(env_bytes)
    data = msgpack.packb([WIRE_VERSION, env_bytes, signer_name, sig], use_bin_type=True)
    subject = {"base": base_subject, "computed": _subject_for_env(env, signer_name) or base_subject,
               "other": "qvm.jobs.other.submitted"}[subject_choice]
    ev = check(keys.reader, subject, data)
    if ev is not None:
        # Whatever passed is exactly what was signed.
        assert ev.payload == ev.spec.payload.model_validate(env["payload"])
        assert (ev.id, ev.envelope.type, ev.envelope.producer) == (env["id"], env["type"], signer_name)


KEEP = object()


DROP = object()  # the certificate element left out


def keep_or(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The base message's element about half the time, else a random one."""
    return st.tuples(st.booleans(), strategy).map(lambda t: KEEP if t[0] else t[1])


@FUZZ
@given(
    version=keep_or(st.one_of(st.just(2), scalars, structures)),
    env=keep_or(st.one_of(scalars, structures)),
    signer=keep_or(st.one_of(st.sampled_from([str(i) for i in IDENTITIES] + ["node-agent.node-z"]), scalars,
                             structures)),
    sig=keep_or(st.one_of(st.binary(min_size=64, max_size=64), scalars, structures)),
    cert=keep_or(st.one_of(st.just(DROP), st.binary(max_size=600), scalars, structures)),
    base=st.integers(min_value=0, max_value=7),
)
def test_wire_arrays_with_random_elements(keys: Keys, version: Any, env: Any, signer: Any, sig: Any, cert: Any,
                                          base: int) -> None:
    """The right outer shape (a 4-element array, or 5 with a node's certificate), with any element replaced
    by a random value (or the certificate dropped or added)."""
    subject, base_data = keys.bases[base]
    original = msgpack.unpackb(base_data, raw=False)
    padded = [*original, None] if len(original) == 4 else original
    elements = [o if e is KEEP else e for o, e in zip(padded, (version, env, signer, sig, cert), strict=True)]
    if elements[4] is None or elements[4] is DROP:
        elements = elements[:4]
    data = _pack(elements)
    if data is None:
        return
    ev = check(keys.reader, subject, data)
    if ev is not None:
        # Only the original elements (or equal values) can pass; a node's certificate may be left out
        # where the reader's bundle already knows its key.
        assert elements[:4] == original[:4]
        assert len(elements) == 4 or elements[4] == original[4]
