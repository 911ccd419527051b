"""Guest RAM scrub (`scrub_memfd`) on real memfds: every data page overwritten and read back, holes skipped,
windows mapped ahead by the helper thread, failures reported rather than raised."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from services.node_agent.teardown import ram
from services.node_agent.teardown.ram import data_extents, scrub_memfd

MIB = 1 << 20


@pytest.fixture
def guest_ram() -> Iterator[int]:
    """16 MiB of guest RAM: data in the first 3 MiB, at 8..9 MiB and in the last page; holes elsewhere."""
    fd = os.memfd_create("test-guest-ram", 0)
    os.ftruncate(fd, 16 * MIB)
    os.pwrite(fd, os.urandom(3 * MIB), 0)
    os.pwrite(fd, b"\xa5" * MIB, 8 * MIB)
    os.pwrite(fd, b"secret", 16 * MIB - 4096)
    yield fd
    os.close(fd)


def _all_zero(fd: int, size: int) -> bool:
    return os.pread(fd, size, 0) == bytes(size)


@pytest.mark.parametrize("window", [ram.WINDOW, MIB, 3 * 4096])
def test_every_data_page_is_zeroed_and_verified(guest_ram: int, window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ram, "WINDOW", window)  # small windows: many mapped ahead, a last one shorter
    extents = list(data_extents(guest_ram, 16 * MIB))
    res = scrub_memfd(guest_ram)
    assert res.verified and res.method == "overwrite-verify"
    assert res.bytes_total == 16 * MIB
    assert res.bytes_scrubbed == sum(end - start for start, end in extents) == 4 * MIB + 4096
    assert _all_zero(guest_ram, 16 * MIB)
    assert f"{16 * MIB - res.bytes_scrubbed} bytes were never written" in res.detail


def test_holes_are_not_allocated(guest_ram: int) -> None:
    """Writing a hole would only allocate it: the scrub leaves the file's holes as they are."""
    before = list(data_extents(guest_ram, 16 * MIB))
    scrub_memfd(guest_ram)
    assert list(data_extents(guest_ram, 16 * MIB)) == before


def test_only_the_first_size_bytes(guest_ram: int) -> None:
    res = scrub_memfd(guest_ram, 2 * MIB)
    assert res.verified and res.bytes_scrubbed == 2 * MIB and res.bytes_total == 2 * MIB
    assert _all_zero(guest_ram, 2 * MIB)
    assert os.pread(guest_ram, MIB, 2 * MIB) != bytes(MIB)  # beyond `size`: untouched


def test_untouched_ram_is_verified_with_nothing_to_write() -> None:
    fd = os.memfd_create("test-empty", 0)
    try:
        os.ftruncate(fd, 4 * MIB)
        res = scrub_memfd(fd)
        assert res.verified and res.bytes_scrubbed == 0
    finally:
        os.close(fd)


def test_a_mapping_failure_is_reported_not_raised(guest_ram: int) -> None:
    ro = os.open(f"/proc/self/fd/{guest_ram}", os.O_RDONLY)  # a shared writable mapping needs a writable fd
    try:
        res = scrub_memfd(ro)
    finally:
        os.close(ro)
    assert not res.verified and res.bytes_scrubbed == 0
    assert res.detail.startswith("cannot scrub the guest RAM")
    assert os.pread(guest_ram, 6, 16 * MIB - 4096) == b"secret"  # nothing claimed, nothing done
