"""Compiling the runtime guard on the node: the BPF object (clang, CO-RE against this kernel's BTF) and its
libbpf loader (cc), cached and reproducible.

One object holds the programs of both modes (rules.py `Mode`): the BPF LSM hooks (enforce), the tracepoints
that report the same rules without denying anything (observe), and the process tree tracking both use. The
loader decides at start which it loads and attaches (`--mode`; by default enforce where the kernel runs BPF
LSM programs, else observe), so a node has one guard build and one `digest` whichever mode its kernel allows,
and reports the mode in force beside it (`RuntimeGuard.mode`, `available()`).

Why build on the node rather than ship a binary: the object is compiled against the running kernel's BTF
(`vmlinux.h` from /sys/kernel/btf/vmlinux), and the node already has the toolchain (`make setup` installs
clang, libbpf-dev and bpftool). The build is reproducible (no paths, timestamps or build ids that vary), so
the `digest` a node reports for its guard is the same on every node with the same sources, toolchain and
kernel, and the same sources always give the same object bytes.

The cache is keyed by everything that goes into the bytes (sources, the generated rules header, the compile
flags, the compilers' versions, libbpf's headers and the kernel's BTF): a new kernel or a new clang builds
anew, nothing else does. Builds are atomic (a temporary directory renamed into place) and serialised by a
file lock, so parallel pytest workers or two agents on one host build once.

`verify_only=True` is a check-only object, never a guard: the LSM hook bodies compiled as target-less raw
tracepoint programs, so the verifier can judge them on a kernel that refuses BPF LSM programs (the loader's
verify mode loads every program and attaches none).

`available()` answers which mode the guard runs in here, if any, for `qvm node doctor` and for the security
level a node advertises: kernel BTF, privileges, the toolchain, and finally a real load and attach (a kernel
may list the BPF LSM and still refuse its programs: then it is observe).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from shared.errors import ReasonedError
from shared.guard.rules import MODES, Mode, rules_header, rules_table

__all__ = [
    "BTF_PATH",
    "DEFAULT_CACHE",
    "GuardBuild",
    "GuardError",
    "available",
    "build_guard",
    "kernel_support",
    "loader_argv",
    "loader_failure",
    "parse_ready",
    "probe",
]

SOURCES = Path(__file__).parent / "bpf"
BTF_PATH = Path("/sys/kernel/btf/vmlinux")
LSM_LIST = Path("/sys/kernel/security/lsm")
TRACEFS_EVENTS = (Path("/sys/kernel/tracing/events"), Path("/sys/kernel/debug/tracing/events"))
DEFAULT_CACHE = Path.home() / ".cache" / "qvm" / "guard"
OBJECT_NAME = "guard.bpf.o"
LOADER_NAME = "qvm-guard-loader"
BUILD_TIMEOUT_S = 300.0

# Part of the cache key: a change here is a different build.
_BPF_FLAGS = ("-g", "-O2", "-target", "bpf", "-Wall", "-Werror", "-I.")
_CC_FLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2", "-I.")
_CC_LIBS = ("-lbpf", "-lelf", "-lz")
_LIBBPF_HEADERS = Path("/usr/include/bpf")

# Capability bits (linux/capability.h) a root-less loader would need.
_CAP_SYS_ADMIN, _CAP_MAC_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 33, 38, 39


class GuardError(ReasonedError):
    """The guard cannot be built or run here. Reasons: clang_missing, cc_missing, bpftool_missing,
    libbpf_missing, build_failed, bpf_unavailable, tracing_unavailable, lsm_inactive, lsm_refused,
    not_permitted, load_failed, loader_failed, loader_exited, bad_request."""


@dataclass(frozen=True)
class GuardBuild:
    """A built guard. `digest`: SHA-256 over the BPF object (the programs of both modes), the rules table and
    the loader binary (what actually runs). `verify_only`: the check-only object (see the module doc), which
    the loader runs in verify mode only."""

    object_path: Path
    loader_path: Path
    digest: str
    verify_only: bool = False


# ---- tools ----


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:  # bpftool lives in /usr/sbin, not on every user's PATH
        for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
            if os.access(Path(d) / name, os.X_OK):
                return str(Path(d) / name)
    return found


@cache
def _version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuardError("build_failed", f"{tool} --version: {exc}") from None
    return out.stdout.strip()


def _tools() -> tuple[str, str, str]:
    clang = _which("clang")
    if clang is None:
        raise GuardError("clang_missing", "clang is not installed (apt install clang)")
    cc = _which("gcc") or _which("cc") or clang
    bpftool = _which("bpftool")
    if bpftool is None:
        raise GuardError("bpftool_missing", "bpftool is not installed (apt install bpftool)")
    if not (_LIBBPF_HEADERS / "libbpf.h").is_file():
        raise GuardError("libbpf_missing", f"no {_LIBBPF_HEADERS}/libbpf.h (apt install libbpf-dev)")
    return clang, cc, bpftool


def _target_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "x86", "aarch64": "arm64", "arm64": "arm64", "s390x": "s390", "ppc64le": "powerpc",
            "riscv64": "riscv"}.get(machine, machine)


def _btf_digest() -> str:
    if not BTF_PATH.is_file():
        raise GuardError("bpf_unavailable", f"no kernel BTF at {BTF_PATH} (a kernel with CONFIG_DEBUG_INFO_BTF)")
    return hashlib.sha256(BTF_PATH.read_bytes()).hexdigest()


# ---- the build ----


def _sources() -> dict[str, bytes]:
    try:
        return {name: (SOURCES / name).read_bytes() for name in ("guard.bpf.c", "loader.c")}
    except OSError as exc:
        raise GuardError("build_failed", f"guard sources missing: {exc}") from None


def _bpf_cmd(clang: str, workdir: Path, verify_only: bool) -> list[str]:
    return [clang, *_BPF_FLAGS, f"-D__TARGET_ARCH_{_target_arch()}", *(["-DQVM_VERIFY_ONLY"] if verify_only else []),
            f"-fdebug-prefix-map={workdir}=.", "-c", "guard.bpf.c", "-o", OBJECT_NAME]


def _cc_cmd(cc: str) -> list[str]:
    # -s: no symbol table (it would carry the source file name); gcc without -g embeds no paths.
    return [cc, *_CC_FLAGS, "loader.c", "-o", LOADER_NAME, "-s", *_CC_LIBS]


def _cache_key(clang: str, cc: str, verify_only: bool) -> str:
    h = hashlib.sha256()
    for name, data in sorted(_sources().items()):
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    version_h = _LIBBPF_HEADERS / "libbpf_version.h"
    parts = [rules_header(), rules_table(), " ".join(_bpf_cmd("clang", Path("W"), verify_only)),
             " ".join(_cc_cmd("cc")), _version(clang), _version(cc),
             version_h.read_text() if version_h.is_file() else "", _btf_digest(), platform.machine()]
    for p in parts:
        h.update(f"{len(p)}\0{p}\0".encode())
    return h.hexdigest()[:32]


def _digest(obj: bytes, loader: bytes) -> str:
    h = hashlib.sha256()
    for part in (obj, rules_table().encode(), loader):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], cwd: Path, what: str, stdout: Path | None = None) -> None:
    try:
        if stdout is None:
            out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        else:
            with stdout.open("wb") as f:
                out = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.PIPE, text=True,
                                     timeout=BUILD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuardError("build_failed", f"{what}: {exc}") from None
    if out.returncode != 0:
        err = (out.stderr or "").strip()
        if "bpf/libbpf.h" in err or "cannot find -lbpf" in err or "bpf/bpf_helpers.h" in err:
            raise GuardError("libbpf_missing", f"{what}: libbpf headers or library missing (apt install libbpf-dev)")
        if "cannot find -lelf" in err or "cannot find -lz" in err:
            raise GuardError("libbpf_missing", f"{what}: {err[-300:]} (apt install libelf-dev zlib1g-dev)")
        raise GuardError("build_failed", f"{what} failed (exit {out.returncode}): {err[-2000:]}")


def _compile(workdir: Path, clang: str, cc: str, bpftool: str, verify_only: bool) -> None:
    for name, data in _sources().items():
        (workdir / name).write_bytes(data)
    (workdir / "rules.h").write_text(rules_header())
    _run([bpftool, "btf", "dump", "file", str(BTF_PATH), "format", "c"], workdir, "bpftool btf dump",
         stdout=workdir / "vmlinux.h")
    _run(_bpf_cmd(clang, workdir, verify_only), workdir, "clang (BPF object)")
    _run(_cc_cmd(cc), workdir, "cc (loader)")


def build_guard(cache_dir: Path = DEFAULT_CACHE, *, verify_only: bool = False) -> GuardBuild:
    """The guard for this kernel and these sources (both modes in one object): from the cache, or built once
    into it. `verify_only=True`: the check-only object (see the module doc), with a digest of its own that
    no running guard ever reports."""
    clang, cc, bpftool = _tools()
    key = _cache_key(clang, cc, verify_only) + ("-check" if verify_only else "")
    final = cache_dir / key
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(cache_dir / f"{key}.lock"):
            if not (final / "meta.json").is_file():
                work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
                try:
                    _compile(work, clang, cc, bpftool, verify_only)
                    digest = _digest((work / OBJECT_NAME).read_bytes(), (work / LOADER_NAME).read_bytes())
                    (work / "meta.json").write_text(json.dumps({"digest": digest, "verify_only": verify_only}))
                    work.chmod(0o755)  # mkdtemp's 0700 would hide the build from a non-root doctor
                    if final.exists():  # a half-written leftover without meta.json
                        shutil.rmtree(final)
                    work.rename(final)
                finally:
                    if work.exists():
                        shutil.rmtree(work, ignore_errors=True)
            meta = json.loads((final / "meta.json").read_text())
    except OSError as exc:
        raise GuardError("build_failed", f"guard cache {cache_dir}: {exc}") from None
    except ValueError as exc:
        raise GuardError("build_failed", f"guard cache {final}: bad meta.json: {exc}") from None
    return GuardBuild(final / OBJECT_NAME, final / LOADER_NAME, str(meta["digest"]), verify_only)


def loader_argv(build: GuardBuild, mode: Mode | Literal["verify"] | None) -> list[str]:
    """The loader's command line: `mode` None lets it choose (enforce where BPF LSM runs, else observe)."""
    return [str(build.loader_path), "--mode", mode or "auto", str(build.object_path)]


# ---- can it run here? ----


def _cap_effective() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def _lsm_active() -> list[str]:
    try:
        return LSM_LIST.read_text().strip().split(",")
    except OSError:
        cmdline = Path("/proc/cmdline").read_text() if Path("/proc/cmdline").exists() else ""
        for word in cmdline.split():
            if word.startswith("lsm="):
                return word[4:].split(",")
    raise GuardError("lsm_inactive", f"cannot read {LSM_LIST} (mount securityfs: mount -t securityfs securityfs "
                     "/sys/kernel/security) and no lsm= on the kernel command line")


def kernel_support(mode: Mode = "enforce") -> None:
    """The checks that need no build, for `mode`: kernel BTF and privileges; for enforce, the BPF LSM in the
    active list; for observe, tracefs (the tracepoints' ids). Raises GuardError (bpf_unavailable,
    lsm_inactive, tracing_unavailable, not_permitted)."""
    if mode not in MODES:
        raise GuardError("bad_request", f"no guard mode {mode!r} (one of {', '.join(MODES)})")
    if not BTF_PATH.is_file():
        raise GuardError("bpf_unavailable", f"no kernel BTF at {BTF_PATH} (needs CONFIG_DEBUG_INFO_BTF)")
    if mode == "enforce":
        lsms = _lsm_active()
        if "bpf" not in lsms:
            raise GuardError("lsm_inactive", f"the BPF LSM is not active (active: {','.join(lsms)}); add bpf to "
                             "the kernel's lsm= boot parameter")
    elif not any(p.is_dir() for p in TRACEFS_EVENTS):
        raise GuardError("tracing_unavailable", "tracefs is not mounted (mount -t tracefs tracefs "
                         "/sys/kernel/tracing)")
    caps = _cap_effective()
    needed = (_CAP_BPF, _CAP_PERFMON, _CAP_SYS_ADMIN) + ((_CAP_MAC_ADMIN,) if mode == "enforce" else ())
    if not all(caps >> c & 1 for c in needed):
        raise GuardError("not_permitted", f"running the guard in {mode} mode needs root (CAP_BPF, CAP_PERFMON, "
                         f"CAP_SYS_ADMIN{', CAP_MAC_ADMIN' if mode == 'enforce' else ''})")


def loader_failure(stderr: str, returncode: int | None) -> GuardError:
    """The loader's one-line JSON error as a GuardError (its reason when it is one we know)."""
    for line in reversed(stderr.strip().splitlines()):
        try:
            err = json.loads(line)
        except ValueError:
            continue
        if isinstance(err, dict) and isinstance(err.get("error"), str):
            reason = err.get("reason")
            detail = err["error"]
            for k in ("prog", "libbpf", "verifier_log"):
                if isinstance(err.get(k), str):
                    detail += f"; {k}: {err[k][-1500:]}"
            if reason == "lsm_refused":
                return GuardError("lsm_refused", detail + " (the kernel lists the BPF LSM but refuses its "
                                  "programs as root: kernel lockdown or no BPF trampolines)")
            if reason in ("lsm_inactive", "load_failed", "bad_request"):
                return GuardError(reason, detail)
            return GuardError("loader_failed", detail)
    return GuardError("loader_failed", f"loader exited {returncode}: {stderr.strip()[-500:] or 'no output'}")


def parse_ready(line: str) -> dict[str, object] | None:
    """The loader's ready line, or None if `line` is not one."""
    try:
        ready = json.loads(line) if line else None
    except ValueError:
        return None
    if not isinstance(ready, dict) or ready.get("ready") is not True:
        return None
    return ready


def probe(build: GuardBuild, mode: Mode | None = None, timeout_s: float = 60.0) -> tuple[Mode, str]:
    """Load and attach the programs of `mode` (None: what the loader picks) once (with nothing watched they
    decide nothing) and detach: proof the kernel runs them. Returns the mode in force and, where the loader
    fell back from enforce to observe, why. Raises GuardError (lsm_inactive, lsm_refused, load_failed,
    loader_failed)."""
    try:
        out = subprocess.run(loader_argv(build, mode), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuardError("loader_failed", f"running the loader: {exc}") from None
    ready = parse_ready(out.stdout.splitlines()[0] if out.stdout else "")
    if out.returncode != 0 or ready is None:
        raise loader_failure(out.stderr, out.returncode)
    running = ready.get("mode")
    if running not in MODES:
        raise GuardError("loader_failed", f"the loader runs in an unknown mode {running!r}")
    fallback = ready.get("fallback")
    return ("enforce" if running == "enforce" else "observe"), fallback if isinstance(fallback, str) else ""


def available(cache_dir: Path = DEFAULT_CACHE) -> tuple[Mode | None, str]:
    """The mode the runtime guard runs in on this host (enforce where BPF LSM programs attach, observe where
    only tracepoints do), or None where it cannot run; and in a sentence why."""
    try:
        kernel_support("observe")
        build = build_guard(cache_dir)
        mode, fallback = probe(build)
    except GuardError as exc:
        return None, f"{exc.reason}: {exc.detail}"
    if mode == "enforce":
        return "enforce", f"BPF LSM guard loads and attaches (build {build.digest[:16]}): the rules deny and report"
    return "observe", (f"observe only (build {build.digest[:16]}): BPF LSM unavailable ({fallback or 'not chosen'}); "
                       "the tracepoints attach: every rule is reported, nothing is denied")
