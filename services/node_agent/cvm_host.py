"""Can this host run confidential VMs? AMD SEV-SNP and Intel TDX capability, read from the machine itself.

A kind counts as capable only when every layer agrees, because each one alone is a common half-configured state
(the BIOS option on but the kernel too old, the kernel ready but QEMU without the object, ...):

    piece      SEV-SNP                                          TDX
    cpu        `sev_snp` in /proc/cpuinfo flags                 `tdx_host_platform` in /proc/cpuinfo flags
    kernel     /sys/module/kvm_amd/parameters/sev_snp = Y       /sys/module/kvm_intel/parameters/tdx = Y
               (Linux >= 6.11 with the RMP set up)              (Linux >= 6.16 with the TDX module initialised)
    device     /dev/sev (the PSP, ccp driver) and /dev/kvm      /dev/kvm (TDX has no device of its own)
    firmware   OVMF.amdsev.fd: the AmdSev build, the only one   OVMF.inteltdx.fd (TDVF)
               with the SEV hashes table kernel-hashes needs
    qemu       the `sev-snp-guest` object (QEMU >= 9.1)         the `tdx-guest` object (QEMU >= 10.1)

QEMU is asked once (`qemu-system-x86_64 -object help`, which lists only the object types the binary was built
with); the runner is injectable so tests, and the doctor's `Probes`, never start a real QEMU.

Informational, never gating: the CPU microcode (`/sys/devices/system/cpu/cpu0/microcode/version`; the SNP
report's TCB carries it too, and the verifier is the one that judges it) and, for SEV-SNP, the C-bit position
QEMU must be told (CPUID 0x8000001F EBX[5:0], read through the cpuid driver's /dev/cpu/0/cpuid). Linux does not
put the SEV firmware version in sysfs (the ccp driver logs it at boot, `SEV-SNP API:<major>.<minor> build:<n>`,
and `snphost show version` asks /dev/sev for it); the report's TCB is what attests it. Intel-downstream kernels
also have /sys/firmware/tdx/tdx_module/status: read when present, shown, never required (upstream lacks it).

`root` is `/` on hosts and a fixture tree in tests, as in `inventory.HostReader` and `doctor.HostRoot`.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.tpm.digests import QEMU

__all__ = ["KINDS", "OVMF_CANDIDATES", "QEMU_OBJECTS", "CvmHost", "Kind", "KindSupport", "Piece", "Runner",
           "detect", "find_ovmf", "qemu_objects", "snp_cbit"]

Kind = Literal["sev-snp", "tdx"]
KINDS: tuple[Kind, ...] = ("sev-snp", "tdx")

Runner = Callable[[Sequence[str]], tuple[int, str] | None]
"""(exit status, stdout) of a command, or None when it could not run: the doctor's `Probes.run` contract."""

OVMF_CANDIDATES: dict[Kind, tuple[str, ...]] = {
    # Debian puts edk2's builds in /usr/share/OVMF, Ubuntu in /usr/share/ovmf, Fedora in /usr/share/edk2/ovmf.
    "sev-snp": ("/usr/share/ovmf/OVMF.amdsev.fd", "/usr/share/OVMF/OVMF.amdsev.fd",
                "/usr/share/edk2/ovmf/OVMF.amdsev.fd"),
    "tdx": ("/usr/share/ovmf/OVMF.inteltdx.fd", "/usr/share/OVMF/OVMF.inteltdx.fd", "/usr/share/ovmf/OVMF.tdx.fd",
            "/usr/share/edk2/ovmf/OVMF.inteltdx.fd"),
}
QEMU_OBJECTS: dict[Kind, str] = {"sev-snp": "sev-snp-guest", "tdx": "tdx-guest"}
_CPU_FLAG: dict[Kind, str] = {"sev-snp": "sev_snp", "tdx": "tdx_host_platform"}
_KVM_PARAM: dict[Kind, str] = {"sev-snp": "sys/module/kvm_amd/parameters/sev_snp",
                               "tdx": "sys/module/kvm_intel/parameters/tdx"}
_QEMU_MIN: dict[Kind, str] = {"sev-snp": "9.1", "tdx": "10.1"}
_SEV_LEAF = 0x8000001F  # AMD memory-encryption leaf: EBX[5:0] C-bit position, EBX[11:6] physical address bits lost
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Piece:
    """One layer's answer: `found` says what was seen (or is missing, and where); `hint` how to fix it."""

    name: Literal["cpu", "kernel", "device", "firmware", "qemu"]
    ok: bool
    found: str
    hint: str = ""


@dataclass(frozen=True)
class KindSupport:
    kind: Kind
    pieces: tuple[Piece, ...]
    ovmf: Path | None  # the firmware that will be booted (host path), when one was found

    @property
    def capable(self) -> bool:
        return all(p.ok for p in self.pieces)

    @property
    def missing(self) -> tuple[Piece, ...]:
        return tuple(p for p in self.pieces if not p.ok)

    def piece(self, name: str) -> Piece:
        return next(p for p in self.pieces if p.name == name)


@dataclass(frozen=True)
class CvmHost:
    kinds: tuple[KindSupport, ...]
    microcode: str | None = None  # cpu0's microcode revision, as the kernel shows it (e.g. 0xa0011d5)
    snp_cbitpos: int | None = None  # from CPUID 0x8000001F; None where the cpuid driver is absent or SEV is off
    tdx_module: str | None = None  # /sys/firmware/tdx/tdx_module/status on kernels that have it

    def support(self, kind: Kind) -> KindSupport:
        return next(k for k in self.kinds if k.kind == kind)

    def features(self) -> tuple[str, ...]:
        """The capable kinds, in `KINDS` order: what `Inventory.confidential` reports to the scheduler."""
        return tuple(k.kind for k in self.kinds if k.capable)

    def explain(self) -> dict[str, str]:
        """Per kind, one line: what makes it capable, or every piece that is missing (for `qvm node doctor`)."""
        return {k.kind: _explain(k) for k in self.kinds}


def _explain(k: KindSupport) -> str:
    if k.capable:
        return "capable: " + "; ".join(p.found for p in k.pieces)
    return "missing: " + "; ".join(f"{p.name}: {p.found}" for p in k.missing)


# ------------------------------------------------------------------------------------------- host reads
def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(errors="replace").strip()
    except OSError:
        return None


def _cpu_flags(root: Path) -> set[str]:
    flags: set[str] = set()
    for line in (_read(root, "proc/cpuinfo") or "").splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return flags


def find_ovmf(kind: Kind, root: Path = Path("/")) -> Path | None:
    """The first installed firmware build for `kind`, as a host path (not prefixed by `root`)."""
    return next((Path(c) for c in OVMF_CANDIDATES[kind] if (root / c.lstrip("/")).is_file()), None)


def snp_cbit(root: Path = Path("/")) -> tuple[int, int] | None:
    """(C-bit position, reduced physical address bits) from CPUID 0x8000001F EBX, through the cpuid driver
    (`modprobe cpuid`; the file offset selects the leaf). QEMU refuses an SNP guest whose `cbitpos` is not the
    host's. None when the device is missing or unreadable (not root), or the leaf reports no C-bit."""
    try:
        fd = os.open(root / "dev/cpu/0/cpuid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(fd, 16, _SEV_LEAF)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) != 16:
        return None
    ebx = struct.unpack("<4I", raw)[1]
    cbit, reduced = ebx & 0x3F, (ebx >> 6) & 0x3F
    return (cbit, reduced) if cbit else None


def _run(argv: Sequence[str]) -> tuple[int, str] | None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.returncode, done.stdout


_objects_cache: dict[str, frozenset[str]] = {}


def _cached_objects(qemu: str) -> frozenset[str] | None:
    """Only answers are kept: a QEMU that did not run (not installed yet, a probe that timed out under load)
    is asked again next time."""
    if qemu not in _objects_cache:
        found = _parse_objects(_run([qemu, "-object", "help"]))
        if found is None:
            return None
        _objects_cache[qemu] = found
    return _objects_cache[qemu]


def _parse_objects(answer: tuple[int, str] | None) -> frozenset[str] | None:
    if answer is None or answer[0] != 0:
        return None
    return frozenset(line.strip() for line in answer[1].splitlines()[1:] if line.strip())


def qemu_objects(qemu: str = QEMU, run: Runner | None = None) -> frozenset[str] | None:
    """The object types `qemu` can create (`-object help`), or None when it does not run. With the default
    runner an answer is cached per binary for the life of the process (the inventory is read on every
    heartbeat; upgrading QEMU means restarting the agent, which re-measures the binary anyway)."""
    return _cached_objects(qemu) if run is None else _parse_objects(run([qemu, "-object", "help"]))


# ------------------------------------------------------------------------------------------- the pieces
def _cpu_piece(kind: Kind, flags: set[str]) -> Piece:
    flag = _CPU_FLAG[kind]
    if flag in flags:
        return Piece("cpu", True, f"CPU flag {flag}")
    hint = ("an AMD EPYC (Milan or later) with SEV-SNP enabled in the firmware (SEV-SNP, SNP memory coverage, "
            "IOMMU on)") if kind == "sev-snp" else \
        "an Intel Xeon (4th gen or later) with TDX enabled in the firmware (TME-MT, TDX, SEAM loader)"
    return Piece("cpu", False, f"no {flag} in /proc/cpuinfo flags", hint)


def _kernel_piece(kind: Kind, root: Path) -> Piece:
    rel = _KVM_PARAM[kind]
    value = _read(root, rel)
    if value in ("Y", "1"):
        return Piece("kernel", True, f"/{rel} = {value}")
    module, option, linux = ("kvm_amd", "sev_snp", "6.11") if kind == "sev-snp" else ("kvm_intel", "tdx", "6.16")
    found = f"/{rel} is {value}" if value is not None else f"no /{rel}"
    return Piece("kernel", False, found, f"a host kernel >= {linux} with {module}.{option}=1 (modprobe options or "
                                         f"the kernel command line); dmesg shows why it stayed off")


def _device_piece(kind: Kind, root: Path) -> Piece:
    need = ("dev/sev", "dev/kvm") if kind == "sev-snp" else ("dev/kvm",)
    absent = [f"/{rel}" for rel in need if not (root / rel).exists()]
    if not absent:
        return Piece("device", True, " and ".join(f"/{rel}" for rel in need))
    hint = "load ccp (the AMD Secure Processor driver) and kvm_amd" if kind == "sev-snp" else "load kvm_intel"
    return Piece("device", False, "no " + ", ".join(absent), hint)


def _firmware_piece(kind: Kind, ovmf: Path | None) -> Piece:
    if ovmf is not None:
        return Piece("firmware", True, str(ovmf))
    names = ", ".join(OVMF_CANDIDATES[kind])
    hint = "apt install ovmf (Ubuntu >= 23.04 / Debian >= 13 ship OVMF.amdsev.fd)" if kind == "sev-snp" else \
        "apt install ovmf-inteltdx (Ubuntu 24.04), or build OvmfPkg/IntelTdx/IntelTdxX64.dsc"
    return Piece("firmware", False, f"none of {names}", hint)


def _qemu_piece(kind: Kind, objects: frozenset[str] | None, qemu: str) -> Piece:
    obj = QEMU_OBJECTS[kind]
    if objects is None:
        return Piece("qemu", False, f"{qemu} -object help did not answer", "apt install qemu-system-x86")
    if obj in objects:
        return Piece("qemu", True, f"{qemu} has {obj}")
    return Piece("qemu", False, f"{qemu} has no {obj} object",
                 f"QEMU >= {_QEMU_MIN[kind]} built with {'SEV' if kind == 'sev-snp' else 'TDX'} support")


def _kind(kind: Kind, root: Path, flags: set[str], objects: frozenset[str] | None, qemu: str) -> KindSupport:
    ovmf = find_ovmf(kind, root)
    pieces = (_cpu_piece(kind, flags), _kernel_piece(kind, root), _device_piece(kind, root),
              _firmware_piece(kind, ovmf), _qemu_piece(kind, objects, qemu))
    return KindSupport(kind, pieces, ovmf)


def detect(root: Path = Path("/"), run: Runner | None = None, qemu: str = QEMU) -> CvmHost:
    """Everything above, read under `root`; `run` answers `qemu -object help` (None: really run it, once)."""
    flags = _cpu_flags(root)
    objects = qemu_objects(qemu, run)
    cbit = snp_cbit(root)
    return CvmHost(
        kinds=tuple(_kind(kind, root, flags, objects, qemu) for kind in KINDS),
        microcode=_read(root, "sys/devices/system/cpu/cpu0/microcode/version"),
        snp_cbitpos=cbit[0] if cbit else None,
        tdx_module=_read(root, "sys/firmware/tdx/tdx_module/status"),
    )
