"""A signed test image, built once per test session (per worker) with the real builder (qvm's minimal guest
kernel by default, the distribution's cloud kernel on request; busybox-static, qvm's guest init, the host's
cryptsetup and mke2fs) and copied into each test's directory; tests that need QEMU skip with the reason where
a tool is missing. The minimal kernel is built once per machine (cached; `make test` builds it first)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

from services.node_agent.channel import RunOutput
from services.node_agent.instance import Instance
from shared.image.build import GUEST_TOOLS, BuildRequest, build_image, find_host_tool, guest_kernel
from shared.image.manifest import ImageError, generate_publisher_key

IMAGE = "test-image"

_built: dict[tuple[bool, str], Path] = {}  # (with_vmlinux, kernel flavor) -> a cached image (one publisher key)
_cache_root: Path | None = None


def require_vm_tools() -> None:
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static"),
                          ("mkfs.ext4", "e2fsprogs"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt package {package}): micro VM tests need it")
    for tool, package in GUEST_TOOLS:  # carried into every initramfs (the guest opens its LUKS2 volume)
        try:
            find_host_tool(tool, package)
        except ImageError:
            pytest.skip(f"{tool} not installed (apt package {package}): guest images carry it")


def _cached(with_vmlinux: bool, kernel: str) -> Path:
    global _cache_root
    if (with_vmlinux, kernel) in _built:
        return _built[with_vmlinux, kernel]
    if _cache_root is None:
        _cache_root = Path(tempfile.mkdtemp(prefix="qvm-test-images-"))
        atexit.register(shutil.rmtree, _cache_root, True)
        generate_publisher_key(_cache_root)
    variant = _cache_root / (("vmlinux" if with_vmlinux else "plain") + f"-{kernel}")
    root = variant / "test-root"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "motd").write_text("hello from the read-only root\n")
    build_image(BuildRequest(name=IMAGE, out=variant / IMAGE, kernel=guest_kernel(kernel),
                             publisher_key=_cache_root / "publisher.key", rootfs_dir=root, with_busybox=True,
                             with_vmlinux=with_vmlinux))
    _built[with_vmlinux, kernel] = variant / IMAGE
    return variant / IMAGE


def build_test_image(images: Path, with_vmlinux: bool = True, kernel: str = "minimal") -> Path:
    """<images>/test-image signed by <images>/publisher.key (trusted via publisher.pub): a copy of the
    session's build, so a test may tamper with its own. `kernel`: minimal (qvm's) or cloud. With the ELF
    vmlinux by default, as the demo builds it (QEMU boots it through PVH; `with_vmlinux=False`: the bzImage)."""
    require_vm_tools()
    bundle = _cached(with_vmlinux, kernel)
    images.mkdir(parents=True, exist_ok=True)
    for name in ("publisher.key", "publisher.pub"):
        shutil.copy2(bundle.parent.parent / name, images / name)
    shutil.rmtree(images / IMAGE, ignore_errors=True)
    shutil.copytree(bundle, images / IMAGE)
    return images / IMAGE


async def run_once(inst: Instance) -> RunOutput:
    """Verify, launch and run an instance; destroy it whatever happens."""
    try:
        await inst.verify()
        await inst.launch()
        return await inst.run()
    finally:
        await inst.destroy()
