"""Codec: signed msgpack round trips, and every rejection with its exact `Reason`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from shared.codec import MAX_MESSAGE_BYTES, WIRE_VERSION, Codec, Event
from shared.errors import Reason, RejectedEvent
from shared.events import (
    CATALOGUE,
    AttestationFailed,
    AttestationResult,
    AttestChallenge,
    AttestEvidence,
    AttestPurpose,
    AttestRequested,
    EnrollRequested,
    EventRejected,
    EventType,
    GpuEvidence,
    GuardAction,
    InstanceAttestationFailed,
    InstanceAttested,
    InstanceBooted,
    InstanceDestroyed,
    InstanceExited,
    InstanceFailed,
    InstanceOutput,
    InstanceProvisioning,
    InstanceRunning,
    InstanceSuspicious,
    JobAccepted,
    JobCancelled,
    JobCancelRequested,
    JobDone,
    JobFailed,
    JobPending,
    JobPlaced,
    JobRefused,
    JobSubmitted,
    KeyDestruction,
    KeyReleased,
    KeyReleasePolicy,
    KeyReleaseRefused,
    KeysDestroyed,
    NodeCleared,
    NodeHeartbeat,
    NodeOffline,
    NodeRegistered,
    NodeRevoked,
    NodeSwept,
    NodeTampered,
    NodeWithdrawn,
    SecretsReleased,
    Severity,
    TeardownRecord,
    TeardownRequested,
    TeardownStep,
    VerifiedClaims,
)
from shared.identity import Identity, Role
from shared.ids import new_event_id
from shared.models import (
    GpuInfo,
    GpuRequest,
    HardwareProfile,
    Inventory,
    MemoryScrub,
    ResourceClaim,
    SecurityLevel,
    TpmInfo,
    TrustState,
    VolumeErasure,
    VramScrub,
)
from shared.pki import Pki, Signer

MARKET = Identity(Role.MARKETPLACE)
SCHED = Identity(Role.SCHEDULER)
JANITOR = Identity(Role.JANITOR)
NODE_A = Identity(Role.NODE_AGENT, "node-a")
NODE_B = Identity(Role.NODE_AGENT, "node-b")
VERIFIER = Identity(Role.ATTESTATION_VERIFIER)
BROKER = Identity(Role.KEY_BROKER)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    p = Pki(tmp_path_factory.mktemp("codec") / "pki")
    p.init(nodes=("node-a", "node-b"))
    return p


@pytest.fixture(scope="module")
def reader(pki: Pki) -> Codec:
    """A verifying codec with no signing key (what a consumer uses)."""
    return Codec(None, pki.load_trust())


def codec_for(pki: Pki, ident: Identity) -> Codec:
    return Codec(pki.signer(ident), pki.load_trust())


def unwrap(data: bytes) -> tuple[int, bytes, str, bytes]:
    version, env_bytes, signer, sig = msgpack.unpackb(data, raw=False)[:4]  # node-agents add their certificate
    return version, env_bytes, signer, sig


def envelope_of(data: bytes) -> dict[str, Any]:
    env = msgpack.unpackb(unwrap(data)[1], raw=False)
    assert isinstance(env, dict)
    return env


def wire(env: dict[str, Any], signer: Signer, *, claimed: str | None = None, version: int = WIRE_VERSION) -> bytes:
    """Hand-built wire bytes: `env` packed and signed by `signer`, announcing `claimed` (default: signer)."""
    env_bytes = msgpack.packb(env, use_bin_type=True)
    signer_name = claimed if claimed is not None else str(signer.identity)
    return msgpack.packb([version, env_bytes, signer_name, signer.sign(env_bytes)], use_bin_type=True)


def rejected(reader: Codec, subject: str, data: bytes) -> RejectedEvent:
    with pytest.raises(RejectedEvent) as info:
        reader.decode(subject, data)
    return info.value


# ---------------------------------------------------------------- round trips

ROUND_TRIPS = [
    pytest.param(
        MARKET,
        JobSubmitted(owner="alice", image="registry/img:1", command=("python", "train.py"),
                     profile=HardwareProfile(cpu_cores=8, ram_mib=32768, gpus=GpuRequest(count=1, model="H100")),
                     security=SecurityLevel.CONFIDENTIAL, max_runtime_s=7200),
        {"job_id": "job-1"}, "qvm.jobs.job-1.submitted", id="job.submitted",
    ),
    pytest.param(
        SCHED,
        JobPlaced(node_id="node-a", attempt=2, claim=ResourceClaim(cpu_cores=4, ram_mib=2048, gpu_uuids=("GPU-1",)), job=JobSubmitted(owner='o', image='i')),
        {"job_id": "job-1", "node_id": "node-a"}, "qvm.jobs.job-1.placed.node-a", id="job.placed",
    ),
    pytest.param(
        NODE_A, JobAccepted(node_id="node-a", attempt=2), {"job_id": "job-1"},
        "qvm.jobs.job-1.accepted.node-a", id="job.accepted",
    ),
    pytest.param(
        NODE_B, NodeHeartbeat(seq=7, jobs=("job-1", "job-2")), {}, "qvm.nodes.node-b.heartbeat",
        id="node.heartbeat",
    ),
    pytest.param(
        NODE_A,
        NodeRegistered(inventory=Inventory(hostname="h", cpu_model="EPYC", cpu_cores=64, ram_mib=1 << 19,
                                           kvm=True, vmms=("qemu-microvm",)),
                       agent_version="0.1.0", labels={"zone": "eu"}),
        {}, "qvm.nodes.node-a.registered", id="node.registered",
    ),
    pytest.param(
        JANITOR, JobFailed(reason="deadline_exceeded", detail="late", phase="placed"), {"job_id": "job-9"},
        "qvm.jobs.job-9.failed", id="job.failed",
    ),
    pytest.param(
        MARKET, JobCancelRequested(), {"job_id": "job-9"}, "qvm.jobs.job-9.cancel_requested",
        id="job.cancel_requested",
    ),
    pytest.param(
        JANITOR, TeardownRequested(node_id="node-b", reason="node_lost"), {"job_id": "job-9", "node_id": "node-b"},
        "qvm.teardown.job-9.requested.node-b", id="teardown.requested",
    ),
    pytest.param(
        SCHED,
        EventRejected(consumer="scheduler-jobs", subject="qvm.jobs.x.submitted", stream_seq=3,
                      reason=Reason.BAD_SIGNATURE, detail="nope", size=10),
        {}, "qvm.dead.rejected.scheduler", id="event.rejected",
    ),
    pytest.param(
        NODE_A,
        EventRejected(consumer="node-agent_node-a-assignments", subject="qvm.jobs.x.placed.node-a", stream_seq=4,
                      reason=Reason.MALFORMED, detail="", size=1),
        {}, "qvm.dead.rejected.node-agent.node-a", id="event.rejected-by-node-agent",
    ),
]


@pytest.mark.parametrize(("ident", "payload", "ids", "subject"), ROUND_TRIPS)
def test_round_trip(pki: Pki, reader: Codec, ident: Identity, payload: Any, ids: dict[str, str],
                    subject: str) -> None:
    out = codec_for(pki, ident).encode(payload, trace={"traceparent": "00-abc-def-01"}, **ids)
    assert out.subject == subject
    assert out.event_id == out.envelope.id
    ev = reader.decode(out.subject, out.data)
    assert isinstance(ev, Event)
    assert ev.payload == payload
    assert type(ev.payload) is type(payload)
    assert ev.envelope == out.envelope
    assert ev.envelope.producer == str(ident)
    assert ev.id == out.event_id
    assert ev.subject == subject
    assert ev.spec.payload is type(payload)
    assert ev.job_id == ids.get("job_id")
    assert ev.envelope.trace == {"traceparent": "00-abc-def-01"}
    if ident.role is Role.NODE_AGENT and ev.spec.node_scoped:
        assert ev.node_id == ident.node_id


def test_encode_keeps_given_id_and_time(pki: Pki, reader: Codec) -> None:
    eid = new_event_id()
    out = codec_for(pki, MARKET).encode(JobSubmitted(owner="o", image="i"), job_id="j1", event_id=eid, time_ns=42)
    ev = reader.decode(out.subject, out.data)
    assert ev.id == eid
    assert ev.envelope.time_ns == 42


def test_node_agent_cannot_encode_for_another_node(pki: Pki, reader: Codec) -> None:
    """Node-scoped events always carry the signer's own node, whatever the caller passes."""
    out = codec_for(pki, NODE_A).encode(NodeHeartbeat(seq=1), node_id="node-b")
    assert out.subject == "qvm.nodes.node-a.heartbeat"
    assert reader.decode(out.subject, out.data).node_id == "node-a"


def test_codec_without_key_cannot_encode(reader: Codec) -> None:
    with pytest.raises(RuntimeError):
        reader.encode(JobSubmitted(owner="o", image="i"), job_id="j1")


# ---------------------------------------------------------------- rejections


@pytest.fixture(scope="module")
def submitted(pki: Pki) -> tuple[str, bytes]:
    out = codec_for(pki, MARKET).encode(JobSubmitted(owner="alice", image="img"), job_id="j1")
    return out.subject, out.data


def test_unknown_signer(tmp_path: Path, pki: Pki, reader: Codec) -> None:
    """A key from another CA, even for an identity name we know, is refused; so is an unknown name."""
    other = Pki(tmp_path / "other")
    other.init(nodes=("node-z",))
    foreign = Codec(other.signer(Identity(Role.NODE_AGENT, "node-z")), other.load_trust())
    out = foreign.encode(NodeHeartbeat(seq=1))
    assert rejected(reader, out.subject, out.data).reason is Reason.UNKNOWN_SIGNER
    # The same identity name as a trusted one, but the other CA's key: the name is known, the key is not.
    fake_market = Codec(other.signer(MARKET), other.load_trust())
    out = fake_market.encode(JobSubmitted(owner="o", image="i"), job_id="j1")
    assert rejected(reader, out.subject, out.data).reason is Reason.BAD_SIGNATURE


def test_bad_signature_flipped_byte(reader: Codec, submitted: tuple[str, bytes]) -> None:
    subject, data = submitted
    version, env_bytes, signer, sig = unwrap(data)
    for i in (0, len(env_bytes) // 2, len(env_bytes) - 1):
        tampered = bytearray(env_bytes)
        tampered[i] ^= 0x01
        bad = msgpack.packb([version, bytes(tampered), signer, sig], use_bin_type=True)
        assert rejected(reader, subject, bad).reason is Reason.BAD_SIGNATURE
    # A flipped signature bit too.
    bad_sig = bytes([sig[0] ^ 0x80]) + sig[1:]
    bad = msgpack.packb([version, env_bytes, signer, bad_sig], use_bin_type=True)
    assert rejected(reader, subject, bad).reason is Reason.BAD_SIGNATURE


def test_signature_of_another_signer(pki: Pki, reader: Codec, submitted: tuple[str, bytes]) -> None:
    """Valid envelope and signature, but the wire names a different (trusted) signer."""
    subject, data = submitted
    version, env_bytes, _, sig = unwrap(data)
    bad = msgpack.packb([version, env_bytes, "scheduler", sig], use_bin_type=True)
    assert rejected(reader, subject, bad).reason is Reason.BAD_SIGNATURE


def test_forged_producer(pki: Pki, reader: Codec, submitted: tuple[str, bytes]) -> None:
    """Signed correctly by marketplace, but the envelope claims the scheduler produced it."""
    subject, data = submitted
    env = envelope_of(data)
    env["producer"] = "scheduler"
    rej = rejected(reader, subject, wire(env, pki.signer(MARKET)))
    assert rej.reason is Reason.PRODUCER_NOT_ALLOWED
    assert "differs from signer" in rej.detail


def test_forged_producer_node_b_key_claims_node_a(pki: Pki, reader: Codec) -> None:
    out = codec_for(pki, NODE_A).encode(NodeHeartbeat(seq=3))
    env = envelope_of(out.data)
    # node-b signs node-a's heartbeat (and says so on the wire): producer != signer.
    assert rejected(reader, out.subject, wire(env, pki.signer(NODE_B))).reason is Reason.PRODUCER_NOT_ALLOWED
    # node-b signs it but the wire claims node-a: the signature does not verify under node-a's key.
    forged = wire(env, pki.signer(NODE_B), claimed=str(NODE_A))
    assert rejected(reader, out.subject, forged).reason is Reason.BAD_SIGNATURE


def test_unknown_type(pki: Pki, reader: Codec, submitted: tuple[str, bytes]) -> None:
    subject, data = submitted
    env = envelope_of(data)
    env["type"] = "job.exploded"
    assert rejected(reader, subject, wire(env, pki.signer(MARKET))).reason is Reason.UNKNOWN_TYPE


def test_wrong_schema_version(pki: Pki, reader: Codec, submitted: tuple[str, bytes]) -> None:
    subject, data = submitted
    env = envelope_of(data)
    env["v"] = 2
    assert rejected(reader, subject, wire(env, pki.signer(MARKET))).reason is Reason.UNSUPPORTED_VERSION


def test_producer_role_not_allowed(pki: Pki, reader: Codec) -> None:
    claim = ResourceClaim(cpu_cores=1, ram_mib=64)
    out = codec_for(pki, MARKET).encode(JobPlaced(node_id="node-a", attempt=0, claim=claim, job=JobSubmitted(owner='o', image='i')), job_id="j1",
                                        node_id="node-a")
    assert out.subject == "qvm.jobs.j1.placed.node-a"
    rej = rejected(reader, out.subject, out.data)
    assert rej.reason is Reason.PRODUCER_NOT_ALLOWED
    assert "job.placed" in rej.detail
    # A node-agent may not submit jobs either.
    out = codec_for(pki, NODE_A).encode(JobSubmitted(owner="o", image="i"), job_id="j1")
    assert rejected(reader, out.subject, out.data).reason is Reason.PRODUCER_NOT_ALLOWED


def test_node_agent_speaking_for_another_node(pki: Pki, reader: Codec) -> None:
    out = codec_for(pki, NODE_A).encode(JobAccepted(node_id="node-a", attempt=0), job_id="j1")
    env = envelope_of(out.data)
    env["node_id"] = "node-b"
    env["payload"]["node_id"] = "node-b"
    rej = rejected(reader, "qvm.jobs.j1.accepted.node-b", wire(env, pki.signer(NODE_A)))
    assert rej.reason is Reason.PRODUCER_NOT_ALLOWED
    assert "node-b" in rej.detail
    # Heartbeat for node-b, signed by node-a.
    hb = envelope_of(codec_for(pki, NODE_A).encode(NodeHeartbeat(seq=1)).data)
    hb["node_id"] = "node-b"
    rej = rejected(reader, "qvm.nodes.node-b.heartbeat", wire(hb, pki.signer(NODE_A)))
    assert rej.reason is Reason.PRODUCER_NOT_ALLOWED


def test_subject_mismatch(pki: Pki, reader: Codec, submitted: tuple[str, bytes]) -> None:
    subject, data = submitted
    assert reader.decode(subject, data).subject == subject  # sanity: the original subject passes
    for other in ("qvm.jobs.j2.submitted", "qvm.jobs.j1.cancel_requested", "qvm.nodes.node-a.heartbeat"):
        assert rejected(reader, other, data).reason is Reason.SUBJECT_MISMATCH
    hb = codec_for(pki, NODE_A).encode(NodeHeartbeat(seq=1))
    assert rejected(reader, "qvm.nodes.node-b.heartbeat", hb.data).reason is Reason.SUBJECT_MISMATCH


def test_payload_node_differs_from_envelope_node(pki: Pki, reader: Codec) -> None:
    claim = ResourceClaim(cpu_cores=1, ram_mib=64)
    out = codec_for(pki, SCHED).encode(JobPlaced(node_id="node-a", attempt=0, claim=claim, job=JobSubmitted(owner='o', image='i')), job_id="j1",
                                       node_id="node-b")
    assert out.subject == "qvm.jobs.j1.placed.node-b"
    assert rejected(reader, out.subject, out.data).reason is Reason.SUBJECT_MISMATCH


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda env: env["payload"].pop("image"), id="missing-field"),
        pytest.param(lambda env: env["payload"].update(extra=1), id="unknown-field"),
        pytest.param(lambda env: env["payload"].update(max_runtime_s=0), id="out-of-range"),
        pytest.param(lambda env: env["payload"].update(owner="x" * 200), id="too-long"),
        pytest.param(lambda env: env.update(payload={"owner": ["not", "a", "string"], "image": "i"}),
                     id="wrong-type"),
    ],
)
def test_schema_invalid_payload(pki: Pki, reader: Codec, submitted: tuple[str, bytes], mutate: Any) -> None:
    subject, data = submitted
    env = envelope_of(data)
    mutate(env)
    assert rejected(reader, subject, wire(env, pki.signer(MARKET))).reason is Reason.SCHEMA_INVALID


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda env: env.update(id="not-a-uuid"), id="bad-id"),
        pytest.param(lambda env: env.update(job_id="has.dot"), id="job-id-with-dot"),
        pytest.param(lambda env: env.pop("time_ns"), id="missing-time"),
        pytest.param(lambda env: env.update(trace={"k": "v" * 600}), id="trace-too-large"),
        pytest.param(lambda env: env.update(unexpected=True), id="extra-envelope-field"),
        pytest.param(lambda env: env.update(job_id=None), id="subject-needs-job-id"),
    ],
)
def test_schema_invalid_envelope(pki: Pki, reader: Codec, submitted: tuple[str, bytes], mutate: Any) -> None:
    subject, data = submitted
    env = envelope_of(data)
    mutate(env)
    assert rejected(reader, subject, wire(env, pki.signer(MARKET))).reason is Reason.SCHEMA_INVALID


def test_too_large(reader: Codec, submitted: tuple[str, bytes]) -> None:
    subject, data = submitted
    big = data + b"\x00" * (MAX_MESSAGE_BYTES + 1 - len(data))
    assert len(big) == MAX_MESSAGE_BYTES + 1
    assert rejected(reader, subject, big).reason is Reason.TOO_LARGE


def test_wire_version_2(pki: Pki, reader: Codec, submitted: tuple[str, bytes]) -> None:
    subject, data = submitted
    env = envelope_of(data)
    rej = rejected(reader, subject, wire(env, pki.signer(MARKET), version=2))
    assert rej.reason is Reason.UNSUPPORTED_VERSION
    assert "wire version 2" in rej.detail


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(msgpack.packb({"a": 1}), id="map"),
        pytest.param(msgpack.packb([1, b"x", "marketplace"]), id="three-elements"),
        pytest.param(msgpack.packb([True, b"x", "marketplace", b"s"]), id="bool-version"),
        pytest.param(msgpack.packb([1, "text", "marketplace", b"s"], use_bin_type=True), id="str-envelope"),
        pytest.param(msgpack.packb([1, b"x", 5, b"s"], use_bin_type=True), id="int-signer"),
    ],
)
def test_malformed(reader: Codec, data: bytes) -> None:
    assert rejected(reader, "qvm.jobs.j1.submitted", data).reason is Reason.MALFORMED


def test_envelope_not_a_map(pki: Pki, reader: Codec) -> None:
    signer = pki.signer(MARKET)
    env_bytes = msgpack.packb(["a", "list"])
    data = msgpack.packb([1, env_bytes, "marketplace", signer.sign(env_bytes)], use_bin_type=True)
    assert rejected(reader, "qvm.jobs.j1.submitted", data).reason is Reason.MALFORMED


def test_rejection_reason_strings_are_stable() -> None:
    """Reasons travel in headers (`Qvm-Reason`) and reports; their values are part of the contract."""
    assert Reason.UNKNOWN_SIGNER.value == "unknown_signer"
    assert Reason.HANDLER_FAILED.value == "handler_failed"
    assert {e.value for e in EventType} >= {"job.submitted", "job.placed", "event.rejected"}


# ---------------------------------------------------------------- strict types on the wire
#
# Every message is untrusted: a field's type is what msgpack decoded, never a coercion. The only forms read
# back are the ones `Codec.encode` writes (`model_dump(mode="json")`): arrays for tuples, value strings for
# enums, canonical decimal strings for int dict keys, and an int for a float field.


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda env: env.update(v=True), id="envelope-v-true"),
        pytest.param(lambda env: env.update(time_ns=1.0), id="envelope-float-time"),
        pytest.param(lambda env: env.update(producer=b"marketplace"), id="envelope-bytes-producer"),
        pytest.param(lambda env: env.update(trace={"traceparent": 5}), id="envelope-int-trace-value"),
        pytest.param(lambda env: env["payload"].update(max_runtime_s=True), id="bool-for-int"),
        pytest.param(lambda env: env["payload"].update(max_runtime_s="3600"), id="numeric-string-for-int"),
        pytest.param(lambda env: env["payload"].update(max_runtime_s=3600.0), id="float-1.0-for-int"),
        pytest.param(lambda env: env["payload"].update(client_secrets="1"), id="string-1-for-bool"),
        pytest.param(lambda env: env["payload"].update(client_secrets=1), id="int-1-for-bool"),
        pytest.param(lambda env: env["payload"].update(owner=b"alice"), id="bytes-for-str"),
        pytest.param(lambda env: env["payload"].update(owner=7), id="int-for-str"),
        pytest.param(lambda env: env["payload"].update(security=b"basic"), id="bytes-for-enum"),
        pytest.param(lambda env: env["payload"].update(command="python"), id="string-for-tuple"),
        pytest.param(lambda env: env["payload"].update(command={"python": 1}), id="map-for-tuple"),
        pytest.param(lambda env: env["payload"].update(profile={"cpu_cores": True}), id="nested-bool-for-int"),
        pytest.param(lambda env: env["payload"].update(profile={"gpus": {"count": "1"}}), id="nested-string-for-int"),
        pytest.param(lambda env: env["payload"].update(key_release={"min_trust": 2}), id="nested-int-for-enum"),
    ],
)
def test_wire_types_are_exact(pki: Pki, reader: Codec, submitted: tuple[str, bytes], mutate: Any) -> None:
    subject, data = submitted
    env = envelope_of(data)
    mutate(env)
    rej = rejected(reader, subject, wire(env, pki.signer(MARKET)))
    assert rej.reason is Reason.SCHEMA_INVALID, rej.detail


def test_wire_forms_msgpack_produces_are_valid(pki: Pki, reader: Codec, submitted: tuple[str, bytes]) -> None:
    """Lists for tuples, strings for enums, ints for floats: what msgpack gives for what encode wrote."""
    subject, data = submitted
    env = envelope_of(data)
    env["payload"].update(command=["python", "-c", "pass"], security="confidential",
                          key_release={"min_trust": "unverified", "allowed_images": ["ab" * 32]})
    ev = reader.decode(subject, wire(env, pki.signer(MARKET)))
    assert isinstance(ev.payload, JobSubmitted)
    assert ev.payload.command == ("python", "-c", "pass")
    assert ev.payload.security is SecurityLevel.CONFIDENTIAL
    assert ev.payload.key_release.min_trust is TrustState.UNVERIFIED
    assert ev.payload.key_release.allowed_images == ("ab" * 32,)
    booted = envelope_of(codec_for(pki, NODE_A).encode(InstanceBooted(instance_id="i1", boot_ms=12.5, accel="kvm"),
                                                       job_id="j1").data)
    booted["payload"]["boot_ms"] = 12  # an int for a float field (JSON and msgpack writers may drop ".0")
    ev = reader.decode("qvm.jobs.j1.instance.booted.node-a", wire(booted, pki.signer(NODE_A)))
    assert isinstance(ev.payload, InstanceBooted)
    assert ev.payload.boot_ms == 12.0 and type(ev.payload.boot_ms) is float
    booted["payload"]["boot_ms"] = True
    rej = rejected(reader, "qvm.jobs.j1.instance.booted.node-a", wire(booted, pki.signer(NODE_A)))
    assert rej.reason is Reason.SCHEMA_INVALID


def _evidence() -> AttestEvidence:
    return AttestEvidence(
        challenge_id="0" * 32, purpose=AttestPurpose.NODE, attest="00" * 8, signature="11" * 8,
        pcrs={0: "aa" * 32, 7: "bb" * 32, 10: "cc" * 32},
        log=({"pcr": 10, "digest": "ab" * 32, "names": ["a", "b"], "extra": {"n": 1}},),
        gpus=(GpuEvidence(uuid="GPU-1", cc_mode="on"),))


def test_int_dict_keys_round_trip_as_canonical_strings(pki: Pki, reader: Codec) -> None:
    """`AttestEvidence.pcrs: dict[int, str]`: encode writes the keys as decimal strings (JSON mode) and decode
    reads back only that form: no "07", " 7", "7.0" or "+7" aliasing the key 7."""
    out = codec_for(pki, NODE_A).encode(_evidence())
    env = envelope_of(out.data)
    assert set(env["payload"]["pcrs"]) == {"0", "7", "10"}
    ev = reader.decode(out.subject, out.data)
    assert isinstance(ev.payload, AttestEvidence)
    assert ev.payload == _evidence()
    assert ev.payload.pcrs == {0: "aa" * 32, 7: "bb" * 32, 10: "cc" * 32}
    assert ev.payload.log[0]["names"] == ["a", "b"]  # free-form log entries keep msgpack's own types
    for key in ("07", " 7", "7.0", "+7", "7_0", "-0", "", "x", "\u0667"):
        env["payload"]["pcrs"] = {key: "bb" * 32}
        rej = rejected(reader, out.subject, wire(env, pki.signer(NODE_A)))
        assert rej.reason is Reason.SCHEMA_INVALID, key


def _samples() -> dict[EventType, tuple[Identity, Any, dict[str, str]]]:
    """One event of every catalogue type, with values in every kind of field (enums, tuples, dicts, floats,
    optional and nested models, literals)."""
    hexes = "ab" * 32
    scrub = VramScrub(gpu_uuid="GPU-1", pci_bus_id="0000:01:00.0", method="cuda-memset-verify", bytes_total=1 << 30,
                      bytes_scrubbed=1 << 30, verified=True, duration_ms=12.5, rate_gbps=80.0)
    ram = MemoryScrub(bytes_total=1 << 20, bytes_scrubbed=1 << 20, method="overwrite-verify", verified=True,
                      duration_ms=1.0, rate_gbps=3.5)
    volume = VolumeErasure(volume_bytes=1 << 24, luks_header_found=True, luks_erase="ok", data_offset=1 << 24,
                           overwritten_bytes=1 << 24, verified_zero=True, removed=True, duration_ms=4.0)
    keys = KeyDestruction(kek_version=2, wrapped_sha256=hexes, wrapped_deleted=True, store_revision=9)
    result = dict(purpose=AttestPurpose.INSTANCE, challenge_id="1" * 32, evidence_id="e1", instance_id="i1",
                  job_id="j1", trust=TrustState.TRUSTED, ak_name="00" * 34, ek_sha256=hexes, pcr_sha256=hexes,
                  reset_count=1, restart_count=0, firmware_version="1.2", gpus=("ok",), verified_ns=5, expires_ns=9)
    job = JobSubmitted(owner="alice", image="img", command=("a", "b"), security=SecurityLevel.CONFIDENTIAL,
                       egress=("example.com:443",), volume_mib=64, client_secrets=True,
                       key_release=KeyReleasePolicy(allowed_images=(hexes,), min_trust=TrustState.UNVERIFIED))
    inventory = Inventory(hostname="h", cpu_model="EPYC", cpu_cores=64, ram_mib=1 << 19, kvm=True,
                          vmms=("qemu-microvm",), tpm=TpmInfo(present=True, device="/dev/tpmrm0"),
                          gpus=(GpuInfo(index=0, uuid="GPU-1", name="H100", memory_mib=81559, pci_bus_id="01:00.0",
                                        ecc_enabled=True, remapped_rows=0, mig_enabled=False, cc_mode="on"),))
    j, jn = {"job_id": "j1"}, {"job_id": "j1", "node_id": "node-a"}
    E = EventType
    return {
        E.JOB_SUBMITTED: (MARKET, job, j),
        E.JOB_PENDING: (SCHED, JobPending(reason="no_capacity", detail="d"), j),
        E.JOB_PLACED: (SCHED, JobPlaced(node_id="node-a", attempt=1, job=job,
                                        claim=ResourceClaim(cpu_cores=2, ram_mib=64, gpu_uuids=("GPU-1",))), jn),
        E.JOB_ACCEPTED: (NODE_A, JobAccepted(node_id="node-a", attempt=1), j),
        E.JOB_REFUSED: (NODE_A, JobRefused(node_id="node-a", attempt=1, reason="gpu_missing"), j),
        E.JOB_CANCEL_REQUESTED: (MARKET, JobCancelRequested(reason="client"), j),
        E.JOB_CANCELLED: (SCHED, JobCancelled(reason="client"), j),
        E.JOB_FAILED: (JANITOR, JobFailed(reason="node_lost", phase="running"), j),
        E.JOB_DONE: (JANITOR, JobDone(exit_code=0), j),
        E.INSTANCE_PROVISIONING: (NODE_A, InstanceProvisioning(instance_id="i1", image="img", vmm="qemu",
                                                               image_manifest_sha256=hexes, public_key=hexes), j),
        E.INSTANCE_BOOTED: (NODE_A, InstanceBooted(instance_id="i1", boot_ms=5.0, accel="tcg"), j),
        E.INSTANCE_RUNNING: (NODE_A, InstanceRunning(instance_id="i1"), j),
        E.INSTANCE_OUTPUT: (NODE_A, InstanceOutput.model_validate(_output_fields()), j),
        E.INSTANCE_EXITED: (NODE_A, InstanceExited.model_validate(_exited_fields(hexes)), j),
        E.INSTANCE_FAILED: (NODE_A, InstanceFailed(instance_id="i1", reason="boot_timeout"), j),
        E.INSTANCE_SUSPICIOUS: (NODE_A, InstanceSuspicious(
            instance_id="i1", rule="vmm_exec", severity=Severity.CRITICAL, enforced=False, action=GuardAction.STOP,
            pid=5, comm="qemu", detail="/bin/sh", detected_ns=3), j),
        E.INSTANCE_DESTROYED: (NODE_A, InstanceDestroyed(instance_id="i1", removed=("dir",), volume=volume, ram=ram,
                                                         gpus=(scrub,)), j),
        E.INSTANCE_ATTESTED: (VERIFIER, InstanceAttested(**result), jn),
        E.INSTANCE_ATTESTATION_FAILED: (VERIFIER, InstanceAttestationFailed(
            purpose=AttestPurpose.INSTANCE, reason="nonce_mismatch", instance_id="i1", job_id="j1"), jn),
        E.NODE_REGISTERED: (NODE_A, NodeRegistered(inventory=inventory, agent_version="1", labels={"z": "eu"}), {}),
        E.NODE_HEARTBEAT: (NODE_A, NodeHeartbeat(seq=3, jobs=("j1",)), {}),
        E.NODE_OFFLINE: (SCHED, NodeOffline(last_seen_ns=7), {"node_id": "node-a"}),
        E.NODE_SWEPT: (NODE_A, NodeSwept(reason="sweep", gpus=(scrub,)), {}),
        E.NODE_REVOKED: (Identity(Role.ADMIN), NodeWithdrawn(reason="operator_revoked", detail="sold the host"),
                         {"node_id": "node-a"}),
        E.NODE_TAMPERED: (NODE_A, NodeTampered(rule="host_ptrace_vmm", instance_id="i1", pid=7, comm="cat",
                                               detail="/proc/9/mem"), {}),
        E.NODE_CLEARED: (Identity(Role.ADMIN), NodeCleared(reason="looked: a test"), {"node_id": "node-a"}),
        E.ATTEST_ENROLL_REQUESTED: (NODE_A, EnrollRequested(ek_public="00", ak_public="11", ak_qualified_name="22",
                                                            node_key=hexes), {}),
        E.ATTEST_REQUESTED: (NODE_A, AttestRequested(purpose=AttestPurpose.INSTANCE, instance_id="i1", job_id="j1",
                                                     key=hexes), {}),
        E.ATTEST_CHALLENGE: (VERIFIER, AttestChallenge(challenge_id="1" * 32, purpose=AttestPurpose.NODE,
                                                       nonce="ab" * 16, pcrs=(0, 7, 10), expires_ns=5),
                             {"node_id": "node-a"}),
        E.ATTEST_EVIDENCE: (NODE_A, _evidence(), {}),
        E.ATTEST_VERIFIED: (VERIFIER, AttestationResult(**{**result, "purpose": AttestPurpose.NODE}),
                            {"node_id": "node-a"}),
        E.ATTEST_FAILED: (VERIFIER, AttestationFailed(purpose=AttestPurpose.ENROLL, reason="pcr_digest_mismatch"),
                          {"node_id": "node-a"}),
        E.ATTEST_REVOKED: (VERIFIER, NodeRevoked(reason="attestation_failed", last_verified_ns=3),
                           {"node_id": "node-a"}),
        E.KEY_RELEASED: (BROKER, KeyReleased(instance_id="i1", result_id="r1", suite="x25519", sealed="ab" * 40,
                                             kek_version=1, released_ns=1, lease_expires_ns=2), jn),
        E.KEY_RELEASE_REFUSED: (BROKER, KeyReleaseRefused(instance_id="i1", reason="result_expired"), jn),
        E.KEYS_DESTROYED: (BROKER, KeysDestroyed(reason="job_failed", volume=keys, destroyed_ns=4), j),
        E.SECRETS_RELEASED: (MARKET, SecretsReleased(
            instance_id="i1", suite="x25519", sealed="ab" * 40,
            verified=VerifiedClaims(result_id="r1", evidence_id="e1", node_id="node-a", image_manifest_sha256=hexes,
                                    pcr_sha256=hexes, ak_name="00")), jn),
        E.TEARDOWN_REQUESTED: (JANITOR, TeardownRequested(node_id="node-a", reason="done"), jn),
        E.TEARDOWN_RECORD: (JANITOR, TeardownRecord(
            node="node-a", instance_id="i1", outcome="done", complete=True, ram=ram, gpus=(scrub,), volume=volume,
            keys=keys, steps=(TeardownStep(name="guest_ram", status="ok"), TeardownStep(name="x", status="not_needed")),
            gpus_clean=("GPU-1",), ended_ns=1, recorded_ns=2, duration_ms=3.25), j),
        E.EVENT_REJECTED: (NODE_A, EventRejected(consumer="c", subject="s", stream_seq=4, reason=Reason.MALFORMED,
                                                 detail="", size=1), {}),
    }


def _output_fields() -> dict[str, Any]:
    """`instance.output` as its current model wants it (only the fields it declares)."""
    fields = InstanceOutput.model_fields
    candidate = {"instance_id": "i1", "seq": 0, "suite": "x25519", "sealed": "ab" * 64, "data_b64": "aGk="}
    return {k: v for k, v in candidate.items() if k in fields}


def _exited_fields(hexes: str) -> dict[str, Any]:
    fields = InstanceExited.model_fields
    candidate = {"instance_id": "i1", "exit_code": 3, "runtime_ms": 1.5, "output_sha256": hexes, "output_bytes": 9,
                 "output_chunks": 1, "output_truncated": True}
    return {k: v for k, v in candidate.items() if k in fields}


def test_every_catalogue_type_round_trips(pki: Pki, reader: Codec) -> None:
    samples = _samples()
    assert set(samples) == set(CATALOGUE), "add a sample for every new event type"
    for etype, (ident, payload, ids) in samples.items():
        assert CATALOGUE[etype].payload is type(payload), etype
        out = codec_for(pki, ident).encode(payload, **ids)
        ev = reader.decode(out.subject, out.data)
        assert ev.spec.type is etype
        assert type(ev.payload) is type(payload), etype
        assert ev.payload == payload, etype
        assert ev.payload.model_dump() == payload.model_dump(), etype
        assert ev.envelope == out.envelope, etype


# ---------------------------------------------------------------- nodes that joined after the bundle was loaded

def test_a_node_issued_after_start_is_known_by_the_certificate_its_events_carry(tmp_path: Path) -> None:
    """A node that joined while the platform ran is not in any service's bundle: the CA-issued certificate
    on its events is what makes its signature count, and it is remembered for `key_for` afterwards."""
    pki = Pki(tmp_path / "pki")
    pki.init(nodes=())
    reader = Codec(None, pki.load_trust())  # loaded before the node existed
    late = Identity(Role.NODE_AGENT, "late-node")
    pki.issue(late)
    out = Codec(pki.signer(late), pki.load_trust()).encode(NodeHeartbeat(seq=1), node_id="late-node")
    assert len(msgpack.unpackb(out.data, raw=False)) == 5
    assert reader.trust.key_for(str(late)) is None
    event = reader.decode(out.subject, out.data)
    assert event.envelope.producer == str(late)
    assert reader.trust.key_for(str(late)) is not None


def test_a_presented_certificate_must_be_the_cas_and_name_the_signer(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init(nodes=("node-a", "node-b"))
    other = Pki(tmp_path / "other")
    other.init(nodes=("node-a",))
    reader = Codec(None, pki.load_trust())
    hb = NodeHeartbeat(seq=1)
    b = pki.signer(NODE_B)
    a_by_other_ca = other.signer(NODE_A)

    def five(signer: Signer, cert: object, claimed: str) -> bytes:
        env = envelope_of(Codec(signer, pki.load_trust()).encode(hb, node_id=signer.identity.node_id).data)
        env_bytes = msgpack.packb(env, use_bin_type=True)
        return msgpack.packb([WIRE_VERSION, env_bytes, claimed, signer.sign(env_bytes), cert], use_bin_type=True)

    subject = "qvm.nodes.node-a.heartbeat"
    # another CA's certificate for node-a, signed with that CA's node-a key
    assert rejected(reader, subject, five(a_by_other_ca, a_by_other_ca.certificate, "node-agent.node-a")
                    ).reason is Reason.UNKNOWN_SIGNER
    # node-b's real certificate presented for node-a
    assert rejected(reader, subject, five(b, b.certificate, "node-agent.node-a")).reason is Reason.UNKNOWN_SIGNER
    # garbage and wrong types
    assert rejected(reader, subject, five(b, b"\x30\x03junk", "node-agent.node-b")).reason is Reason.UNKNOWN_SIGNER
    assert rejected(reader, subject, five(b, "pem text", "node-agent.node-b")).reason is Reason.MALFORMED
    assert reader.trust.key_for("node-agent.node-a") == pki.load_trust().key_for("node-agent.node-a")
