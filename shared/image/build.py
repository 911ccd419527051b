"""`qvm image build`: kernel + initramfs (busybox-static, qvm's guest init, the needed modules) + rootfs,
then a manifest of their digests, signed by the publisher's key.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from shared.image.cpio import initramfs_from_dir
from shared.image.kernel import GuestKernel, module_load_order
from shared.image.manifest import MANIFEST, SIGNATURE, ImageError, ImageManifest, Part, load_private_key, publisher_id
from shared.image.rootfs import add_busybox, apply_container_tar, make_ext4
from shared.image.verify import file_sha256
from shared.image.vmlinux import extract_vmlinux

__all__ = ["DEFAULT_CMDLINE", "BuildRequest", "build_image", "find_static_busybox"]

DEFAULT_CMDLINE = "console=ttyS0 panic=-1 reboot=t quiet"


@dataclass(frozen=True)
class BuildRequest:
    name: str
    out: Path
    kernel: GuestKernel
    publisher_key: Path
    rootfs_dir: Path | None = None
    rootfs_tar: Path | None = None
    with_busybox: bool = False
    with_vmlinux: bool = False  # also ship the ELF kernel Firecracker and Cloud Hypervisor boot
    cmdline: str = DEFAULT_CMDLINE


def find_static_busybox() -> Path:
    found = shutil.which("busybox")
    if not found:
        raise ImageError("tool_missing", "busybox not found: install busybox-static")
    path = Path(found).resolve()
    head = path.read_bytes()[:8192]
    if not head.startswith(b"\x7fELF") or b"ld-linux" in head:
        raise ImageError("tool_missing", f"{path} is not a static busybox: install busybox-static")
    return path


def build_initramfs(kernel: GuestKernel, busybox: Path, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="qvm-initrd-") as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        init = root / "init"
        init.write_text(resources.files("shared.image").joinpath("guest_init.sh").read_text())
        init.chmod(0o755)
        mods = root / "lib" / "modules"
        mods.mkdir(parents=True)
        names = []
        for path in module_load_order(kernel.modules_dir):
            shutil.copy2(path, mods / path.name)
            names.append(path.name.removesuffix(".ko"))
        (mods / "order").write_text("\n".join(names) + "\n")
        dest.write_bytes(initramfs_from_dir(root))


def build_image(req: BuildRequest) -> ImageManifest:
    if (req.rootfs_dir is None) == (req.rootfs_tar is None):
        raise ImageError("bad_request", "give exactly one of a root directory or a container image tarball")
    key = load_private_key(req.publisher_key)
    busybox = find_static_busybox()
    req.out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(req.kernel.vmlinuz, req.out / "vmlinuz")
    if req.with_vmlinux:
        (req.out / "vmlinux").write_bytes(extract_vmlinux(req.kernel.vmlinuz.read_bytes()))
    build_initramfs(req.kernel, busybox, req.out / "initrd.img")
    with tempfile.TemporaryDirectory(prefix="qvm-rootfs-") as tmp:
        root = Path(tmp) / "root"
        if req.rootfs_dir is not None:
            shutil.copytree(req.rootfs_dir, root, symlinks=True)
        else:
            root.mkdir()
            assert req.rootfs_tar is not None
            apply_container_tar(req.rootfs_tar, root)
        if req.with_busybox:
            add_busybox(root, busybox)
        make_ext4(root, req.out / "rootfs.ext4")

    def part(name: str) -> Part:
        digest, size = file_sha256(req.out / name)
        return Part(file=name, sha256=digest, size=size)

    manifest = ImageManifest(
        name=req.name, created_ns=time.time_ns(), kernel=part("vmlinuz"), initrd=part("initrd.img"),
        rootfs=part("rootfs.ext4"), cmdline=req.cmdline, kernel_release=req.kernel.release,
        vmlinux=part("vmlinux") if req.with_vmlinux else None,
        publisher=publisher_id(key.public_key()),
    )
    raw = manifest.canonical()
    (req.out / MANIFEST).write_bytes(raw)
    (req.out / SIGNATURE).write_bytes(key.sign(raw))
    return manifest
