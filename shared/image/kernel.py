"""The guest kernel: the distribution's own kernel package, fetched with the package manager and cached.

Debian's `linux-image-cloud-amd64` (Ubuntu: `linux-image-kvm`) is a small kernel for virtual machines.
`apt-get download` fetches the real package its meta-package depends on; `dpkg-deb -x` unpacks it
into the cache. Only the modules the guest needs are taken into the initramfs, with the modules they
depend on (read from each module's `.modinfo`), in load order.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shared.image.manifest import ImageError, KernelBuild

__all__ = ["GUEST_MODULES", "GuestKernel", "cache_dir", "download_package", "fetch_kernel", "module_load_order",
           "run_tool"]

GUEST_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "overlay", "virtio_net",
                 "dm-mod", "dm-crypt", "xts", "ecb", "aesni-intel", "af_alg", "algif_skcipher",
                 "virtio_pci", "tsm", "sev-guest", "tdx-guest")
"""virtio-mmio transport (microvm, Firecracker, Cloud Hypervisor), disks, the host channel, the RW layer,
the (isolated) network device; then the encrypted data volume opened inside the guest: device-mapper and
dm-crypt, the aes-xts-plain64 pieces (the xts and ecb templates, AES-NI with its crypto_simd and cryptd
dependencies, which TCG's `-cpu max` also implements), and the kernel crypto user API (AF_ALG skcipher),
through which cryptsetup encrypts its keyslot area without a temporary dm-crypt device. Last, what a
confidential guest needs: virtio over PCI (q35), and configfs-tsm (`tsm`, kernel 6.7+) with the SEV-SNP and
TDX guest drivers under it for its hardware report (each refuses to load outside its kind of guest; a kernel
without them, like Debian 12's 6.1, skips them, and cannot report as a confidential guest)."""

_DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


@dataclass(frozen=True)
class GuestKernel:
    release: str
    vmlinuz: Path  # the bzImage
    modules_dir: Path | None  # lib/modules/<release>; None: everything built in (qvm's minimal kernel)
    vmlinux: Path | None = None  # the ELF image, where the build has it (else extracted from vmlinuz)
    build: KernelBuild | None = None  # qvm's minimal kernel: how it was built


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qvm"


def fetch_kernel(package: str = "linux-image-cloud-amd64", deb: Path | None = None) -> GuestKernel:
    """The kernel from `deb`, or from `package` (downloaded once into the cache)."""
    cache = cache_dir() / "kernels"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch at a time (parallel builds, parallel tests)
        if deb is None:
            deb = download_package(package, cache)
        unpacked = cache / deb.stem
        if not unpacked.is_dir():
            tmp = cache / (deb.stem + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            run_tool(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpack {deb.name}")
            tmp.rename(unpacked)
    images = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not images:
        raise ImageError("kernel_missing", f"{deb.name} holds no /boot/vmlinuz-*")
    release = images[-1].name.removeprefix("vmlinuz-")
    return GuestKernel(release, images[-1], unpacked / "lib" / "modules" / release)


def download_package(package: str, cache: Path) -> Path:
    """The .deb of `package` (a meta-package's first real dependency) in `cache`, downloaded once."""
    real = package
    depends = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True)
    for line in depends.stdout.splitlines():
        line = line.strip()
        if line.startswith(("Depends: linux-image-", "Depends: linux-source-")):
            real = line.split()[1]
            break
    existing = sorted(cache.glob(f"{real}_*.deb"))
    if existing:
        return existing[-1]
    try:
        run_tool(["apt-get", "download", real], f"download {real}", cwd=cache)
    except ImageError:
        # A fresh machine may have no package lists yet: refresh them once, then try again.
        run_tool(["apt-get", "update", "-qq"], "refresh the package lists")
        run_tool(["apt-get", "download", real], f"download {real}", cwd=cache)
    found = sorted(cache.glob(f"{real}_*.deb"))
    if not found:
        raise ImageError("kernel_missing", f"apt-get download {real} produced no .deb")
    return found[-1]


def run_tool(argv: list[str], what: str, reason: str = "kernel_fetch_failed", cwd: Path | None = None,
             env: dict[str, str] | None = None) -> None:
    """Run a build or fetch step; an `ImageError` (`tool_missing`, or `reason` with the tail of its output)
    when it cannot run or fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env)
    except FileNotFoundError:
        raise ImageError("tool_missing", f"{argv[0]} not found (needed to {what})") from None
    if proc.returncode != 0:
        raise ImageError(reason, f"{what}: {(proc.stderr or proc.stdout).strip()[-800:]}")


def module_load_order(modules_dir: Path, wanted: tuple[str, ...] = GUEST_MODULES) -> list[Path]:
    """Module files for `wanted` and their dependencies, each after what it depends on.

    Modules built into the kernel have no file and are skipped.
    """
    index = {p.name.split(".ko")[0].replace("-", "_"): p for p in modules_dir.rglob("*.ko*")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        path = index.get(key)
        if path is None:
            return  # built in
        if path.suffix != ".ko":
            raise ImageError("unsupported_module", f"{path.name}: compressed modules are not supported yet")
        match = _DEPENDS.search(path.read_bytes())
        for dep in (match.group(1).decode().split(",") if match and match.group(1) else []):
            visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order
