"""Workload output is the client's: sealed chunk by chunk to the job's output key (shared.crypto.output),
published only for jobs that give one (services.node_agent.output.run_workload), opened and verified by
the client (shared.client.output)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from pydantic import ValidationError

from services.node_agent.channel import RunOutput
from services.node_agent.output import OUTPUT_PUBLISHED_MAX, run_workload
from shared.cli.render import summarize
from shared.client.output import (
    OutputError,
    new_output_key,
    open_output_events,
    public_key_hex,
    with_output_key,
)
from shared.codec import Codec, Event
from shared.crypto import CryptoError
from shared.crypto.hpke import ENC_BYTES, SUITE_NAME, output_info, release_info
from shared.crypto.output import SEALED_OVERHEAD, SealedDigest, open_chunk, seal_chunk, sealed_digest
from shared.events import OUTPUT_CHUNK_BYTES, InstanceExited, InstanceOutput, JobPlaced, JobSubmitted
from shared.identity import Identity, Role
from shared.models import ResourceClaim
from shared.pki import Pki

JOB, INSTANCE = "job-1", "i-1"


@pytest.fixture
def key() -> x25519.X25519PrivateKey:
    return new_output_key()


def raw(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


# ---------------------------------------------------------------- the binding
def test_output_info_layout_and_separation() -> None:
    assert output_info("j", "i", 1) == b"qvm-key-release-v1\x00\x06output\x01j\x01i" + (1).to_bytes(8, "big")
    assert output_info("j", "i", 0) != output_info("j", "i", 1)
    with pytest.raises(CryptoError):
        release_info("output", "j", "i")  # a release can never be read as output, nor output as a release
    for seq in (-1, 2**63, True):
        with pytest.raises(CryptoError) as err:
            output_info("j", "i", seq)
        assert err.value.reason == "bad_release_info"


# ---------------------------------------------------------------- seal / open
def test_chunk_roundtrip(key: x25519.X25519PrivateKey) -> None:
    sealed = seal_chunk(b"hello\n", raw(key), JOB, INSTANCE, 3)
    assert len(sealed) == len(b"hello\n") + SEALED_OVERHEAD
    assert open_chunk(sealed, key, JOB, INSTANCE, 3) == b"hello\n"
    assert seal_chunk(b"hello\n", raw(key), JOB, INSTANCE, 3) != sealed  # a fresh ephemeral key every time


@pytest.mark.parametrize(("job", "instance", "seq"), [("job-2", INSTANCE, 0), (JOB, "i-2", 0), (JOB, INSTANCE, 1)])
def test_chunk_opens_only_as_what_it_was_sealed_as(key: x25519.X25519PrivateKey, job: str, instance: str,
                                                   seq: int) -> None:
    sealed = seal_chunk(b"output", raw(key), JOB, INSTANCE, 0)
    with pytest.raises(CryptoError) as err:
        open_chunk(sealed, key, job, instance, seq)
    assert err.value.reason == "unwrap_failed"


def test_chunk_opens_only_with_the_clients_key(key: x25519.X25519PrivateKey) -> None:
    sealed = seal_chunk(b"output", raw(key), JOB, INSTANCE, 0)
    with pytest.raises(CryptoError):
        open_chunk(sealed, new_output_key(), JOB, INSTANCE, 0)


def test_tampered_chunk_does_not_open(key: x25519.X25519PrivateKey) -> None:
    sealed = seal_chunk(b"some output", raw(key), JOB, INSTANCE, 0)
    for i in (0, ENC_BYTES - 1, ENC_BYTES, ENC_BYTES + 5, len(sealed) - 1):  # enc, ciphertext, tag
        tampered = bytearray(sealed)
        tampered[i] ^= 0x40
        with pytest.raises(CryptoError):
            open_chunk(bytes(tampered), key, JOB, INSTANCE, 0)
    with pytest.raises(CryptoError):
        open_chunk(sealed[:-1], key, JOB, INSTANCE, 0)


def test_digest_is_over_the_sealed_chunks_not_the_plaintext(key: x25519.X25519PrivateKey) -> None:
    a, b = seal_chunk(b"yes", raw(key), JOB, INSTANCE, 0), seal_chunk(b"yes", raw(key), JOB, INSTANCE, 0)
    assert sealed_digest([a]) != sealed_digest([b])  # nobody can confirm a guess of "yes"
    assert hashlib.sha256(b"yes").hexdigest() not in (sealed_digest([a]), sealed_digest([b]))
    framed = hashlib.sha256(len(a).to_bytes(4, "big") + a + len(b).to_bytes(4, "big") + b).hexdigest()
    assert sealed_digest([a, b]) == framed
    assert sealed_digest([a + b[:1], b[1:]]) != framed  # chunk boundaries are part of it
    assert sealed_digest([]) == hashlib.sha256(b"").hexdigest()
    d = SealedDigest()
    d.update(a)
    assert d.chunks == 1


# ---------------------------------------------------------------- the schema
def test_job_output_key_is_checked(key: x25519.X25519PrivateKey) -> None:
    job = with_output_key(JobSubmitted(owner="o", image="i"), key)
    assert job.output_key == raw(key).hex() == public_key_hex(key)
    assert JobSubmitted(owner="o", image="i").output_key is None
    for bad in (raw(key).hex().upper(), raw(key).hex()[:-2], "00" * 32, "01" + "00" * 31, "zz" * 32):
        with pytest.raises(ValidationError):
            JobSubmitted(owner="o", image="i", output_key=bad)  # not hex, too short, low-order points


def test_output_event_carries_a_sealed_chunk_of_at_most_64_kib(key: x25519.X25519PrivateKey) -> None:
    full = seal_chunk(b"x" * OUTPUT_CHUNK_BYTES, raw(key), JOB, INSTANCE, 0)
    InstanceOutput(instance_id=INSTANCE, seq=0, suite=SUITE_NAME, sealed=full.hex())
    for bad in (full.hex() + "00", full.hex()[:-1], "00" * (SEALED_OVERHEAD - 1), full.hex().upper()):
        with pytest.raises(ValidationError):
            InstanceOutput(instance_id=INSTANCE, seq=0, suite=SUITE_NAME, sealed=bad)
    assert "data_b64" not in InstanceOutput.model_fields


def test_events_show_output_as_sealed(key: x25519.X25519PrivateKey) -> None:
    sealed = seal_chunk(b"secret result\n", raw(key), JOB, INSTANCE, 0)
    line = summarize(InstanceOutput(instance_id=INSTANCE, seq=0, suite=SUITE_NAME, sealed=sealed.hex()))
    assert "output=sealed, 14 bytes" in line and sealed.hex()[:16] not in line


# ---------------------------------------------------------------- the node-agent's side
@dataclass
class FakeInstance:
    """What `run_workload` uses of an instance: its id, the run (feeding output as a guest would)."""

    chunks: list[bytes]
    exit_code: int = 0
    runtime_ms: float = 12.0

    def __post_init__(self) -> None:
        self.spec = SimpleNamespace(instance_id=INSTANCE)
        self.streamed = False

    async def run(self, on_output: Callable[[bytes], Awaitable[None]] | None = None) -> RunOutput:
        self.streamed = on_output is not None
        data = b"".join(self.chunks)
        for chunk in self.chunks:
            if on_output is not None:
                await on_output(chunk)
        return RunOutput(self.exit_code, data[: 1 << 20], len(data), hashlib.sha256(data).hexdigest())


async def _run(chunks: list[bytes], output_key: str | None) -> tuple[InstanceExited, list[InstanceOutput], FakeInstance]:
    published: list[InstanceOutput] = []

    async def publish(chunk: InstanceOutput) -> None:
        published.append(chunk)

    inst = FakeInstance(chunks, exit_code=3)
    exited = await run_workload(inst, JOB, output_key, publish)  # type: ignore[arg-type]
    return exited, published, inst


async def test_output_is_published_only_sealed_to_the_clients_key(key: x25519.X25519PrivateKey) -> None:
    pieces = [b"first line\n", b"y" * (OUTPUT_CHUNK_BYTES + 10), b"last\n"]
    plain = b"".join(pieces)
    exited, published, _ = await _run(pieces, public_key_hex(key))
    assert [p.seq for p in published] == list(range(len(published))) and len(published) >= 2
    blobs = [bytes.fromhex(p.sealed) for p in published]
    assert all(p.instance_id == INSTANCE and p.suite == SUITE_NAME for p in published)
    assert all(b"first line" not in b and b"yyyy" not in b for b in blobs)
    assert b"".join(open_chunk(b, key, JOB, INSTANCE, i) for i, b in enumerate(blobs)) == plain
    assert (exited.exit_code, exited.output_bytes, exited.output_chunks) == (3, len(plain), len(published))
    assert exited.output_sha256 == sealed_digest(blobs) != hashlib.sha256(plain).hexdigest()
    assert not exited.output_truncated


async def test_job_without_output_key_publishes_no_output() -> None:
    exited, published, inst = await _run([b"would be public\n", b"more\n"], None)
    assert published == [] and not inst.streamed
    assert (exited.output_bytes, exited.output_chunks) == (len(b"would be public\nmore\n"), 0)
    assert exited.output_sha256 == hashlib.sha256(b"").hexdigest() and not exited.output_truncated


async def test_only_the_first_mib_is_published(key: x25519.X25519PrivateKey) -> None:
    pieces = [bytes([65 + i % 26]) * 100_000 for i in range(12)]  # 1.2 MB
    exited, published, _ = await _run(pieces, public_key_hex(key))
    opened = b"".join(open_chunk(bytes.fromhex(p.sealed), key, JOB, INSTANCE, p.seq) for p in published)
    assert opened == b"".join(pieces)[:OUTPUT_PUBLISHED_MAX]
    assert exited.output_truncated and exited.output_bytes == 1_200_000 and exited.output_chunks == len(published)


# ---------------------------------------------------------------- the client's side
@pytest.fixture(scope="module")
def codecs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Codec]:
    pki = Pki(tmp_path_factory.mktemp("output") / "pki")
    pki.init(nodes=("node-a", "node-b"))
    trust = pki.load_trust()
    out = {who: Codec(pki.signer(ident), trust) for who, ident in {
        "market": Identity(Role.MARKETPLACE), "sched": Identity(Role.SCHEDULER),
        "node-a": Identity(Role.NODE_AGENT, "node-a"),
        "node-b": Identity(Role.NODE_AGENT, "node-b")}.items()}
    out["reader"] = Codec(None, trust)
    return out


class Flow:
    """A job's events as the client reads them: signed by their producers, verified by the codec."""

    def __init__(self, codecs: dict[str, Codec], key: x25519.X25519PrivateKey | None, job_id: str = JOB) -> None:
        self.codecs, self.key, self.job_id, self.clock = codecs, key, job_id, 1_000
        job = JobSubmitted(owner="alice", image="img")
        self.events = [self.make("market", with_output_key(job, key) if key else job, None)]

    def make(self, who: str, payload: Any, node: str | None = "node-a") -> Event:
        self.clock += 1_000
        out = self.codecs[who].encode(payload, job_id=self.job_id, node_id=node, time_ns=self.clock)
        return self.codecs["reader"].decode(out.subject, out.data)

    def seal(self, chunks: list[bytes], instance: str = INSTANCE, job_id: str | None = None) -> list[bytes]:
        assert self.key is not None
        return [seal_chunk(c, raw(self.key), job_id or self.job_id, instance, i) for i, c in enumerate(chunks)]

    def output(self, seq: int, sealed: bytes, node: str = "node-a", instance: str = INSTANCE) -> Event:
        return self.make(node, InstanceOutput(instance_id=instance, seq=seq, suite=SUITE_NAME, sealed=sealed.hex()),
                         node)

    def exited(self, blobs: list[bytes], total: int, *, truncated: bool = False) -> Event:
        return self.make("node-a", InstanceExited(
            instance_id=INSTANCE, exit_code=0, runtime_ms=1.0, output_sha256=sealed_digest(blobs), output_bytes=total,
            output_chunks=len(blobs), output_truncated=truncated))

    def publish(self, blobs: list[bytes], total: int | None = None, order: list[int] | None = None) -> list[Event]:
        """The node's events: each blob at the position `order` gives it, then the exit report over them."""
        seqs = order or list(range(len(blobs)))
        outs = [self.output(seq, blob) for seq, blob in zip(seqs, blobs, strict=True)]
        ordered = [blob for _, blob in sorted(zip(seqs, blobs, strict=True))]
        size = total if total is not None else sum(len(b) - SEALED_OVERHEAD for b in blobs)
        return self.events + outs + [self.exited(ordered, size)]


CHUNKS = [b"line one\n", b"line two\n", b"the end\n"]


def test_client_opens_and_verifies_the_output(codecs: dict[str, Codec], key: x25519.X25519PrivateKey) -> None:
    flow = Flow(codecs, key)
    events = flow.publish(flow.seal(CHUNKS))
    out = open_output_events(events, JOB, key)
    assert out.data == b"".join(CHUNKS) and out.complete and out.instance_id == INSTANCE and out.exit_code == 0


def test_chunks_from_another_node_are_ignored(codecs: dict[str, Codec], key: x25519.X25519PrivateKey) -> None:
    flow = Flow(codecs, key)
    blobs = flow.seal(CHUNKS)
    events = flow.publish(blobs)
    forged = flow.output(1, seal_chunk(b"forged\n", raw(key), JOB, INSTANCE, 1), node="node-b")
    assert open_output_events([*events[:-1], forged, events[-1]], JOB, key).data == b"".join(CHUNKS)


def test_only_the_placed_node_speaks_for_the_instance(codecs: dict[str, Codec],
                                                      key: x25519.X25519PrivateKey) -> None:
    flow = Flow(codecs, key)
    placed = flow.make("sched", JobPlaced(node_id="node-b", attempt=0, claim=ResourceClaim(cpu_cores=1, ram_mib=64),
                                          job=JobSubmitted(owner="alice", image="img")), "node-b")
    events = flow.publish(flow.seal(CHUNKS))  # chunks and exit signed by node-a, which does not hold the job
    _fails([events[0], placed, *events[1:]], key, "output_unfinished")


def _fails(events: list[Event], key: x25519.X25519PrivateKey, reason: str) -> None:
    with pytest.raises(OutputError) as err:
        open_output_events(events, JOB, key)
    assert err.value.reason == reason, err.value


def test_reordered_chunks_are_caught(codecs: dict[str, Codec], key: x25519.X25519PrivateKey) -> None:
    flow = Flow(codecs, key)
    blobs = flow.seal(CHUNKS)
    swapped = [blobs[1], blobs[0], blobs[2]]
    # Relabelled seqs, exit digest computed over the originals: the digest does not match.
    events = flow.publish(swapped)
    events[-1] = flow.exited(blobs, 26)
    _fails(events, key, "output_digest_mismatch")
    # A node that also reports the digest of the reordered chunks: they still open only as what they were.
    _fails(flow.publish(swapped), key, "output_unopenable")


def test_chunks_of_another_job_or_instance_do_not_open(codecs: dict[str, Codec],
                                                       key: x25519.X25519PrivateKey) -> None:
    flow = Flow(codecs, key)
    _fails(flow.publish(flow.seal(CHUNKS, job_id="job-2")), key, "output_unopenable")
    _fails(flow.publish(flow.seal(CHUNKS, instance="i-2")), key, "output_unopenable")


def test_tampered_chunk_is_caught(codecs: dict[str, Codec], key: x25519.X25519PrivateKey) -> None:
    flow = Flow(codecs, key)
    blobs = flow.seal(CHUNKS)
    bad = bytearray(blobs[1])
    bad[-3] ^= 1
    _fails(flow.publish([blobs[0], bytes(bad), blobs[2]]), key, "output_unopenable")


def test_missing_chunk_and_wrong_size_are_caught(codecs: dict[str, Codec], key: x25519.X25519PrivateKey) -> None:
    flow = Flow(codecs, key)
    blobs = flow.seal(CHUNKS)
    events = flow.publish(blobs)
    _fails([e for e in events if not (isinstance(e.payload, InstanceOutput) and e.payload.seq == 1)], key,
           "output_incomplete")
    _fails(flow.publish(blobs, total=27), key, "output_size_mismatch")
    _fails(events[:-1], key, "output_unfinished")
    partial = open_output_events(events[:-2], JOB, key, require_complete=False)  # chunks 0 and 1, no exit
    assert partial.data == b"line one\nline two\n" and not partial.complete


def test_wrong_key_or_no_key(codecs: dict[str, Codec], key: x25519.X25519PrivateKey) -> None:
    flow = Flow(codecs, key)
    _fails(flow.publish(flow.seal(CHUNKS)), new_output_key(), "output_key_mismatch")
    keyless = Flow(codecs, None)
    _fails([*keyless.events, keyless.exited([], 42)], key, "output_not_sealed")
