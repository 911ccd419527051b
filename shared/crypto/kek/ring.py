"""The key ring and the wrap format: KEK versions in memory, and a DEK wrapped under one of them.

Wrapping binds the KEK version and the caller's `aad` (for a DEK: its job id) as AES-GCM associated data,
so a wrapped key copied to another job's record, or relabelled with another version, does not unwrap.
A `KekSource` is where a ring comes from (`shared.crypto.kek` lists the kinds).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, runtime_checkable

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.crypto.errors import CryptoError
from shared.crypto.secret import zeroize

__all__ = [
    "KEK_BYTES",
    "MAX_VERSION",
    "NONCE_BYTES",
    "TAG_BYTES",
    "KekRing",
    "KekSource",
    "ManagedKekSource",
    "WrappedKey",
]

KEK_BYTES = 32  # AES-256
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce, random per wrap (2^32 wraps per KEK stay far below the bound)
TAG_BYTES = 16
MAX_WRAPPED_PLAINTEXT = 4096  # keys, not data
MAX_VERSION = 2**31 - 1
WRAP_FORMAT = 1
_WRAP_LABEL = b"qvm-kek-wrap-v1\x00"


# ====================================================================== wrapped keys
def _wrap_aad(version: int, aad: bytes) -> bytes:
    """Associated data of one wrap: a label, the KEK version (fixed width, so the split is unambiguous)
    and the caller's binding."""
    return _WRAP_LABEL + version.to_bytes(4, "big") + bytes(aad)


@dataclass(frozen=True)
class WrappedKey:
    """A DEK encrypted under one KEK version: safe to store anywhere (it opens only inside the broker)."""

    kek_version: int
    nonce: bytes
    ciphertext: bytes  # AES-256-GCM ciphertext with its 16-byte tag

    def to_bytes(self) -> bytes:
        """msgpack `[format, kek_version, nonce, ciphertext]`: compact, and versioned for later formats."""
        return bytes(msgpack.packb([WRAP_FORMAT, self.kek_version, self.nonce, self.ciphertext],
                                   use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes) -> WrappedKey:
        """Parse what `to_bytes` wrote; anything else is `CryptoError("malformed_wrapped_key")`."""
        try:
            fields = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_WRAPPED_PLAINTEXT + 64,
                                     max_array_len=8, max_map_len=0, max_str_len=0)
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise CryptoError("malformed_wrapped_key", f"not a wrapped key: {type(exc).__name__}") from None
        if (not isinstance(fields, list) or len(fields) != 4 or fields[0] != WRAP_FORMAT
                or type(fields[1]) is not int or not 1 <= fields[1] <= MAX_VERSION
                or not isinstance(fields[2], bytes) or len(fields[2]) != NONCE_BYTES
                or not isinstance(fields[3], bytes)
                or not TAG_BYTES < len(fields[3]) <= MAX_WRAPPED_PLAINTEXT + TAG_BYTES):
            raise CryptoError("malformed_wrapped_key", "not a format-1 wrapped key")
        return cls(fields[1], fields[2], fields[3])


# ====================================================================== the ring
class KekRing:
    """KEK versions in memory; wraps under the current (highest) version, unwraps under any.

    The ring owns the bytearrays it is given (it overwrites them on `close()`); callers hand them over
    and keep no other reference. Usable from several threads at once (each call builds its own cipher);
    `close()` only once nothing else uses the ring.
    """

    def __init__(self, keys: Mapping[int, bytearray], created_ns: Mapping[int, int] | None = None,
                 source: str = "") -> None:
        if not keys:
            raise CryptoError("no_kek", "a KEK ring needs at least one version")
        for version, key in keys.items():
            if type(version) is not int or not 1 <= version <= MAX_VERSION:
                raise CryptoError("bad_kek", f"KEK version {version!r} (1..{MAX_VERSION})")
            if not isinstance(key, bytearray) or len(key) != KEK_BYTES:
                raise CryptoError("bad_kek", f"KEK version {version} must be a {KEK_BYTES}-byte bytearray")
        self._keys: dict[int, bytearray] = dict(keys)
        self._created = {v: int((created_ns or {}).get(v, 0)) for v in self._keys}
        self._closed = False
        self.source = source

    # ---------------------------------------------------------- facts (no secrets)
    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._keys))

    @property
    def current(self) -> int:
        return max(self._keys)

    @property
    def created_ns(self) -> dict[int, int]:
        """When each version was made (ns since the epoch; 0 where the source does not record it)."""
        return dict(self._created)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"KekRing(versions={list(self.versions)}, current={self.current}, closed={self._closed})"

    def _key(self, version: int) -> bytearray:
        if self._closed:
            raise CryptoError("kek_ring_closed", "the KEK ring was closed")
        key = self._keys.get(version)
        if key is None:
            raise CryptoError("unknown_kek_version", f"no KEK version {version} (have {list(self.versions)})")
        return key

    # ---------------------------------------------------------- operations
    def wrap(self, dek: bytes | bytearray | memoryview, aad: bytes) -> WrappedKey:
        """Encrypt `dek` under the current KEK with a fresh random nonce, bound to `aad` and the version."""
        if not 0 < len(dek) <= MAX_WRAPPED_PLAINTEXT:
            raise CryptoError("wrap_failed", f"a key to wrap is 1..{MAX_WRAPPED_PLAINTEXT} bytes, got {len(dek)}")
        version = self.current
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(self._key(version)).encrypt(nonce, dek, _wrap_aad(version, aad))
        return WrappedKey(version, nonce, ciphertext)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytearray:
        """The DEK, in a new bytearray the caller zeroizes. `unknown_kek_version` when the ring lacks the
        version, `unwrap_failed` when the tag does not verify (other aad, altered bytes, another KEK)."""
        key = self._key(wrapped.kek_version)
        if len(wrapped.nonce) != NONCE_BYTES or len(wrapped.ciphertext) <= TAG_BYTES:
            raise CryptoError("unwrap_failed", "malformed wrapped key")
        out = bytearray(len(wrapped.ciphertext) - TAG_BYTES)
        try:
            AESGCM(key).decrypt_into(wrapped.nonce, wrapped.ciphertext, _wrap_aad(wrapped.kek_version, aad), out)
        except (InvalidTag, ValueError):
            zeroize(out)
            raise CryptoError("unwrap_failed", f"wrapped key does not open under KEK version "
                                               f"{wrapped.kek_version} with this binding") from None
        return out

    def rewrap(self, wrapped: WrappedKey, aad: bytes) -> WrappedKey:
        """The same DEK wrapped under the current KEK (rotation); already current: returned unchanged."""
        if wrapped.kek_version == self.current:
            self._key(wrapped.kek_version)  # a closed ring still refuses
            return wrapped
        dek = self.unwrap(wrapped, aad)
        try:
            return self.wrap(dek, aad)
        finally:
            zeroize(dek)

    def close(self) -> None:
        """Overwrite every KEK; the ring refuses all operations afterwards."""
        for key in self._keys.values():
            zeroize(key)
        self._closed = True

    def __enter__(self) -> KekRing:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ====================================================================== sources
@runtime_checkable
class KekSource(Protocol):
    """Where a KEK ring comes from. `describe()` is for logs and `qvm keys show`: never secret."""

    def load(self) -> KekRing: ...

    def describe(self) -> str: ...


@runtime_checkable
class ManagedKekSource(KekSource, Protocol):
    """A source qvm itself can create and rotate (`qvm keys init / rotate`); a KMS manages its own keys."""

    def init(self) -> int: ...

    def rotate(self) -> int: ...
