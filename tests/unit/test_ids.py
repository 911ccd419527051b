"""Event ids: UUIDv7, and derived ids that are deterministic and keep the cause's time."""

from __future__ import annotations

import itertools
import re
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import _UUID7
from shared.ids import derive_event_id, new_event_id, uuid7_time_ms


def assert_uuid7(text: str) -> uuid.UUID:
    u = uuid.UUID(text)
    assert str(u) == text  # canonical lower-case form
    assert u.version == 7
    assert u.variant == uuid.RFC_4122
    assert re.match(_UUID7, text)
    return u


# uuid6.uuid7() keeps ids monotonic by bumping the timestamp 1 ms past the previous id when several are made in
# the same millisecond, so after a burst (earlier tests make thousands) the embedded time runs ahead of the clock
# for a while. It is never behind it.
MAX_DRIFT_MS = 60_000


def test_new_event_id_is_uuid7_with_current_time() -> None:
    before = time.time_ns() // 1_000_000
    eid = new_event_id()
    after = time.time_ns() // 1_000_000
    assert_uuid7(eid)
    assert before <= uuid7_time_ms(eid) <= after + MAX_DRIFT_MS


def test_new_event_ids_are_unique_and_strictly_time_ordered() -> None:
    ids = [new_event_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    times = [uuid7_time_ms(i) for i in ids]
    assert all(a < b for a, b in itertools.pairwise(times))
    assert ids == sorted(ids)  # string order is time order


def test_derive_is_deterministic() -> None:
    cause = new_event_id()
    assert derive_event_id(cause, "JobPlaced", "") == derive_event_id(cause, "JobPlaced", "")
    assert derive_event_id(cause) == derive_event_id(cause)


def test_derived_is_valid_uuid7_keeping_cause_time() -> None:
    cause = new_event_id()
    derived = derive_event_id(cause, "JobPlaced", "attempt-0")
    assert_uuid7(derived)
    assert uuid7_time_ms(derived) == uuid7_time_ms(cause)
    assert derived != cause


def test_derived_from_fixed_cause_time() -> None:
    ts = 0x0123_4567_89AB  # an arbitrary 48-bit millisecond timestamp
    cause = str(uuid.UUID(int=ts << 80 | 0x7 << 76 | 0b10 << 62 | 12345))
    assert uuid7_time_ms(cause) == ts
    derived = derive_event_id(cause, "x")
    assert_uuid7(derived)
    assert uuid7_time_ms(derived) == ts
    assert derived.startswith("01234567-89ab-7")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("JobPlaced", ""), ("JobPending", "")),
        (("JobPlaced", "0"), ("JobPlaced", "1")),
        (("JobPlaced",), ("JobPlaced", "")),
        (("ab", "c"), ("a", "bc")),
    ],
)
def test_different_parts_give_different_ids(a: tuple[str, ...], b: tuple[str, ...]) -> None:
    cause = new_event_id()
    assert derive_event_id(cause, *a) != derive_event_id(cause, *b)


def test_different_causes_give_different_ids() -> None:
    c1, c2 = new_event_id(), new_event_id()
    assert derive_event_id(c1, "JobPlaced") != derive_event_id(c2, "JobPlaced")


@settings(max_examples=200, deadline=None)
@given(ts=st.integers(min_value=0, max_value=(1 << 48) - 1), rand=st.integers(min_value=0, max_value=(1 << 74) - 1),
       parts=st.lists(st.text(max_size=20), max_size=4))
def test_derived_property(ts: int, rand: int, parts: list[str]) -> None:
    rand_a, rand_b = rand >> 62, rand & ((1 << 62) - 1)
    cause = str(uuid.UUID(int=ts << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b))
    derived = derive_event_id(cause, *parts)
    assert_uuid7(derived)
    assert uuid7_time_ms(derived) == ts
    assert derived == derive_event_id(cause, *parts)
    assert derived != derive_event_id(cause, *parts, "more")


def test_ids_with_a_trailing_newline_are_refused() -> None:
    import pytest

    from shared.identity import Identity, Role, valid_id

    assert not valid_id("job-1\n")
    with pytest.raises(ValueError):
        Identity(Role.NODE_AGENT, "node-a\n")
