"""An instance's encrypted data volume on the host side: a sparse file the guest formats as LUKS2 and opens
itself (the host never holds its plaintext), and its erasure at teardown, with evidence.

Why erase at all when the host never had the plaintext: the guest's LUKS2 header holds the volume key,
wrapped under the job's DEK in the keyslots. Whoever later gets both the file's blocks and the DEK (a
leaked key-broker copy, a replayed release) could decrypt it. `cryptsetup erase` destroys every keyslot,
and overwriting the whole header area (both LUKS2 headers and the keyslot area, up to the data segment)
removes the rest; what remains is ciphertext under a key that no longer exists anywhere. The overwrite is
fsynced and read back, so the evidence says what the disk holds, not what we asked for.

The header is written by an untrusted guest: it is parsed with bounds (the data offset is clamped to the
file), and `cryptsetup erase` (a parser built for headers from untrusted media) runs with a timeout.
All of this is blocking file and subprocess work: callers run it off the event loop (`asyncio.to_thread`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from shared.events import MIN_VOLUME_MIB  # the LUKS2 header area alone is 2 MiB; a file system needs room
from shared.models import VolumeErasure

__all__ = ["LUKS2_MAGIC", "MIN_VOLUME_MIB", "MIN_WIPE_BYTES", "VOLUME_FILE", "erase_volume", "luks2_layout",
           "make_volume"]

VOLUME_FILE = "volume.luks"
LUKS2_MAGIC = b"LUKS\xba\xbe"
LUKS2_MAGIC_SECONDARY = b"SKUL\xba\xbe"
MIN_WIPE_BYTES = 2 << 20  # the data offset the guest init's format options give
# The offsets LUKS2 allows for its secondary header (= the primary's metadata size), 16 KiB to 4 MiB.
_SECONDARY_OFFSETS = tuple(16384 << i for i in range(9))
_CHUNK = 1 << 20


def make_volume(path: Path, size_mib: int) -> None:
    """A new sparse file of `size_mib` MiB (refuses to reuse one: a leftover is never handed to a new guest),
    readable by the agent only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_mib << 20)
    finally:
        os.close(fd)


def luks2_layout(fd: int, size: int) -> tuple[bool, int]:
    """(a LUKS2 header is present, the end of its header area) read from an open volume file.

    The end is the largest of the data segments' offsets, the keyslot areas' ends and twice the metadata
    size, clamped to the file; 0 where the primary header is missing or its JSON does not parse (the
    caller then wipes at least MIN_WIPE_BYTES)."""
    head = os.pread(fd, 4096, 0)
    found = head[:6] == LUKS2_MAGIC or any(
        os.pread(fd, 6, off) == LUKS2_MAGIC_SECONDARY for off in _SECONDARY_OFFSETS if off + 6 <= size)
    if head[:6] != LUKS2_MAGIC or len(head) < 16:
        return found, 0
    hdr_size = int.from_bytes(head[8:16], "big")
    if hdr_size not in _SECONDARY_OFFSETS:
        return found, 0
    raw = os.pread(fd, hdr_size - 4096, 4096).split(b"\0", 1)[0]
    try:
        meta = json.loads(raw)
        ends = [2 * hdr_size]
        for seg in meta.get("segments", {}).values():
            ends.append(int(seg["offset"]))
        for slot in meta.get("keyslots", {}).values():
            area = slot.get("area", {})
            ends.append(int(area["offset"]) + int(area["size"]))
        if "config" in meta:
            ends.append(2 * hdr_size + int(meta["config"].get("keyslots_size", 0)))
    except (ValueError, TypeError, KeyError, AttributeError):
        return found, 0
    return found, max(0, min(max(ends), size))


def erase_volume(path: Path, cryptsetup: str = "cryptsetup", timeout_s: float = 60.0) -> VolumeErasure:
    """Erase the LUKS2 keyslots (`cryptsetup erase`), overwrite the header area with zeros, fsync, read it
    back, unlink the file. Never raises for what it finds on the file: every outcome is in the evidence.
    The VMM must have stopped (nothing else may write the file)."""
    t0 = time.monotonic()
    problems: list[str] = []
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return VolumeErasure(volume_bytes=0, luks_header_found=False, luks_erase="no_header", overwritten_bytes=0,
                             verified_zero=False, removed=False, duration_ms=_ms(t0), detail="no volume file")
    size, found, end, erase, overwritten, verified = 0, False, 0, "failed", 0, False
    try:
        size = os.fstat(fd).st_size
        found, end = luks2_layout(fd, size)
        erase = "no_header"
        if found:
            erase, why = _cryptsetup_erase(path, cryptsetup, timeout_s)
            if why:
                problems.append(why)
        length = min(size, max(end, MIN_WIPE_BYTES))
        overwritten = _overwrite_zero(fd, length)
        os.fsync(fd)
        verified = overwritten == length and _reads_zero(fd, length)
    except OSError as exc:
        problems.append(f"{exc}")
    os.close(fd)
    removed = False
    try:
        path.unlink()
        removed = True
        _fsync_dir(path.parent)
    except OSError as exc:
        problems.append(f"unlink: {exc}")
    return VolumeErasure(volume_bytes=size, luks_header_found=found, luks_erase=erase,
                         data_offset=end, overwritten_bytes=overwritten, verified_zero=verified, removed=removed,
                         duration_ms=_ms(t0), detail="; ".join(problems)[:512])


def _cryptsetup_erase(path: Path, cryptsetup: str, timeout_s: float) -> tuple[str, str]:
    """`cryptsetup erase` works on a plain file (header operations need no loop device)."""
    binary = shutil.which(cryptsetup, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if binary is None:
        return "unavailable", "cryptsetup not found on the node (apt package cryptsetup-bin): overwrite only"
    try:
        proc = subprocess.run([binary, "erase", "--batch-mode", str(path)], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "failed", f"cryptsetup erase ran past {timeout_s:g}s"
    if proc.returncode != 0:
        return "failed", f"cryptsetup erase exited {proc.returncode}: {proc.stderr.strip()[-200:]}"
    return "ok", ""


def _overwrite_zero(fd: int, length: int) -> int:
    zeros = bytes(_CHUNK)
    done = 0
    while done < length:
        n = os.pwrite(fd, zeros[: min(_CHUNK, length - done)], done)
        if n <= 0:
            break
        done += n
    return done


def _reads_zero(fd: int, length: int) -> bool:
    with contextlib.suppress(AttributeError):
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_DONTNEED)  # read the disk's copy where the cache allows
    done = 0
    while done < length:
        chunk = os.pread(fd, min(_CHUNK, length - done), done)
        if not chunk or chunk.count(0) != len(chunk):
            return False
        done += len(chunk)
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 3)
