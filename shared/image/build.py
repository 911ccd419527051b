"""`qvm image build`: kernel + initramfs (busybox-static, qvm's guest init, the needed modules, and the
host's `cryptsetup` and `mke2fs` with their shared libraries) + rootfs, then a manifest of their digests,
signed by the publisher's key. The kernel is qvm's minimal guest kernel by default (kernel_build.py,
everything built in: no modules in the initramfs), or the distribution's cloud kernel (`flavor="cloud"`).

The encrypted data volume is formatted and opened inside the guest (the host never sees its plaintext),
so the initramfs carries the build host's own cryptsetup (Debian `cryptsetup-bin`) and mke2fs (`e2fsprogs`,
busybox's mke2fs makes no ext4): each binary at its path, every library `ldd` lists and the dynamic loader
at the paths `ldd` names, so the guest resolves them exactly as the host does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from shared.image.cpio import initramfs_from_dir
from shared.image.kernel import GuestKernel, fetch_kernel, module_load_order
from shared.image.kernel_build import build_guest_kernel
from shared.image.manifest import MANIFEST, SIGNATURE, ImageError, ImageManifest, Part, load_private_key, publisher_id
from shared.image.rootfs import add_busybox, apply_container_tar, make_ext4
from shared.image.verify import file_sha256
from shared.image.vmlinux import extract_vmlinux

__all__ = ["DEFAULT_CMDLINE", "GUEST_TOOLS", "KERNEL_FLAVORS", "BuildRequest", "add_host_tools", "build_image",
           "find_host_tool", "find_static_busybox", "guest_kernel", "shared_libraries"]

DEFAULT_CMDLINE = "console=ttyS0 panic=-1 reboot=t quiet"

KERNEL_FLAVORS = ("minimal", "cloud")
"""`minimal`: qvm's own guest kernel (kernel_build.py: everything built in, no modules, lockdown; built once,
cached). `cloud`: the distribution's cloud kernel package with the guest's modules in the initramfs."""


def guest_kernel(flavor: str = "minimal") -> GuestKernel:
    """The guest kernel of a flavor (see KERNEL_FLAVORS): built or fetched once, then from the cache."""
    if flavor == "minimal":
        return build_guest_kernel()[0]
    if flavor == "cloud":
        return fetch_kernel()
    raise ImageError("bad_request", f"unknown kernel flavor {flavor!r} (one of {', '.join(KERNEL_FLAVORS)})")


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


GUEST_TOOLS = (("cryptsetup", "cryptsetup-bin"), ("mke2fs", "e2fsprogs"), ("dmsetup", "dmsetup"))
"""Host binaries the guest init needs (name, Debian package): LUKS2 and ext4 on the data volume, the scratch
disk's plain dm-crypt mapping."""

_SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_host_tool(name: str, package: str) -> Path:
    """The host's `name` (also looked for in the sbin directories a non-root PATH lacks)."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":" + _SBIN)
    if not found:
        raise ImageError("tool_missing", f"{name} not found: install {package} (the guest formats and opens its "
                                         "encrypted volume with it)")
    return Path(found)


def shared_libraries(binary: Path) -> list[Path]:
    """Every shared library `ldd` lists for `binary`, and the dynamic loader, as the paths ldd names them."""
    try:
        proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    except FileNotFoundError:
        raise ImageError("tool_missing", "ldd not found: install libc-bin") from None
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            return []  # static: nothing to carry
        raise ImageError("tool_missing", f"ldd {binary}: {proc.stderr.strip()[:300]}")
    libs: list[Path] = []
    for line in proc.stdout.splitlines():
        name, arrow, target = line.strip().partition("=>")
        where = (target if arrow else name).strip()
        if where.startswith("not found"):
            raise ImageError("tool_missing", f"{binary}: library {name.strip()} not found on this host")
        where = where.split(" (", 1)[0].strip()
        if where.startswith("/"):  # skips linux-vdso.so.1, which the kernel provides
            libs.append(Path(where))
    return libs


def add_host_tools(root: Path, tools: tuple[tuple[str, str], ...] = GUEST_TOOLS) -> list[str]:
    """Copy each tool and its libraries into the initramfs tree `root`, at the host's paths; returns those
    paths. Symlinks (libfoo.so.1 -> libfoo.so.1.2.3) are copied as the file they point to."""
    carried: list[str] = []
    for name, package in tools:
        binary = find_host_tool(name, package)
        for path in (binary, *shared_libraries(binary)):
            dest = root / path.relative_to(path.anchor)
            if dest.exists():
                continue  # a library two tools share
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path.resolve(), dest)
            dest.chmod(0o755)
            carried.append(str(path))
        if name == "mke2fs":
            link = root / binary.parent.relative_to(binary.anchor) / "mkfs.ext4"  # mke2fs picks ext4 by name
            link.symlink_to("mke2fs")
            conf = Path("/etc/mke2fs.conf")  # the host's ext4 defaults (mke2fs has built-in ones without it)
            if conf.is_file():
                (root / "etc").mkdir(exist_ok=True)
                shutil.copyfile(conf, root / "etc" / "mke2fs.conf")
    return carried


def build_initramfs(kernel: GuestKernel, busybox: Path, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="qvm-initrd-") as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        init = root / "init"
        init.write_text(resources.files("shared.image").joinpath("guest_init.sh").read_text())
        init.chmod(0o755)
        add_host_tools(root)
        (root / "run" / "cryptsetup").mkdir(parents=True)  # cryptsetup's lock directory
        if kernel.modules_dir is not None:  # a distribution kernel: the guest's modules, in load order
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
    if req.with_vmlinux and req.kernel.vmlinux is not None:
        shutil.copyfile(req.kernel.vmlinux, req.out / "vmlinux")
    elif req.with_vmlinux:
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
        vmlinux=part("vmlinux") if req.with_vmlinux else None, kernel_build=req.kernel.build,
        publisher=publisher_id(key.public_key()),
    )
    raw = manifest.canonical()
    (req.out / MANIFEST).write_bytes(raw)
    (req.out / SIGNATURE).write_bytes(key.sign(raw))
    return manifest
