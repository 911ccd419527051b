"""The demo image: busybox plus a greeting, signed by a development publisher key kept beside the
images (`<images>/dev-publisher.key`, trusted through `<images>/dev-publisher.pub`).

Built once per recipe: the kernel (its flavor and bytes) and qvm's guest init. A bundle left by an older
recipe (a new guest init, a rebuilt kernel) is rebuilt, so the demo never boots a stale initramfs."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from shared.image.build import BuildRequest, build_image, guest_kernel
from shared.image.kernel import GuestKernel
from shared.image.manifest import MANIFEST, generate_publisher_key
from shared.image.verify import file_sha256

__all__ = ["DEMO_IMAGE", "ensure_demo_image", "image_recipe"]

DEMO_IMAGE = "qvm-demo-image"
_RECIPE = ".qvm-recipe"  # beside the manifest: what the bundle was built from


def image_recipe(kernel: GuestKernel) -> str:
    """A digest of what decides a built image's boot: the kernel's bytes and the guest init."""
    init = resources.files("shared.image").joinpath("guest_init.sh").read_bytes()
    return hashlib.sha256(file_sha256(kernel.vmlinuz)[0].encode() + b"\0" + init).hexdigest()


def ensure_demo_image(images: Path, name: str = DEMO_IMAGE, kernel_flavor: str = "minimal") -> Path:
    bundle = images / name
    kernel = guest_kernel(kernel_flavor)
    recipe = image_recipe(kernel)
    if (bundle / MANIFEST).exists() and (bundle / _RECIPE).is_file() and (bundle / _RECIPE).read_text() == recipe:
        return bundle
    shutil.rmtree(bundle, ignore_errors=True)
    images.mkdir(parents=True, exist_ok=True)
    key = images / "dev-publisher.key"
    if not key.exists():
        priv, pub = generate_publisher_key(images)
        priv.rename(key)
        pub.rename(images / "dev-publisher.pub")
    with tempfile.TemporaryDirectory(prefix="qvm-demo-root-") as tmp:
        root = Path(tmp)
        (root / "etc").mkdir()
        (root / "etc" / "qvm-demo.txt").write_text("this file comes from the signed, read-only root image\n")
        build_image(BuildRequest(name=name, out=bundle, kernel=kernel, publisher_key=key, rootfs_dir=root,
                                 with_busybox=True, with_vmlinux=True))  # QEMU boots the ELF kernel (PVH)
    (bundle / _RECIPE).write_text(recipe)
    return bundle
