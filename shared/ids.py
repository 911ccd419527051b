"""Event ids: UUIDv7 (time-ordered). Derived ids make a handler's output idempotent.

A handler that reacts to event X computes the ids of the events it emits from X's id and a
discriminator, so a redelivered X produces byte-identical ids and JetStream's `Nats-Msg-Id` dedupe
stores the reaction once, even when another replica handled the first delivery.
"""

from __future__ import annotations

import hashlib
import uuid

import uuid6

__all__ = ["derive_event_id", "event_id_at", "new_event_id", "uuid7_time_ms"]


def new_event_id() -> str:
    return str(uuid6.uuid7())


def uuid7_time_ms(event_id: str) -> int:
    return uuid.UUID(event_id).int >> 80


def derive_event_id(cause_id: str, *parts: str) -> str:
    """A UUIDv7 with the cause's timestamp and random bits taken from SHA-256(cause, parts)."""
    return _uuid7(uuid7_time_ms(cause_id), "\x1f".join((cause_id, *parts)))


def event_id_at(time_ns: int, *parts: str) -> str:
    """A UUIDv7 for a decision made at `time_ns` about `parts` (no event caused it: an operator's): the same
    decision repeated gets the same id, so JetStream stores it once."""
    return _uuid7(time_ns // 1_000_000, "\x1f".join((str(time_ns), *parts)))


def _uuid7(ts_ms: int, seed: str) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    rand = int.from_bytes(digest[:10], "big")
    rand_a = rand >> 68 & 0xFFF  # 12 bits
    rand_b = rand & ((1 << 62) - 1)  # 62 bits
    value = (ts_ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))
