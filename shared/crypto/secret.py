"""Secret bytes that qvm owns, and overwrites when it is done with them.

Python cannot promise that a secret leaves no copy behind: `bytes` objects are immutable and freed
without being cleared, the garbage collector and the allocator move nothing but never wipe either, and
libraries (OpenSSL inside `cryptography`, the TSS inside `tpm2-pytss`) keep their own copies in their own
buffers. What qvm can do, and does, is keep the copies it controls to a minimum:

* a secret lives only in a `bytearray` (or a memoryview of one) that qvm allocated itself;
* it is produced straight into that buffer where the library allows it (AEAD `decrypt_into`, Scrypt
  `derive_into`, random bytes read from the kernel with `readinto`);
* the buffer is overwritten with zeros (`zeroize`) as soon as the secret is no longer needed, on every
  path, error paths included (`SecretBuffer` as a context manager, or `try/finally`).

This narrows the window in which a memory dump, a core file or a swapped page shows a key; it does not
close it. Hosts that need more lock the key-broker's memory (mlockall, no core dumps) outside Python.
"""

from __future__ import annotations

import ctypes
import os
from types import TracebackType

__all__ = ["SecretBuffer", "random_secret", "zeroize"]


def zeroize(buf: bytearray | memoryview) -> None:
    """Overwrite a writable buffer with zeros, in place.

    `ctypes.memset` writes the bytes through the buffer's own address, so the compiler or the interpreter
    cannot turn it into a no-op or a reallocation; a read-only buffer (a `bytes` object, a memoryview of
    one) is refused rather than silently left intact.
    """
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if view.readonly:
        raise TypeError("zeroize needs a writable buffer (a bytearray), not bytes")
    size = view.nbytes
    if size == 0:
        return
    if not view.c_contiguous:
        raise TypeError("zeroize needs a contiguous buffer")
    byte_view = view.cast("B")
    address = ctypes.addressof(ctypes.c_char.from_buffer(byte_view))
    ctypes.memset(address, 0, size)


def random_secret(size: int) -> bytearray:
    """`size` random bytes from the kernel CSPRNG in a fresh bytearray the caller owns (and must zeroize).

    Read with `readinto` from /dev/urandom (non-blocking once the pool is seeded, the same source as
    `os.urandom`), so the bytes land in the caller's buffer only: `os.urandom` would first return an
    immutable `bytes` copy that nothing can wipe.
    """
    if size <= 0:
        raise ValueError("a secret needs at least one byte")
    out = bytearray(size)
    try:
        with open("/dev/urandom", "rb", buffering=0) as rng, memoryview(out) as view:
            filled = 0
            while filled < size:
                n = rng.readinto(view[filled:])
                if not n:
                    raise OSError("short read from /dev/urandom")
                filled += n
    except OSError:
        out[:] = os.urandom(size)  # no /dev/urandom (a sandbox): the same CSPRNG, one unwipeable copy
    return out


class SecretBuffer:
    """A bytearray that is overwritten when the `with` block ends (or on `close()`), whatever happens.

        with SecretBuffer.random(32) as key:
            ...use key (a bytearray)...
        # key is all zeros here
    """

    __slots__ = ("_buf", "_closed")

    def __init__(self, size_or_data: int | bytearray) -> None:
        """A zero-filled buffer of `size` bytes, or adopt an existing bytearray (it is wiped on close)."""
        self._buf = bytearray(size_or_data) if isinstance(size_or_data, int) else size_or_data
        self._closed = False

    @classmethod
    def random(cls, size: int) -> SecretBuffer:
        return cls(random_secret(size))

    @property
    def value(self) -> bytearray:
        if self._closed:
            raise ValueError("secret buffer already wiped")
        return self._buf

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:  # never the content
        return f"SecretBuffer({len(self._buf)} bytes{', wiped' if self._closed else ''})"

    def close(self) -> None:
        zeroize(self._buf)
        self._closed = True

    def __enter__(self) -> bytearray:
        return self.value

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
