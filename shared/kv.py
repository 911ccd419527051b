"""Typed JetStream KV access for services whose state lives on the bus (so any replica takes any message).

Values are pydantic models packed with msgpack; every write is a create or a compare-and-set on the key's
revision, and a lost race raises `Stale` for the caller to re-read and decide again.
"""

from __future__ import annotations

import msgpack
from nats.js.errors import KeyDeletedError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shared.bus import map_nats_errors
from shared.models import Frozen

__all__ = ["Kv", "Stale"]


class Stale(Exception):
    """A compare-and-set lost to another writer."""


def _pack(model: Frozen) -> bytes:
    out: bytes = msgpack.packb(model.model_dump(mode="json"), use_bin_type=True)
    return out


class Kv:
    """Typed get / create / compare-and-set over one bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, key: str, model: type[Frozen]) -> tuple[Frozen | None, int, bool]:
        """(value, revision, deleted). A value that does not decode reads as absent."""
        with map_nats_errors(f"kv get {key}"):
            try:
                entry = await self.kv.get(key)
            except KeyDeletedError:
                return None, 0, True
            except NotFoundError:
                return None, 0, False
        try:
            return model.model_validate(msgpack.unpackb(entry.value or b"", raw=False)), entry.revision or 0, False
        except (ValueError, TypeError, ValidationError, msgpack.UnpackException):
            return None, entry.revision or 0, False

    async def create(self, key: str, value: Frozen) -> int:
        """Store only if absent; the new revision, or 0 (false) when the key exists."""
        with map_nats_errors(f"kv create {key}"):
            try:
                return int(await self.kv.create(key, _pack(value)))
            except KeyWrongLastSequenceError:
                return 0

    async def update(self, key: str, value: Frozen, revision: int) -> int:
        """Compare-and-set; the new revision. Raises `Stale` when another writer changed the key first."""
        with map_nats_errors(f"kv update {key}"):
            try:
                if revision:
                    return int(await self.kv.update(key, _pack(value), last=revision))
                return int(await self.kv.create(key, _pack(value)))
            except KeyWrongLastSequenceError:
                raise Stale(key) from None

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
