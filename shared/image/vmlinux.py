"""The uncompressed ELF kernel (`vmlinux`) inside a distribution's compressed `vmlinuz` (bzImage).

Firecracker and Cloud Hypervisor boot an ELF vmlinux (PVH); QEMU boots the bzImage directly. Like the
kernel's own scripts/extract-vmlinux: find the payload's compression magic, decompress, keep the result
only if it is an ELF image. Debian's cloud kernels use LZ4 (the kernel's legacy LZ4 framing); gzip and xz
kernels are handled with the standard library.
"""

from __future__ import annotations

import gzip
import lzma
import zlib

import lz4.block

from shared.image.manifest import ImageError

__all__ = ["extract_vmlinux"]

_LZ4_LEGACY = b"\x02\x21\x4c\x18"
_LZ4_BLOCK = 8 << 20
_GZIP = b"\x1f\x8b\x08"
_XZ = b"\xfd7zXZ\x00"
_ELF = b"\x7fELF"


def _lz4_legacy(data: bytes, start: int) -> bytes:
    out = bytearray()
    pos = start + len(_LZ4_LEGACY)
    while pos + 4 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "little")
        if size == 0 or size > _LZ4_BLOCK + 4096 or pos + 4 + size > len(data):
            break  # end of the stream (the kernel appends its size and padding)
        try:
            out += lz4.block.decompress(data[pos + 4:pos + 4 + size], uncompressed_size=_LZ4_BLOCK)
        except lz4.block.LZ4BlockError:
            break
        pos += 4 + size
    return bytes(out)


def extract_vmlinux(bzimage: bytes) -> bytes:
    candidates = []
    for magic, decode in ((_LZ4_LEGACY, _lz4_legacy),
                          (_GZIP, lambda d, i: zlib.decompressobj(31).decompress(d[i:])),
                          (_XZ, lambda d, i: lzma.LZMADecompressor().decompress(d[i:]))):
        i = bzimage.find(magic)
        if i >= 0:
            candidates.append((magic, decode, i))
    for _magic, decode, i in candidates:
        try:
            out = decode(bzimage, i)
        except (lzma.LZMAError, zlib.error, gzip.BadGzipFile, ValueError):
            continue
        if out.startswith(_ELF):
            return out
    raise ImageError("vmlinux_not_found", "no LZ4, gzip or xz payload that unpacks to an ELF kernel")
