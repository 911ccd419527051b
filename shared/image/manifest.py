"""The signed image manifest: the SHA-256 and size of every part, and the kernel command line.

A bundle is a directory:
    manifest.json   the manifest (canonical JSON bytes, exactly what was signed)
    manifest.sig    Ed25519 signature over manifest.json by the image publisher's key
    <parts>         vmlinuz, initrd.img, rootfs.ext4 (names as listed in the manifest)

Publisher keys are plain Ed25519 keys (`qvm image keygen`); node-agents trust a configured set of
publisher public keys, independent of the bus PKI, so an image can be checked anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import Field

from shared.errors import ReasonedError
from shared.models import Frozen

__all__ = [
    "MANIFEST",
    "SIGNATURE",
    "ImageError",
    "ImageManifest",
    "KernelBuild",
    "Part",
    "generate_publisher_key",
    "load_private_key",
    "load_public_keys",
    "publisher_id",
]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_PART_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class ImageError(ReasonedError):
    """An image bundle that must not be launched; `reason` is a stable code."""


class Part(Frozen):
    file: str = Field(pattern=_PART_NAME, description="File name inside the bundle (no directories).")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class KernelBuild(Frozen):
    """How qvm's minimal guest kernel was built (shared/image/kernel_build.py): enough to rebuild the same
    bytes, recorded beside the cached kernel and in the manifest of every image that boots it."""

    source: str = Field(max_length=128, description="The Debian source package and its version.")
    fragment_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The checked-in config fragment.")
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The resolved .config built with.")
    compiler: str = Field(max_length=128)
    build_s: float = Field(ge=0, description="How long the (first) build took.")
    bzimage_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ImageManifest(Frozen):
    format: int = Field(1, ge=1, le=1)
    name: str = Field(max_length=128)
    created_ns: int = Field(ge=0)
    kernel: Part
    initrd: Part
    rootfs: Part
    cmdline: str = Field(max_length=2048, description="Kernel command line (qvm adds host-specific timing).")
    kernel_release: str = Field(max_length=128)
    vmlinux: Part | None = Field(None, description="The kernel as an ELF image (Firecracker, Cloud Hypervisor).")
    kernel_build: KernelBuild | None = Field(None, description="qvm's minimal kernel: how it was built (None: a "
                                                               "distribution kernel, `kernel_release` names it).")
    publisher: str = Field(pattern=r"^[0-9a-f]{16}$", description="Publisher key id (SHA-256 prefix).")

    def parts(self) -> list[Part]:
        """kernel, initrd, rootfs, then vmlinux when the bundle has one (verify_open keeps this order)."""
        return [self.kernel, self.initrd, self.rootfs, *([self.vmlinux] if self.vmlinux else [])]

    def canonical(self) -> bytes:
        return self.model_dump_json(indent=None).encode()


def publisher_id(key: ed25519.Ed25519PublicKey) -> str:
    import hashlib

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_publisher_key(directory: Path) -> tuple[Path, Path]:
    """Write publisher.key (PKCS#8 PEM, 0600) and publisher.pub (PEM) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    priv, pub = directory / "publisher.key", directory / "publisher.pub"
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise ImageError("bad_publisher_key", f"{path}: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ImageError("bad_publisher_key", f"{path}: not an Ed25519 key")
    return key


def load_public_keys(paths: list[Path]) -> dict[str, ed25519.Ed25519PublicKey]:
    """Trusted publisher keys by id; every file may hold one PEM public key."""
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise ImageError("bad_publisher_key", f"{path}: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ImageError("bad_publisher_key", f"{path}: not an Ed25519 key")
        keys[publisher_id(key)] = key
    return keys
