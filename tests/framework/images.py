"""A signed test image, built once per test session with the real builder (distribution kernel,
busybox-static, qvm's guest init); tests that need QEMU skip with the reason where it is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.node_agent.channel import RunOutput
from services.node_agent.instance import Instance
from shared.image.build import BuildRequest, build_image
from shared.image.kernel import fetch_kernel
from shared.image.manifest import generate_publisher_key

IMAGE = "test-image"


def require_vm_tools() -> None:
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static"),
                          ("mkfs.ext4", "e2fsprogs"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt package {package}): micro VM tests need it")


def build_test_image(images: Path, with_vmlinux: bool = False) -> Path:
    """<images>/test-image signed by <images>/publisher.key (trusted via publisher.pub)."""
    require_vm_tools()
    priv, _pub = generate_publisher_key(images)
    root = images.parent / "test-root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hello from the read-only root\n")
    build_image(BuildRequest(name=IMAGE, out=images / IMAGE, kernel=fetch_kernel(), publisher_key=priv,
                             rootfs_dir=root, with_busybox=True, with_vmlinux=with_vmlinux))
    return images / IMAGE


async def run_once(inst: Instance) -> RunOutput:
    """Verify, launch and run an instance; destroy it whatever happens."""
    try:
        await inst.verify()
        await inst.launch()
        return await inst.run()
    finally:
        await inst.destroy()
