"""A destroyed key leaves nothing in the store that brings it back: every revision of a job's key record that
held the wrapped key is erased (the server overwrites its bytes), not only deleted.

Each test reads the wrapped copies as they are written (as admin), scans every file under the nats-server's
JetStream store directory and finds them (the positive control: the scan sees the store), and after
`key.destroyed` finds none of them in any form (raw, hex, base64), and nothing anywhere in the store that
opens under the broker's KEK ring. Against a real nats-server, with the real broker.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import NotFoundError

from services.key_broker.service import dek_aad
from services.key_broker.store import BUCKET, JobKeys, job_key
from shared.crypto import CryptoError, hpke
from shared.crypto.kek import KekRing, PassphraseFileSource, WrappedKey, create_kek_file, rotate_kek_file
from shared.crypto.secret import zeroize
from shared.errors import BusError
from shared.events import InstanceDestroyed, JobDone, KeyReleased, KeyReleasePolicy, KeysDestroyed
from shared.identity import Role
from shared.ids import new_event_id
from shared.kv import Kv
from shared.models import SecurityLevel
from shared.provision import ERASABLE_HISTORY, provision
from tests.framework.stack import Stack
from tests.integration.test_key_broker import NODE, Env, broker_env

PASSPHRASE = b"test passphrase"
STREAM = f"KV_{BUCKET}"


# ------------------------------------------------------------------ what the store holds
def store_dir(stack: Stack) -> Path:
    """The server's JetStream store (`jetstream { store_dir }` in the config natsserver writes)."""
    path = stack.server.state_dir / "jetstream"
    assert str(path) in stack.server.config_path.read_text()
    return path


def store_files(stack: Stack) -> dict[Path, bytes]:
    files = {p: p.read_bytes() for p in sorted(store_dir(stack).rglob("*")) if p.is_file()}
    assert any(p.suffix == ".blk" and STREAM in p.parts for p in files), "the key store's block files"
    return files


def forms(secret: bytes) -> dict[str, bytes]:
    """Ways a stored copy of `secret` may be spelled: raw, hex, base64 (of the bytes and of the hex, at each
    alignment inside a longer encoding, standard and URL-safe alphabets)."""
    out = {"raw": secret, "hex": secret.hex().encode(), "HEX": secret.hex().upper().encode()}
    for name, text in (("b64", secret), ("b64-of-hex", secret.hex().encode())):
        for pad in range(3):
            enc = base64.b64encode(b"\0" * pad + text + b"\0\0")
            core = enc[(0, 2, 3)[pad]:-4]  # only the characters that depend on `text` alone
            out[f"{name}@{pad}"] = core
            out[f"{name}-url@{pad}"] = core.translate(bytes.maketrans(b"+/", b"-_"))
    return out


def found(files: dict[Path, bytes], secrets: dict[str, bytes]) -> list[str]:
    """'<what> as <form> in <file>' for every copy of every secret in any file."""
    return [f"{what} as {form} in {path.name} ({path.parent.parent.name})"
            for what, secret in secrets.items() for form, needle in forms(secret).items()
            for path, data in files.items() if needle in data]


_HEX_RUN = re.compile(rb"[0-9a-fA-F]{40,}")
_B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{40,}")


def _views(data: bytes) -> Iterator[bytes]:
    """The file's bytes and everything a hex or base64 run in it decodes to."""
    yield data
    for m in _HEX_RUN.finditer(data):
        for off in (0, 1):
            run = m.group()[off:]
            yield bytes.fromhex(run[:len(run) // 2 * 2].decode())
    for m in _B64_RUN.finditer(data):
        for off in range(4):
            run = m.group().translate(bytes.maketrans(b"-_", b"+/"))[off:]
            with contextlib.suppress(binascii.Error, ValueError):
                yield base64.b64decode(run[:len(run) // 4 * 4])


def _wrapped_keys(view: bytes) -> Iterator[WrappedKey]:
    """Every wrapped-key encoding (msgpack `[1, version, nonce, ciphertext]`) that starts in `view`."""
    i = view.find(b"\x94\x01")
    while i >= 0:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(view[i:i + 4096])
        with contextlib.suppress(Exception):
            obj = unpacker.unpack()
            if (isinstance(obj, list) and len(obj) == 4 and type(obj[1]) is int and isinstance(obj[2], bytes)
                    and isinstance(obj[3], bytes)):
                yield WrappedKey(obj[1], obj[2], obj[3])
        i = view.find(b"\x94\x01", i + 1)


def openable(files: dict[Path, bytes], ring: KekRing, jobs: list[str]) -> list[str]:
    """Everything in the store that unwraps under the ring (any version, the current one included) for
    one of the jobs."""
    hits = []
    for path, data in files.items():
        for view in _views(data):
            for wrapped in _wrapped_keys(view):
                for job in jobs:
                    with contextlib.suppress(CryptoError):
                        zeroize(ring.unwrap(wrapped, dek_aad(job)))
                        hits.append(f"{job}'s key (KEK v{wrapped.kek_version}) in {path.name}")
    return hits


def in_store(stack: Stack, secrets: dict[str, bytes], ring: KekRing | None = None, jobs: tuple[str, ...] = ()
             ) -> list[str]:
    """Copies of the secrets, and (with a ring) whatever opens under it for the jobs, in the store now."""
    files = store_files(stack)
    return found(files, secrets) + (openable(files, ring, list(jobs)) if ring is not None else [])


async def until_found(stack: Stack, secrets: dict[str, bytes], seconds: float = 10.0) -> list[str]:
    """The positive control: the store's files show the wrapped copies (the server flushes its block
    buffers on its own, within milliseconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        hits = found(store_files(stack), secrets)
        if {h.split(" as ")[0] for h in hits} == set(secrets) or loop.time() > deadline:
            return hits
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ helpers
def blob(rec: JobKeys | None) -> bytes:
    assert rec is not None and rec.wrapped
    return bytes.fromhex(rec.wrapped)


async def stored_blobs(env: Env, job: str) -> list[bytes]:
    """The wrapped copy in each revision of the job's record the store holds now (read as admin)."""
    admin_kv = Kv(await env.admin.js.key_value(BUCKET))
    out = []
    for revision in await admin_kv.revisions(job_key(job)):
        entry = await admin_kv.kv.get(job_key(job), revision=revision)
        rec = JobKeys.model_validate(msgpack.unpackb(entry.value or b"", raw=False))
        out += [bytes.fromhex(rec.wrapped)] if rec.wrapped else []
    return out


def dek_of(ring: KekRing, job: str, wrapped: bytes) -> bytes:
    dek = ring.unwrap(WrappedKey.from_bytes(wrapped), dek_aad(job))
    try:
        return bytes(dek)
    finally:
        zeroize(dek)


async def destroyed(env: Env, job: str) -> KeysDestroyed:
    await env.node.publish(InstanceDestroyed(instance_id="i-1", removed=("vmm",)), job_id=job, node_id=NODE)
    event = await env.answer(job, KeysDestroyed)
    assert isinstance(event.payload, KeysDestroyed)
    return event.payload


async def assert_erased(env: Env, job: str, wrapped: dict[str, bytes]) -> None:
    hits = in_store(env.stack, wrapped, env.broker.ring, (job,))
    assert not hits, hits
    rec = await env.record(job)
    assert rec is not None and rec.destroyed and rec.wrapped == "" and rec.destruction_reported
    assert await stored_blobs(env, job) == []
    assert len(await env.kv.revisions(job_key(job))) == 1  # the tombstone alone


# ------------------------------------------------------------------ tests
async def test_destroyed_key_is_erased_from_the_store(stack: Stack, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async with broker_env(stack, tmp_path) as env:
        info = await env.admin.js.stream_info(STREAM)
        assert not info.config.deny_delete and info.config.max_msgs_per_subject == ERASABLE_HISTORY
        assert await env.kv.erasable()
        job = await env.job()
        made = blob(await env.record(job))
        await env.announce(job, "i-1")
        answer = await env.attest(job, env.result(job, "i-1"))
        assert isinstance(answer.payload, KeyReleased)
        dek = dek_of(env.broker.ring, job, made)
        assert bytes(hpke.open_sealed(bytes.fromhex(answer.payload.sealed), env.key("i-1"),
                                      hpke.release_info("dek", job, "i-1"))) == dek

        # Before: the admin reads the wrapped copy back, and the scan finds it in the store's block files
        # (and it opens under the KEK ring): the scan sees what the store keeps.
        # Superseded revisions hold the same wrapped copy until the destruction erases them all.
        assert set(await stored_blobs(env, job)) == {made}
        stored = len(await env.kv.revisions(job_key(job)))
        wrapped = {"wrapped key": made}
        hits = await until_found(stack, wrapped)
        assert any(h.startswith("wrapped key as hex in ") and ".blk" in h for h in hits), hits
        assert in_store(stack, {}, env.broker.ring, (job,))  # the unwrap scan finds it too
        assert not in_store(stack, {"plaintext key": dek})  # (never stored at all)

        gone = await destroyed(env, job)
        ev = gone.volume
        assert gone.reason == "instance_destroyed" and ev is not None
        assert ev.wrapped_deleted and ev.revisions_erased == stored and ev.released_to == "i-1"
        assert ev.wrapped_sha256 == hashlib.sha256(made).hexdigest()
        await assert_erased(env, job, wrapped)

        # A second destruction (the job ends too) changes nothing and reports nothing more.
        real, done = env.broker.destroy, []

        async def spy(job_id: str, reason: str) -> None:
            await real(job_id, reason)
            done.append(reason)

        async def handled() -> list[str]:
            return done

        monkeypatch.setattr(env.broker, "destroy", spy)
        await (await stack.bus(Role.JANITOR)).publish(JobDone(exit_code=0), job_id=job)
        assert await env.until(handled, "the second destruction") == ["job_done"]
        await asyncio.sleep(0.3)
        assert len([e for e in await env.events(f"qvm.keys.{job}.>") if isinstance(e.payload, KeysDestroyed)]) == 1
        assert env.broker.bus.handler_failures == 0
        await assert_erased(env, job, wrapped)
    # The server stopped: whatever it still had buffered is on disk now; still nothing.
    stack.server.stop()
    ring = PassphraseFileSource(tmp_path / "kek.json", bytearray(PASSPHRASE)).load()
    hits = in_store(stack, {**wrapped, "plaintext key": dek}, ring, (job,))
    assert not hits, hits
    ring.close()


async def test_a_rewrap_erases_the_copy_under_the_old_kek(stack: Stack, tmp_path: Path) -> None:
    """KEK rotation: the release rewraps the key under v2; the v1 copy is erased at once (not left to the
    history limit), and at destruction the v2 copy is."""
    async with broker_env(stack, tmp_path) as env:
        job = await env.job()
        await env.announce(job, "i-1")
        under_v1 = blob(await env.record(job))
        assert await until_found(stack, {"v1 copy": under_v1})
        keys = env.keys
    assert rotate_kek_file(tmp_path / "kek.json", bytearray(PASSPHRASE)) == 2
    async with broker_env(stack, tmp_path, create=False, keys=keys) as env:
        answer = await env.attest(job, env.result(job, "i-1"))
        assert isinstance(answer.payload, KeyReleased) and answer.payload.kek_version == 2
        under_v2 = blob(await env.record(job))
        assert under_v2 != under_v1 and dek_of(env.broker.ring, job, under_v2) == dek_of(env.broker.ring, job,
                                                                                         under_v1)
        assert await stored_blobs(env, job) == [under_v2]
        hits = await until_found(stack, {"v2 copy": under_v2})
        assert hits, hits
        left = [h for h in in_store(stack, {"v1 copy": under_v1}, env.broker.ring, (job,)) if "v2" not in h]
        assert not left, left  # the superseded copy (under v1) is erased already

        ev = (await destroyed(env, job)).volume
        assert ev is not None and ev.kek_version == 2 and ev.revisions_erased == 1
        await assert_erased(env, job, {"v1 copy": under_v1, "v2 copy": under_v2})


async def test_an_interrupted_destruction_is_finished_by_the_redelivery(stack: Stack, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker stops between the tombstone and the erasure (here: the erase fails once): no evidence
    goes out, the redelivered message erases what is left and reports it once."""
    async with broker_env(stack, tmp_path) as env:
        job = await env.job()
        await env.announce(job, "i-1")
        wrapped = {"wrapped key": blob(await env.record(job))}
        assert await until_found(stack, wrapped)
        real = env.kv.erase_before
        calls: list[int] = []

        async def fails_once(key: str, revision: int) -> int:
            calls.append(revision)
            if len(calls) == 1:
                assert set(await stored_blobs(env, job)) == {wrapped["wrapped key"]}  # tombstone written, copies kept
                raise ConnectionError("the broker went away")
            return await real(key, revision)

        monkeypatch.setattr(env.kv, "erase_before", fails_once)
        ev = (await destroyed(env, job)).volume
        assert len(calls) == 2 and calls[0] == calls[1]  # the same tombstone, resumed
        assert ev is not None and ev.revisions_erased >= 1 and ev.store_revision == calls[0]
        await assert_erased(env, job, wrapped)
        await asyncio.sleep(0.5)
        assert len([e for e in await env.events(f"qvm.keys.{job}.>") if isinstance(e.payload, KeysDestroyed)]) == 1


async def test_a_bucket_made_before_erasure_is_recreated_erasable(stack: Stack, tmp_path: Path) -> None:
    """A deployment whose qvm_keys was made by nats-py (`deny_delete`, one revision): the store keeps a
    destroyed key's bytes (the finding), the broker refuses to start on it, and `provision` recreates it:
    the old files go, the live keys stay, and erasure works from then on."""
    admin = await stack.bus(Role.ADMIN)
    await admin.js.delete_stream(STREAM)
    await admin.js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1, storage=StorageType.FILE, direct=True))
    old = Kv(await (await stack.bus(Role.KEY_BROKER)).js.key_value(BUCKET))  # its records, as its owner wrote them
    assert not await old.erasable()

    create_kek_file(tmp_path / "kek.json", bytearray(PASSPHRASE))
    ring = PassphraseFileSource(tmp_path / "kek.json", bytearray(PASSPHRASE)).load()
    keys = {"i-1": x25519.X25519PrivateKey.generate()}
    pub = keys["i-1"].public_key().public_bytes_raw().hex()

    def record(job: str, dek: bytes, **more: object) -> JobKeys:
        wrapped = ring.wrap(dek, dek_aad(job)).to_bytes()
        return JobKeys(job_id=job, submitted_id=new_event_id(), policy=KeyReleasePolicy(),
                       security=SecurityLevel.BASIC, wrapped=wrapped.hex(), kek_version=ring.current,
                       wrapped_sha256=hashlib.sha256(wrapped).hexdigest(), **more)

    # A key destroyed the old way: the tombstone replaced it, the server dropped the revision unerased.
    dead = record("old-1", b"\x11" * 32)
    revision = await old.create(job_key("old-1"), dead)
    await old.update(job_key("old-1"), dead.model_copy(update={"wrapped": "", "destroyed": True}), revision)
    residue = {"destroyed key": bytes.fromhex(dead.wrapped)}
    hits = await until_found(stack, residue)
    assert hits and in_store(stack, {}, ring, ("old-1",)), "the finding: a destroyed key still opens"
    # A live job's key, announced by its node, not yet released.
    live = record("live-1", b"\x22" * 32, node_id=NODE, instance_keys={"i-1": pub})
    await old.create(job_key("live-1"), live)

    changed = await provision(admin.js, stack.settings)
    assert f"moved kv {BUCKET} to an erasable stream (2 messages)" in changed
    info = await admin.js.stream_info(STREAM)
    assert not info.config.deny_delete and not info.config.sealed
    assert info.config.max_msgs_per_subject == ERASABLE_HISTORY
    assert not [c for c in await provision(admin.js, stack.settings) if BUCKET in c]  # once
    with pytest.raises(NotFoundError):
        await admin.js.stream_info(f"QVM_MOVING_{STREAM}")
    hits = in_store(stack, residue, ring, ("old-1",))
    assert not hits, hits  # the old stream's files went with it

    async with broker_env(stack, tmp_path, create=False, keys=keys) as env:
        assert await env.kv.erasable()
        assert await env.record("live-1") == live
        assert (await env.record("old-1")).destroyed  # type: ignore[union-attr]
        answer = await env.attest("live-1", env.result("live-1", "i-1"))
        assert isinstance(answer.payload, KeyReleased)
        assert bytes(hpke.open_sealed(bytes.fromhex(answer.payload.sealed), keys["i-1"],
                                      hpke.release_info("dek", "live-1", "i-1"))) == b"\x22" * 32
        wrapped = {"live key": bytes.fromhex(live.wrapped)}
        assert await until_found(stack, wrapped)
        ev = (await destroyed(env, "live-1")).volume
        assert ev is not None and ev.revisions_erased >= 1
        await assert_erased(env, "live-1", wrapped)
        hits = in_store(stack, {}, ring, ("old-1", "live-1"))
        assert not hits, hits
    ring.close()


async def test_a_move_that_stopped_midway_is_finished_by_the_next_provision(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old stream deleted, the new one still filling when provisioning stops: the next run finishes it
    (nothing lost, the holding stream's copies erased and gone)."""
    import shared.provision as prov

    admin = await stack.bus(Role.ADMIN)
    await admin.js.delete_stream(STREAM)
    await admin.js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1, storage=StorageType.FILE, direct=True))
    old = Kv(await (await stack.bus(Role.KEY_BROKER)).js.key_value(BUCKET))
    create_kek_file(tmp_path / "kek.json", bytearray(PASSPHRASE))
    ring = PassphraseFileSource(tmp_path / "kek.json", bytearray(PASSPHRASE)).load()
    wrapped = ring.wrap(b"\x33" * 32, dek_aad("live-2")).to_bytes()
    live = JobKeys(job_id="live-2", submitted_id=new_event_id(), policy=KeyReleasePolicy(),
                   security=SecurityLevel.BASIC, wrapped=wrapped.hex(), kek_version=ring.current)
    await old.create(job_key("live-2"), live)

    real = prov._copied
    calls: list[str] = []

    async def stops_at_the_fill(js: object, name: str, messages: int) -> None:
        calls.append(name)
        if name == STREAM:
            raise ConnectionError("provisioning stopped")
        await real(js, name, messages)  # type: ignore[arg-type]

    monkeypatch.setattr(prov, "_copied", stops_at_the_fill)
    with pytest.raises(BusError, match="provisioning stopped"):
        await provision(admin.js, stack.settings)
    assert calls == [f"QVM_MOVING_{STREAM}", STREAM]
    info = await admin.js.stream_info(STREAM)
    assert info.config.sources and not info.config.subjects  # filling, unreachable by writers
    monkeypatch.setattr(prov, "_copied", real)

    assert f"moved kv {BUCKET} to an erasable stream (1 messages)" in await provision(admin.js, stack.settings)
    info = await admin.js.stream_info(STREAM)
    assert not info.config.sources and info.config.subjects == [f"$KV.{BUCKET}.>"] and not info.config.deny_delete
    with pytest.raises(NotFoundError):
        await admin.js.stream_info(f"QVM_MOVING_{STREAM}")
    assert not [c for c in await provision(admin.js, stack.settings) if BUCKET in c]
    assert await old.erasable()
    rec, _, _ = await old.get(job_key("live-2"), JobKeys)
    assert rec == live
    hits = in_store(stack, {"live key": wrapped})
    assert hits and all(f"({STREAM})" in h for h in hits), hits  # only where it belongs: the bucket's stream
    ring.close()
