"""Scrub an instance's guest RAM after its VMM exited, with evidence.

The agent creates the guest's RAM as a memfd (no path in any filesystem) and hands it to the VMM, so
after the VMM is gone the agent still holds every page the guest ever wrote. Closing the descriptor would
give the pages back to the kernel (which zeroes a page before it reuses it) but proves nothing and leaves
the contents in RAM until then. So the agent overwrites with zeros every page that holds data and reads
all of it back, then closes it: method `overwrite-verify`.

- Only data extents are touched (`SEEK_DATA` / `SEEK_HOLE` on the memfd): a hole is a page the guest
  never wrote, which holds nothing and reads as zero; writing it would only allocate it.
- Each extent is mapped with `MAP_POPULATE` (page tables filled in one go, not one fault per page), then
  zeroed with memset and compared against a zero chunk with memcmp, both in C through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import time
from collections.abc import Iterator

from shared.models import MemoryScrub

__all__ = ["CHUNK", "data_extents", "scrub_memfd"]

CHUNK = 256 << 10  # the zero chunk stays in cache: memcmp then reads guest RAM only
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_libc.memcmp.restype = ctypes.c_int
_ZERO = (ctypes.c_char * CHUNK)()  # one zero chunk to compare against (allocated zeroed)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every range of `fd` below `size` that holds data (pages the guest touched)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def _scrub_range(fd: int, start: int, end: int) -> bool:
    length = end - start
    with mmap.mmap(fd, length, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE,
                   offset=start) as mm:
        view = (ctypes.c_char * length).from_buffer(mm)
        try:
            base = ctypes.addressof(view)
            ctypes.memset(base, 0, length)
            return all(_libc.memcmp(base + off, _ZERO, min(CHUNK, length - off)) == 0
                       for off in range(0, length, CHUNK))
        finally:
            del view  # the mapping cannot close while a ctypes view exports it


def scrub_memfd(fd: int, size: int | None = None) -> MemoryScrub:
    """Overwrite every data page of `fd`'s first `size` bytes (default: all of it) and verify it reads zero.

    Blocking (a fraction of a second per GB): run it off the event loop. The VMM must have exited: a live
    writer would make the verification meaningless (the caller stops it first).
    """
    started = time.perf_counter()
    total = os.fstat(fd).st_size if size is None else size
    scrubbed = 0
    verified = True
    detail = ""
    try:
        for start, end in list(data_extents(fd, total)):
            verified = _scrub_range(fd, start, end) and verified
            scrubbed += end - start
    except (OSError, ValueError) as exc:
        verified = False
        detail = f"cannot scrub the guest RAM: {exc}"[:512]
    if not verified and not detail:
        detail = "a byte read back non-zero after the overwrite (is the VMM still running?)"
    elif verified:
        detail = f"{total - scrubbed} bytes were never written by the guest (holes: they hold nothing)"
    seconds = time.perf_counter() - started
    return MemoryScrub(bytes_total=total, bytes_scrubbed=scrubbed, method="overwrite-verify", verified=verified,
                       duration_ms=round(seconds * 1000, 2),
                       rate_gbps=round(scrubbed / seconds / 1e9, 2) if seconds > 0 and scrubbed else 0.0,
                       detail=detail)
