"""Verify an image bundle before it is launched: signature by a trusted publisher, then every part's
size and SHA-256, streamed (the parts are large). Any failure raises `ImageError` with a reason code:

    missing_manifest, unsigned, malformed_manifest, untrusted_publisher, bad_signature,
    missing_part, size_mismatch, digest_mismatch
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import ValidationError

from shared.image.manifest import MANIFEST, SIGNATURE, ImageError, ImageManifest, Part

__all__ = ["fd_sha256", "file_sha256", "verify_bundle", "verify_open"]

CHUNK = 2 << 20
MAX_MANIFEST = 64 * 1024


def fd_sha256(fd: int) -> tuple[str, int]:
    """SHA-256 and length of everything `fd` holds, read with pread (its offset is left alone).

    A helper thread reads the next chunk into one buffer while this one hashes the other (both calls let go
    of the GIL), so the copy out of the page cache hides behind the hashing and a part is checked at about
    the speed of hashing bytes already in memory (`make bench` section 4 holds it against exactly that).
    Reading, not mapping, the file: a part truncated meanwhile ends short (a digest mismatch), where a
    mapping would take the process down with SIGBUS."""
    h = hashlib.sha256()
    buffers = (bytearray(CHUNK), bytearray(CHUNK))
    size = 0
    with ThreadPoolExecutor(1, thread_name_prefix="qvm-image-read") as reader:
        reads: list[Future[int]] = [reader.submit(os.preadv, fd, [buffers[k]], k * CHUNK) for k in (0, 1)]
        offset, i = 2 * CHUNK, 0
        while n := reads[i].result():
            h.update(memoryview(buffers[i])[:n])
            size += n
            if n < CHUNK:  # the end: a short read (the other read, further on, finds nothing)
                reads[1 - i].result()
                break
            reads[i] = reader.submit(os.preadv, fd, [buffers[i]], offset)
            offset += CHUNK
            i = 1 - i
    return h.hexdigest(), size


def file_sha256(path: Path) -> tuple[str, int]:
    with open(path, "rb") as f:
        return fd_sha256(f.fileno())


def verify_bundle(bundle: Path, trusted: Mapping[str, object]) -> ImageManifest:
    """The verified manifest; parts are checked in full (blocking: call from a worker thread)."""
    manifest = _verified_manifest(bundle, trusted)
    for part in manifest.parts():
        _check_part(bundle, part)
    return manifest


def _verified_manifest(bundle: Path, trusted: Mapping[str, object]) -> ImageManifest:
    mpath, spath = bundle / MANIFEST, bundle / SIGNATURE
    if not mpath.is_file():
        raise ImageError("missing_manifest", f"{bundle} has no {MANIFEST}")
    if not spath.is_file():
        raise ImageError("unsigned", f"{bundle} has no {SIGNATURE}")
    raw = mpath.read_bytes()
    if len(raw) > MAX_MANIFEST:
        raise ImageError("malformed_manifest", f"{len(raw)} bytes")
    try:
        manifest = ImageManifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ImageError("malformed_manifest", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    key = trusted.get(manifest.publisher)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ImageError("untrusted_publisher", f"publisher {manifest.publisher} is not trusted on this node")
    try:
        key.verify(spath.read_bytes(), raw)
    except InvalidSignature:
        raise ImageError("bad_signature", f"{SIGNATURE} does not verify for publisher {manifest.publisher}") from None
    return manifest


def _check_part(bundle: Path, part: Part) -> None:
    path = bundle / part.file
    if not path.is_file():
        raise ImageError("missing_part", part.file)
    size = path.stat().st_size
    if size != part.size:
        raise ImageError("size_mismatch", f"{part.file}: {size} bytes, manifest says {part.size}")
    digest, _ = file_sha256(path)
    if digest != part.sha256:
        raise ImageError("digest_mismatch", f"{part.file}: sha256 {digest[:16]}…, manifest says {part.sha256[:16]}…")


def verify_open(bundle: Path, trusted: Mapping[str, object]) -> tuple[ImageManifest, list[BinaryIO]]:
    """Verify and keep the parts open: the launch uses these descriptors, so a file replaced on disk
    after the check is never the one booted. Returns (manifest, [kernel, initrd, rootfs])."""
    manifest = _verified_manifest(bundle, trusted)
    files: list[BinaryIO] = []
    try:
        for part in manifest.parts():
            opened: BinaryIO = open(bundle / part.file, "rb")  # noqa: SIM115 - the caller closes it
            files.append(opened)
            _check_open(opened, part)
    except FileNotFoundError as exc:
        _close_all(files)
        raise ImageError("missing_part", str(exc.filename)) from None
    except ImageError:
        _close_all(files)
        raise
    return manifest, files


def _check_open(f: BinaryIO, part: Part) -> None:
    size = os.fstat(f.fileno()).st_size
    if size != part.size:
        raise ImageError("size_mismatch", f"{part.file}: {size} bytes, manifest says {part.size}")
    digest, _ = fd_sha256(f.fileno())
    if digest != part.sha256:
        raise ImageError("digest_mismatch", f"{part.file}: sha256 differs from the manifest")
    f.seek(0)


def _close_all(files: list[BinaryIO]) -> None:
    for f in files:
        f.close()
