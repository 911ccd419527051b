"""A client's secret bundle: named files, packed with msgpack before it is sealed to an instance.

Both ends use this module: the client SDK packs, the node-agent unpacks (after opening the seal in RAM) and
hands each file to the guest's secrets tmpfs. The bundle is untrusted input on the agent's side, so names
and sizes are checked strictly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgpack

from shared.errors import ReasonedError

__all__ = ["MAX_BUNDLE_BYTES", "MAX_FILES", "MAX_FILE_BYTES", "BundleError", "pack_bundle", "unpack_bundle"]

NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
MAX_FILES = 32
MAX_FILE_BYTES = 64 * 1024
MAX_BUNDLE_BYTES = 256 * 1024


class BundleError(ReasonedError):
    """A failure with a stable reason code (see `ReasonedError`)."""


def _check(files: Mapping[str, bytes | bytearray]) -> None:
    if not files:
        raise BundleError("bundle_empty", "a secret bundle needs at least one file")
    if len(files) > MAX_FILES:
        raise BundleError("bundle_too_large", f"{len(files)} files (at most {MAX_FILES})")
    total = 0
    for name, data in files.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise BundleError("bundle_bad_name", f"{str(name)[:70]!r} is not a secret file name "
                                                 "([A-Za-z0-9._-], no leading dot, at most 64)")
        if not isinstance(data, bytes | bytearray):
            raise BundleError("bundle_malformed", f"{name}: content is not bytes")
        if len(data) > MAX_FILE_BYTES:
            raise BundleError("bundle_too_large", f"{name}: {len(data)} bytes (at most {MAX_FILE_BYTES})")
        total += len(data)
    if total > MAX_BUNDLE_BYTES:
        raise BundleError("bundle_too_large", f"{total} bytes in all (at most {MAX_BUNDLE_BYTES})")


def pack_bundle(files: Mapping[str, bytes | bytearray]) -> bytearray:
    _check(files)
    return bytearray(msgpack.packb({k: bytes(v) for k, v in files.items()}, use_bin_type=True))


def unpack_bundle(raw: bytes | bytearray) -> dict[str, bytes]:
    if len(raw) > MAX_BUNDLE_BYTES + 4096:
        raise BundleError("bundle_too_large", f"{len(raw)} bytes")
    try:
        files = msgpack.unpackb(bytes(raw), raw=False, max_bin_len=MAX_FILE_BYTES, max_map_len=MAX_FILES,
                                max_str_len=64, max_array_len=0, max_ext_len=0)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise BundleError("bundle_malformed", f"not a secret bundle: {type(exc).__name__}") from None
    if not isinstance(files, dict):
        raise BundleError("bundle_malformed", "not a map of files")
    _check(files)
    return files
