"""qvm's minimal guest kernel: built once per config from the distribution's kernel source, cached.

The distribution's cloud kernel is a general kernel: hundreds of drivers probed at boot, the guest's own
needs as modules the initramfs loads one by one. A micro VM needs a handful of devices it always has, so
qvm builds its own guest kernel from Debian's `linux-source-<version>` package with the checked-in config
fragment `guest-kernel.config` (everything built in, no modules, no module loading; see its comments).

- Source: `apt-get download linux-source-<version>` (no install; the .deb is kept in the cache), its tarball
  unpacked into a build directory that is removed after the build.
- Config: `make allnoconfig` with the fragment as KCONFIG_ALLCONFIG, so only what the fragment asks for is
  on; then every option the fragment names is checked in the resolved `.config` (an option whose
  dependencies were missing would otherwise silently stay off).
- Reproducible: fixed KBUILD_BUILD_TIMESTAMP/USER/HOST/VERSION, no modules (so no signing key), no debug
  info, source paths mapped away by Kbuild (`-fmacro-prefix-map`): the same fragment, source and compiler
  give the same bytes.
- Cached under `~/.cache/qvm/kernels/qvm-guest-<key>`, keyed by the fragment, the source package's version,
  the compiler's version and this module's recipe: a change to any of them builds anew, nothing else does.
  Builds are atomic (a temporary directory renamed into place) and serialised by a file lock, so parallel
  test workers or two builders on one host build once.

The result is a `GuestKernel` with no modules directory and both boot formats: the bzImage (QEMU, the
confidential VM's direct kernel boot) and the ELF vmlinux (Firecracker, Cloud Hypervisor).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from shared.image.kernel import GuestKernel, cache_dir, download_package, run_tool
from shared.image.manifest import ImageError, KernelBuild

__all__ = ["DEFAULT_SOURCE", "KernelBuild", "build_guest_kernel", "config_fragment", "fragment_options"]

DEFAULT_SOURCE = "linux-source-6.12"
"""Debian 12's newest kernel source (bookworm-security): 6.7+ has configfs-tsm, which a confidential guest
reports through."""

_FAILED = "kernel_build_failed"
_RECIPE = "1"  # bump when the steps below change what is built
_EPOCH = "2024-11-17 00:00:00 UTC"  # KBUILD_BUILD_TIMESTAMP: any fixed date (6.12's release)


def config_fragment() -> str:
    return resources.files("shared.image").joinpath("guest-kernel.config").read_text()


def fragment_options(text: str) -> dict[str, str]:
    """CONFIG_X -> value ("y", "n", a number or a quoted string) for every option line of a fragment."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            options[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            options[line[2:-len(" is not set")]] = "n"
    return options


def _compiler() -> str:
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise ImageError("tool_missing", "gcc not found: install build-essential (it builds the guest kernel)") \
            from None
    return out.splitlines()[0].strip() if out else "gcc"


def _check_tools() -> None:
    missing = [tool for tool, _ in _TOOLS if shutil.which(tool) is None]
    if missing:
        packages = " ".join(pkg for tool, pkg in _TOOLS if tool in missing)
        raise ImageError("tool_missing", f"{', '.join(missing)} not found: install {packages} (they build the "
                                         "guest kernel)")


_TOOLS = (("make", "make"), ("gcc", "build-essential"), ("flex", "flex"), ("bison", "bison"), ("bc", "bc"),
          ("xz", "xz-utils"), ("lz4", "lz4"), ("dpkg-deb", "dpkg"))
# libelf-dev (objtool) and libssl-dev are headers: the build says so itself when one is missing.


def build_guest_kernel(source_package: str = DEFAULT_SOURCE, jobs: int | None = None,
                       cache: Path | None = None) -> tuple[GuestKernel, KernelBuild]:
    """The minimal guest kernel for the checked-in fragment: from the cache, or built now (minutes)."""
    _check_tools()
    fragment = config_fragment()
    root = (cache or cache_dir()) / "kernels"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        deb = download_package(source_package, root)
        version = deb.name.split("_")[1]
        compiler = _compiler()
        key = hashlib.sha256("\0".join((_RECIPE, fragment, source_package, version, compiler)).encode()).hexdigest()
        out = root / f"qvm-guest-{key[:16]}"
        if not (out / "build.json").is_file():
            _build(deb, fragment, out, compiler, f"{source_package} {version}", jobs or os.cpu_count() or 1)
    info = KernelBuild.model_validate_json((out / "build.json").read_text())
    release = (out / "release").read_text().strip()
    return GuestKernel(release, out / "bzImage", None, vmlinux=out / "vmlinux", build=info), info


def _build(deb: Path, fragment: str, out: Path, compiler: str, source: str, jobs: int) -> None:
    work = out.with_name(out.name + ".build")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = time.monotonic()
    try:
        src = _unpack(deb, work)
        obj = work / "obj"
        obj.mkdir()
        frag = work / "guest-kernel.config"
        frag.write_text(fragment)
        env = {**os.environ, "KBUILD_BUILD_TIMESTAMP": _EPOCH, "KBUILD_BUILD_USER": "qvm",
               "KBUILD_BUILD_HOST": "qvm", "KBUILD_BUILD_VERSION": "1", "LC_ALL": "C", "TZ": "UTC",
               "SOURCE_DATE_EPOCH": "1731801600"}
        make = ["make", "-s", "-C", str(src), f"O={obj}", "ARCH=x86_64"]
        run_tool([*make, f"KCONFIG_ALLCONFIG={frag}", "allnoconfig"], "configure the guest kernel", _FAILED, env=env)
        config = (obj / ".config").read_text()
        unmet = unmet_options(fragment_options(fragment), fragment_options(config))
        if unmet:
            raise ImageError("kernel_config_unmet", "the guest kernel config did not take: " + ", ".join(unmet[:12]))
        run_tool([*make, f"-j{jobs}", "bzImage"], "build the guest kernel", _FAILED, env=env)
        release = (obj / "include" / "config" / "kernel.release").read_text().strip()
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copyfile(obj / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
        shutil.copyfile(obj / "vmlinux", tmp / "vmlinux")
        (tmp / "config").write_text(config)
        (tmp / "release").write_text(release + "\n")
        info = KernelBuild(source=source, fragment_sha256=hashlib.sha256(fragment.encode()).hexdigest(),
                           config_sha256=hashlib.sha256(config.encode()).hexdigest(), compiler=compiler,
                           build_s=round(time.monotonic() - started, 1),
                           bzimage_sha256=hashlib.sha256((tmp / "bzImage").read_bytes()).hexdigest())
        (tmp / "build.json").write_text(info.model_dump_json(indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def unmet_options(wanted: dict[str, str], resolved: dict[str, str]) -> list[str]:
    """The fragment's options the resolved config does not have as asked ("n" also matches absent)."""
    return [f"{name}={value} (got {resolved.get(name, 'n')})" for name, value in wanted.items()
            if resolved.get(name, "n") != value]


def _unpack(deb: Path, work: Path) -> Path:
    """The source tree from the package's tarball (/usr/src/<name>.tar.xz)."""
    pkg = work / "pkg"
    run_tool(["dpkg-deb", "-x", str(deb), str(pkg)], f"unpack {deb.name}", _FAILED)
    tarballs = sorted((pkg / "usr" / "src").glob("linux-source-*.tar.xz"))
    if not tarballs:
        raise ImageError("kernel_source_missing", f"{deb.name} holds no /usr/src/linux-source-*.tar.xz")
    run_tool(["tar", "-xJf", str(tarballs[-1]), "-C", str(work), "--no-same-owner"], f"unpack {tarballs[-1].name}",
             _FAILED)
    shutil.rmtree(pkg)
    trees = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("linux-source-")]
    if len(trees) != 1:
        raise ImageError("kernel_source_missing", f"{tarballs[-1].name} did not unpack to one linux-source tree")
    return trees[0]

