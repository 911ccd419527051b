"""The demo image: busybox plus a greeting, signed by a development publisher key kept beside the
images (`<images>/dev-publisher.key`, trusted through `<images>/dev-publisher.pub`). Built once."""

from __future__ import annotations

import tempfile
from pathlib import Path

from shared.image.build import BuildRequest, build_image
from shared.image.kernel import fetch_kernel
from shared.image.manifest import MANIFEST, generate_publisher_key

__all__ = ["DEMO_IMAGE", "ensure_demo_image"]

DEMO_IMAGE = "qvm-demo-image"


def ensure_demo_image(images: Path, name: str = DEMO_IMAGE) -> Path:
    bundle = images / name
    if (bundle / MANIFEST).exists():
        return bundle
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
        build_image(BuildRequest(name=name, out=bundle, kernel=fetch_kernel(), publisher_key=key, rootfs_dir=root,
                                 with_busybox=True))
    return bundle
