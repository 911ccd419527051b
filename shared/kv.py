"""Typed JetStream KV access for services whose state lives on the bus (so any replica takes any message).

Values are pydantic models packed with msgpack; every write is a create or a compare-and-set on the key's
revision, and a lost race raises `Stale` for the caller to re-read and decide again. Values read back are
bus data: validated strictly, as events are (`validate_wire`).

Erasure. Removing a message from a JetStream file store (a KV purge or delete, the bucket's history limit
dropping a superseded revision, a max age) only marks it deleted: its bytes stay in the stream's block files
until the block happens to be compacted or removed. `erase` uses the message-delete API with `no_erase`
false (its default), for which the server overwrites the message's record in its block file with random
bytes (and its cached copy) before it drops it. A bucket whose values must not outlive their erasure
(`erasable()`: message deletes allowed, more than one revision kept, so the server never drops a superseded
revision itself) is made by `shared.provision`; its owner erases each revision it supersedes
(`update(..., erase_superseded=True)`) and, before it gives a key up, every stored revision of it
(`erase_before`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgpack
import nats
from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyDeletedError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shared.codec import validate_wire
from shared.models import Frozen
from shared.natserrors import map_nats_errors

__all__ = ["Kv", "KvEntry", "Stale", "erase_msg"]

M = TypeVar("M", bound=Frozen)

_GONE = ("no message found", "stream store eof")  # what a message delete answers for a sequence not stored


class Stale(Exception):
    """A compare-and-set lost to another writer."""


async def erase_msg(js: JetStreamContext, stream: str, seq: int) -> bool:
    """Securely erase one message of a stream (JetStream's STREAM.MSG.DELETE without `no_erase`: the server
    overwrites the message's bytes in its store, then drops it). True when erased now, False when it is
    not stored (erased or removed before, or never written). nats-py errors pass through."""
    try:
        return bool(await js.delete_msg(stream, seq))
    except APIError as exc:
        if any(g in (exc.description or "").lower() for g in _GONE):
            return False
        raise


def _pack(model: Frozen) -> bytes:
    out: bytes = msgpack.packb(model.model_dump(mode="json"), use_bin_type=True)
    return out


def _unpack(model: type[M], data: bytes) -> M | None:
    try:
        return validate_wire(model, msgpack.unpackb(data, raw=False))
    except (ValueError, TypeError, ValidationError, msgpack.UnpackException):
        return None


@dataclass(frozen=True, slots=True)
class KvEntry(Generic[M]):
    """One key's value as a watch saw it; decoded only when asked (a watcher often skips its own writes)."""

    key: str
    revision: int
    deleted: bool
    raw: bytes
    model: type[M]

    def value(self) -> M | None:
        """The decoded value (None when deleted, or when it does not decode)."""
        return None if self.deleted or not self.raw else _unpack(self.model, self.raw)


class Kv:
    """Typed get / create / compare-and-set / watch over one bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, key: str, model: type[M]) -> tuple[M | None, int, bool]:
        """(value, revision, deleted). A value that does not decode reads as absent."""
        with map_nats_errors(f"kv get {key}"):
            try:
                entry = await self.kv.get(key)
            except KeyDeletedError:
                return None, 0, True
            except NotFoundError:
                return None, 0, False
        return _unpack(model, entry.value or b""), entry.revision or 0, False

    async def put(self, key: str, value: Frozen) -> int:
        """Store unconditionally (last writer wins); the new revision. For values one writer owns."""
        with map_nats_errors(f"kv put {key}"):
            return int(await self.kv.put(key, _pack(value)))

    async def delete(self, key: str, revision: int = 0) -> None:
        """Delete the key; with `revision`, only if it is still that revision (else `Stale`)."""
        with map_nats_errors(f"kv delete {key}"):
            try:
                await self.kv.delete(key, last=revision or None)
            except KeyWrongLastSequenceError:
                raise Stale(key) from None

    async def watch(self, model: type[M], stop: asyncio.Event, keys: str = ">"
                    ) -> AsyncIterator[KvEntry[M] | None]:
        """Every stored key matching `keys` (current values), then None once they are all in, then each change
        as it is written, until `stop` is set."""
        with map_nats_errors("kv watch"):
            watcher = await self.kv.watch(keys)
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                if entry is None:
                    yield None
                    continue
                yield KvEntry(entry.key, entry.revision or 0, entry.operation in ("DEL", "PURGE"),
                              entry.value or b"", model)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def create(self, key: str, value: Frozen) -> int:
        """Store only if absent; the new revision, or 0 (false) when the key exists."""
        with map_nats_errors(f"kv create {key}"):
            try:
                return int(await self.kv.create(key, _pack(value)))
            except KeyWrongLastSequenceError:
                return 0

    async def update(self, key: str, value: Frozen, revision: int, *, erase_superseded: bool = False) -> int:
        """Compare-and-set; the new revision. Raises `Stale` when another writer changed the key first.

        `erase_superseded`: then erase `revision` (the value this write replaced) from the store. An error
        there is raised after the write took effect; the revision stays stored until `erase_before`."""
        with map_nats_errors(f"kv update {key}"):
            try:
                if revision:
                    new = int(await self.kv.update(key, _pack(value), last=revision))
                else:
                    new = int(await self.kv.create(key, _pack(value)))
            except KeyWrongLastSequenceError:
                raise Stale(key) from None
        if erase_superseded and revision:
            await self.erase(revision)
        return new

    async def erase(self, revision: int) -> bool:
        """Securely erase one stored revision (of any key): the server overwrites the message's bytes in its
        store, then drops it. True when erased now, False when it is not stored (erased or removed before;
        so a repeated call is harmless). Raises `BusError` where the bucket refuses message deletes."""
        with map_nats_errors(f"kv erase revision {revision}"):
            return await erase_msg(self.kv._js, self.kv._stream, revision)

    async def revisions(self, key: str) -> list[int]:
        """Every revision of `key` the store still holds (values and delete markers), oldest first."""
        subject = f"{self.kv._pre}{key}"
        found: list[int] = []
        with map_nats_errors(f"kv revisions {key}"):
            while True:
                try:  # the first message of this key at or after the sequence (the server's subject index)
                    msg = await self.kv._js.get_msg(self.kv._stream, seq=found[-1] + 1 if found else 1,
                                                    subject=subject, next=True)
                except NotFoundError:
                    return found
                if not msg.seq or (found and msg.seq <= found[-1]):
                    return found
                found.append(int(msg.seq))

    async def erase_before(self, key: str, revision: int) -> int:
        """Erase every stored revision of `key` older than `revision` (the ones it superseded; a newer
        write by someone else is never touched). Returns how many were erased now."""
        erased = 0
        for old in await self.revisions(key):
            if old < revision and await self.erase(old):
                erased += 1
        return erased

    async def erasable(self) -> bool:
        """Whether what this bucket's owner erases is really gone: message deletes allowed (`erase` works)
        and more than one revision kept per key (with one, every write makes the server drop the
        superseded revision itself, without erasing it)."""
        with map_nats_errors("kv status"):
            cfg = (await self.kv.status()).stream_info.config
        history = cfg.max_msgs_per_subject or 0
        return not cfg.deny_delete and (history < 0 or history > 1)

    async def keys(self) -> list[str]:
        with map_nats_errors("kv keys"):
            try:
                return list(await self.kv.keys())
            except (NoKeysError, NotFoundError):
                return []

    async def purge(self, key: str) -> None:
        """Delete the key and every earlier revision of it (nothing of the value stays in the bucket)."""
        with map_nats_errors(f"kv purge {key}"):
            await self.kv.purge(key)
