"""The key-broker on a real NATS: a volume key made per job and kept only wrapped, released (HPKE-sealed to
the instance key) on a verified result, refused with a reason code otherwise, destroyed with evidence.

The parties are real identities on the bus: the marketplace submits, a node-agent announces its instance,
an attestation-verifier identity signs the results (what the verifier's appraisal would produce; the full
path with real quotes and a real guest is in test_confidential.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from services.key_broker.service import KeyBroker, dek_aad
from services.key_broker.store import BUCKET, JobKeys, NodeRevocation, job_key, node_key
from shared.bus import Bus
from shared.codec import Event
from shared.crypto import CryptoError, hpke
from shared.crypto.kek import PassphraseFileSource, WrappedKey, create_kek_file, rotate_kek_file
from shared.events import (
    AttestPurpose,
    EventRejected,
    InstanceAttested,
    InstanceDestroyed,
    InstanceProvisioning,
    JobSubmitted,
    KeyReleased,
    KeyReleasePolicy,
    KeyReleaseRefused,
    KeysDestroyed,
    NodeRevoked,
)
from shared.identity import Role
from shared.kv import Kv
from shared.models import SecurityLevel, TrustState
from shared.replay import read_stream
from tests.framework.stack import Stack

IMAGE = "ab" * 32
NODE = "node-a"


@dataclass
class Env:
    stack: Stack
    market: Bus
    node: Bus
    verifier: Bus
    admin: Bus
    broker: KeyBroker
    kv: Kv
    keys: dict[str, x25519.X25519PrivateKey] = field(default_factory=dict)
    jobs: int = 0

    def key(self, instance: str) -> x25519.X25519PrivateKey:
        return self.keys.setdefault(instance, x25519.X25519PrivateKey.generate())

    def pub(self, instance: str) -> str:
        return self.key(instance).public_key().public_bytes(serialization.Encoding.Raw,
                                                            serialization.PublicFormat.Raw).hex()

    async def job(self, **policy: object) -> str:
        self.jobs += 1
        job_id = f"kb-{self.jobs}-{time.time_ns() % 10**9}"
        await self.market.publish(JobSubmitted(owner="c", image="img", volume_mib=32,
                                               key_release=KeyReleasePolicy(**policy)), job_id=job_id)  # type: ignore[arg-type]
        await self.until(lambda: self.record(job_id), "the job's key")
        return job_id

    async def record(self, job_id: str) -> JobKeys | None:
        rec, _, _ = await self.kv.get(job_key(job_id), JobKeys)
        return rec if isinstance(rec, JobKeys) else None

    async def announce(self, job_id: str, instance: str, node: Bus | None = None) -> None:
        bus = node or self.node
        await bus.publish(InstanceProvisioning(instance_id=instance, image="img", image_manifest_sha256=IMAGE,
                                               vmm="qemu-microvm", public_key=self.pub(instance)),
                          job_id=job_id, node_id=bus.identity.node_id)

        async def seen() -> bool:
            rec = await self.record(job_id)
            return rec is not None and instance in rec.instance_keys
        await self.until(seen, "the announcement")

    def result(self, job_id: str, instance: str, **over: object) -> InstanceAttested:
        now = time.time_ns()
        fields: dict[str, object] = dict(
            purpose=AttestPurpose.INSTANCE, challenge_id=f"{now % 16**32:032x}", evidence_id="e-1",
            instance_id=instance, job_id=job_id, trust=TrustState.TRUSTED, ak_name="00", ek_sha256="cd" * 32,
            image_manifest_sha256=IMAGE, public_key=self.pub(instance), pcr_sha256="ef" * 32, reset_count=0,
            restart_count=0, firmware_version="0", verified_ns=now, expires_ns=now + 60 * 10**9)
        fields.update(over)
        return InstanceAttested(**fields)  # type: ignore[arg-type]

    async def attest(self, job_id: str, result: InstanceAttested) -> Event:
        await self.verifier.publish(result, job_id=job_id, node_id=NODE)
        return await self.answer(job_id)

    async def answer(self, job_id: str, kind: type = object, skip: int = 0) -> Event:
        """The `skip`-th key event for the job of type `kind`."""
        async def find() -> Event | None:
            found = [e for e in await self.events(f"qvm.keys.{job_id}.>") if isinstance(e.payload, kind)]
            return found[skip] if len(found) > skip else None
        return await self.until(find, f"a key event for {job_id}")

    async def events(self, subject: str) -> list[Event]:
        out = []
        async for batch in read_stream(self.admin.js, "QVM_KEYS", subject):
            out += [self.admin.codec.decode(m.subject, m.data) for m in batch]
        return out

    @staticmethod
    async def until(probe, what: str, seconds: float = 15.0):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = await probe()
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {what} within {seconds}s")


@contextlib.asynccontextmanager
async def broker_env(stack: Stack, tmp_path: Path, create: bool = True,
                     keys: dict[str, x25519.X25519PrivateKey] | None = None) -> AsyncIterator[Env]:
    if create:
        create_kek_file(tmp_path / "kek.json", bytearray(b"test passphrase"))
    ring = PassphraseFileSource(tmp_path / "kek.json", bytearray(b"test passphrase")).load()
    kb = await stack.bus(Role.KEY_BROKER)
    kv = Kv(await kb.js.key_value(BUCKET))
    broker = KeyBroker(kb, stack.settings, ring, kv)
    stop = asyncio.Event()
    task = asyncio.create_task(broker.run(stop))
    env = Env(stack, await stack.bus(Role.MARKETPLACE), await stack.bus(Role.NODE_AGENT, NODE),
              await stack.bus(Role.ATTESTATION_VERIFIER), await stack.bus(Role.ADMIN), broker, kv)
    if keys is not None:
        env.keys = keys
    try:
        yield env
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def _dek_in_store(env: Env, rec: JobKeys, job_id: str) -> bytes:
    return bytes(env.broker.ring.unwrap(WrappedKey.from_bytes(bytes.fromhex(rec.wrapped)), dek_aad(job_id)))


async def test_release_seals_the_stored_key_to_the_attested_instance(stack: Stack, tmp_path: Path) -> None:
    async with broker_env(stack, tmp_path) as env:
        job = await env.job(allowed_images=(IMAGE,))
        rec = await env.record(job)
        assert rec is not None and rec.wrapped and rec.kek_version == env.broker.ring.current
        await env.announce(job, "i-1")
        answer = await env.attest(job, env.result(job, "i-1"))
        assert isinstance(answer.payload, KeyReleased), answer.payload
        assert answer.node_id == NODE and answer.payload.suite == hpke.SUITE_NAME
        opened = hpke.open_sealed(bytes.fromhex(answer.payload.sealed), env.key("i-1"),
                                  hpke.release_info("dek", job, "i-1"))
        assert len(opened) == 32 and bytes(opened) == _dek_in_store(env, rec, job)
        # Bound to this job and instance: another instance's or job's info does not open it.
        with pytest.raises(CryptoError):
            hpke.open_sealed(bytes.fromhex(answer.payload.sealed), env.key("i-1"), hpke.release_info("dek", job, "i-2"))
        assert (await env.record(job)).holder == "i-1"  # type: ignore[union-attr]

        # The job's instance ends: the key is destroyed, with evidence, and nothing more is released.
        await env.node.publish(InstanceDestroyed(instance_id="i-1", removed=("vmm",)), job_id=job, node_id=NODE)
        gone = await env.answer(job, KeysDestroyed)
        assert isinstance(gone.payload, KeysDestroyed) and gone.payload.reason == "instance_destroyed"
        ev = gone.payload.volume
        assert ev is not None and ev.wrapped_deleted and ev.wrapped_sha256 == rec.wrapped_sha256
        assert ev.released_to == "i-1" and ev.plaintext_buffers_zeroed == 2
        tomb = await env.record(job)
        assert tomb is not None and tomb.destroyed and tomb.wrapped == ""
        await env.verifier.publish(env.result(job, "i-1", challenge_id="1" * 32), job_id=job, node_id=NODE)
        refused = await env.answer(job, KeyReleaseRefused)
        assert refused.payload.reason == "keys_destroyed"  # type: ignore[union-attr]


REFUSALS = {
    "result_expired": lambda env, job: env.result(job, "i-1", expires_ns=time.time_ns() - 1),
    "result_stale": lambda env, job: env.result(job, "i-1", verified_ns=time.time_ns() - 600 * 10**9),
    "wrong_instance_key": lambda env, job: env.result(job, "i-1", public_key="11" * 32),
    "image_not_allowed": lambda env, job: env.result(job, "i-1", image_manifest_sha256="99" * 32),
    "trust_too_low": lambda env, job: env.result(job, "i-1", trust=TrustState.UNVERIFIED),
    "instance_unknown": lambda env, job: env.result(job, "i-9"),
    "result_invalid": lambda env, job: env.result(job, "i-1", purpose=AttestPurpose.NODE),
}


@pytest.mark.parametrize("reason", sorted(REFUSALS))
async def test_refusals_have_reason_codes(stack: Stack, tmp_path: Path, reason: str) -> None:
    async with broker_env(stack, tmp_path) as env:
        job = await env.job(allowed_images=(IMAGE,))
        await env.announce(job, "i-1")
        answer = await env.attest(job, REFUSALS[reason](env, job))
        assert isinstance(answer.payload, KeyReleaseRefused), answer.payload
        assert answer.payload.reason == reason
        assert not [e for e in await env.events(f"qvm.keys.{job}.>") if isinstance(e.payload, KeyReleased)]


async def test_forged_result_is_dead_lettered_and_releases_nothing(stack: Stack, tmp_path: Path) -> None:
    async with broker_env(stack, tmp_path) as env:
        job = await env.job()
        await env.announce(job, "i-1")
        out = env.verifier.codec.encode(env.result(job, "i-1"), job_id=job, node_id=NODE)
        forged = bytearray(out.data)
        forged[-5] ^= 0x01  # one bit of the signed envelope changed
        await env.verifier.js.publish(out.subject, bytes(forged))

        async def rejected() -> list[Event]:
            out = []
            async for batch in read_stream(env.admin.js, "QVM_DEAD", "qvm.dead.rejected.>"):
                out += [e for e in (env.admin.codec.decode(m.subject, m.data) for m in batch)
                        if isinstance(e.payload, EventRejected) and e.payload.consumer == "key-broker-jobs"
                        and "key-broker" in e.envelope.producer]
            return out
        found = await env.until(rejected, "a dead-letter report")
        assert found[0].payload.reason.value in ("bad_signature", "malformed", "schema_invalid")  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        assert not [e for e in await env.events(f"qvm.keys.{job}.>") if isinstance(e.payload, KeyReleased)]


async def test_replayed_release_is_refused(stack: Stack, tmp_path: Path) -> None:
    async with broker_env(stack, tmp_path) as env:
        job = await env.job()
        await env.announce(job, "i-1")
        out = env.verifier.codec.encode(env.result(job, "i-1"), job_id=job, node_id=NODE)
        await env.verifier.js.publish(out.subject, out.data, headers={"Nats-Msg-Id": out.event_id})
        first = await env.answer(job)
        assert isinstance(first.payload, KeyReleased)
        # The same signed result again, as a new message (past JetStream's duplicate window: no msg id).
        await env.verifier.js.publish(out.subject, out.data)
        again = await env.answer(job, KeyReleaseRefused)
        assert again.payload.reason == "replayed_release"  # type: ignore[union-attr]
        # A fresh result that reuses the spent challenge is a replay too.
        rec = await env.record(job)
        assert rec is not None
        reuse = env.result(job, "i-1", challenge_id=rec.spent_challenges[0])
        await env.verifier.publish(reuse, job_id=job, node_id=NODE)
        third = await env.answer(job, KeyReleaseRefused, skip=1)
        assert third.payload.reason == "replayed_release"  # type: ignore[union-attr]


async def test_second_instance_gets_nothing(stack: Stack, tmp_path: Path) -> None:
    async with broker_env(stack, tmp_path) as env:
        job = await env.job()
        await env.announce(job, "i-1")
        assert isinstance((await env.attest(job, env.result(job, "i-1"))).payload, KeyReleased)
        await env.announce(job, "i-2")
        await env.verifier.publish(env.result(job, "i-2"), job_id=job, node_id=NODE)
        refused = await env.answer(job, KeyReleaseRefused)
        assert refused.payload.reason == "second_instance"  # type: ignore[union-attr]


async def test_revoked_node_gets_nothing_and_its_keys_are_destroyed(stack: Stack, tmp_path: Path) -> None:
    async with broker_env(stack, tmp_path) as env:
        held = await env.job()
        await env.announce(held, "i-1")
        assert isinstance((await env.attest(held, env.result(held, "i-1"))).payload, KeyReleased)
        job = await env.job()
        await env.announce(job, "i-5")
        late = env.result(job, "i-5")  # verified before the revocation, arriving after it
        await env.verifier.publish(NodeRevoked(reason="attestation_failed", detail="pcr mismatch"), node_id=NODE)
        await env.until(lambda: _revoked(env), "the revocation")
        gone = await env.answer(held, KeysDestroyed)
        assert gone.payload.reason == "node_revoked"  # type: ignore[union-attr]
        assert (await env.answer(job, KeysDestroyed)).payload.reason == "node_revoked"  # type: ignore[union-attr]
        await env.verifier.publish(late, job_id=job, node_id=NODE)
        answer = await env.answer(job, KeyReleaseRefused)
        assert answer.payload.reason == "keys_destroyed"  # type: ignore[union-attr]
        # A job on the node whose key was still unheld is refused for the revocation itself.
        fresh = await env.job()
        await env.announce(fresh, "i-6")
        refused = await env.attest(fresh, late.model_copy(update={"job_id": fresh, "instance_id": "i-6",
                                                                  "public_key": env.pub("i-6")}))
        assert refused.payload.reason == "node_revoked"  # type: ignore[union-attr]


async def _revoked(env: Env) -> bool:
    rec, _, _ = await env.kv.get(node_key(NODE), NodeRevocation)
    return rec is not None


async def test_confidential_job_needs_confidential_evidence(stack: Stack, tmp_path: Path) -> None:
    async with broker_env(stack, tmp_path) as env:
        job_id = "kb-cc"
        await env.market.publish(JobSubmitted(owner="c", image="img", volume_mib=32,
                                              security=SecurityLevel.CONFIDENTIAL), job_id=job_id)
        await env.until(lambda: env.record(job_id), "the job's key")
        await env.announce(job_id, "i-1")
        answer = await env.attest(job_id, env.result(job_id, "i-1"))
        assert answer.payload.reason == "security_level_not_met"  # type: ignore[union-attr]


async def test_a_rotated_kek_rewraps_the_key_at_its_release(stack: Stack, tmp_path: Path) -> None:
    """Keys made under KEK v1; the broker restarts with v1 and v2 (rotation): the release stores the key
    under v2 and says so, and the key is the same."""
    async with broker_env(stack, tmp_path) as env:
        job = await env.job()
        await env.announce(job, "i-1")
        before = await env.record(job)
        assert before is not None and before.kek_version == 1
        dek = _dek_in_store(env, before, job)
        keys = env.keys
    assert rotate_kek_file(tmp_path / "kek.json", bytearray(b"test passphrase")) == 2
    async with broker_env(stack, tmp_path, create=False, keys=keys) as env:
        assert env.broker.ring.versions == (1, 2)
        answer = await env.attest(job, env.result(job, "i-1"))
        assert isinstance(answer.payload, KeyReleased) and answer.payload.kek_version == 2
        after = await env.record(job)
        assert after is not None and after.kek_version == 2 and after.wrapped != before.wrapped
        assert _dek_in_store(env, after, job) == dek
        opened = hpke.open_sealed(bytes.fromhex(answer.payload.sealed), env.key("i-1"),
                                  hpke.release_info("dek", job, "i-1"))
        assert bytes(opened) == dek


async def test_an_announcement_that_overtakes_its_submission_still_counts(stack: Stack, tmp_path: Path) -> None:
    """Replicas of the broker share one work queue, so an instance's announcement (and its verdict) can be
    handled before the job's submission: the broker hands them back for a while instead of dropping them
    (found when a replica was killed -9 mid-job: the job's key was then refused as `instance_unknown`)."""
    async with broker_env(stack, tmp_path) as env:
        job = f"kb-late-{time.time_ns() % 10**9}"
        await env.node.publish(InstanceProvisioning(instance_id="i-1", image="img", image_manifest_sha256=IMAGE,
                                                    vmm="qemu-microvm", public_key=env.pub("i-1")),
                               job_id=job, node_id=NODE)
        await env.verifier.publish(env.result(job, "i-1"), job_id=job, node_id=NODE)
        await asyncio.sleep(0.3)  # both handed back at least once
        await env.market.publish(JobSubmitted(owner="c", image="img", volume_mib=32,
                                              key_release=KeyReleasePolicy(allowed_images=(IMAGE,))), job_id=job)
        answer = await env.answer(job)
        assert isinstance(answer.payload, KeyReleased), answer.payload
        rec = await env.record(job)
        assert rec is not None and rec.holder == "i-1" and "i-1" in rec.instance_keys


async def test_a_job_without_a_volume_is_not_waited_for_forever(stack: Stack, tmp_path: Path) -> None:
    """The other side: a job without a volume key has no record; its instance's events are let go after a few
    deliveries (no dead letter, no failure)."""
    async with broker_env(stack, tmp_path) as env:
        job = f"kb-novol-{time.time_ns() % 10**9}"
        await env.market.publish(JobSubmitted(owner="c", image="img"), job_id=job)
        await env.node.publish(InstanceProvisioning(instance_id="i-1", image="img", image_manifest_sha256=IMAGE,
                                                    vmm="qemu-microvm", public_key=env.pub("i-1")),
                               job_id=job, node_id=NODE)

        async def settled() -> bool:
            info = await env.admin.js.consumer_info("QVM_JOBS", "key-broker-jobs")
            return info.num_ack_pending == 0 and info.num_pending == 0
        await env.until(settled, "the announcement let go", seconds=20)
        assert await env.record(job) is None
        assert env.broker.bus.handler_failures == 0
        assert not await env.events(f"qvm.keys.{job}.>")


async def test_a_remembered_record_is_only_a_starting_point(stack: Stack, tmp_path: Path) -> None:
    """The broker remembers the record it wrote at the announcement, so the release needs no read; a copy that
    another replica has superseded (here: the key destroyed behind its back) never decides anything."""
    async with broker_env(stack, tmp_path) as env:
        job = await env.job()
        await env.announce(job, "i-1")
        remembered = env.broker.records.get(job)
        assert remembered is not None and "i-1" in remembered[0].instance_keys  # written here: remembered
        other = KeyBroker(env.broker.bus, stack.settings, env.broker.ring, env.kv)  # a second replica
        await other.destroy(job, "job_cancelled")
        assert env.broker.records.get(job) == remembered  # this replica did not see that
        await env.verifier.publish(env.result(job, "i-1"), job_id=job, node_id=NODE)
        answer = await env.answer(job, KeyReleaseRefused)
        assert isinstance(answer.payload, KeyReleaseRefused) and answer.payload.reason == "keys_destroyed"
        assert not [e for e in await env.events(f"qvm.keys.{job}.>") if isinstance(e.payload, KeyReleased)]


async def test_a_release_from_a_remembered_record_is_a_compare_and_set(stack: Stack, tmp_path: Path) -> None:
    """A result decided on the remembered copy after another replica changed the record: the compare-and-set
    fails, the record is read again, and the release goes out once, recorded in the store."""
    async with broker_env(stack, tmp_path) as env:
        job = await env.job()
        await env.announce(job, "i-1")
        stale = env.broker.records.get(job)
        assert stale is not None
        cur, revision, _ = await env.kv.get(job_key(job), JobKeys)
        assert isinstance(cur, JobKeys)
        await env.kv.update(job_key(job), cur.model_copy(update={"plaintext_buffers_zeroed": 7}), revision)
        released = await env.attest(job, env.result(job, "i-1"))
        assert isinstance(released.payload, KeyReleased)
        rec = await env.record(job)
        assert rec is not None and rec.holder == "i-1" and rec.plaintext_buffers_zeroed == 8  # built on the store's
        assert env.broker.records.get(job) != stale  # and remembered as written


def test_the_remembered_records_are_bounded() -> None:
    from services.key_broker.service import RecordCache

    cache = RecordCache(size=3)
    rec = JobKeys(job_id="j", submitted_id="s", policy=KeyReleasePolicy(), security=SecurityLevel.BASIC)
    for i in range(5):
        cache.put(f"j{i}", rec, i)
    assert len(cache) == 3 and cache.get("j0") is None and cache.get("j4") == (rec, 4)
    cache.get("j2")
    cache.put("j2", rec, 9)  # rewritten: most recent again
    cache.put("j5", rec, 10)
    assert cache.get("j3") is None and cache.get("j2") == (rec, 9)
    cache.forget("j2")
    assert cache.get("j2") is None
