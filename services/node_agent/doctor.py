"""`qvm node doctor`: everything a host needs before it can run qvm jobs, checked on the machine itself.

    python -m services.node_agent.doctor [--root R] [--state-dir D] [--json]

(`qvm node doctor` runs this module in a subprocess: the CLI in `shared/` never imports a service.) Each
check gives a status (`ok`, `warn`, `fail`), what it found, and for anything not ok a hint on how to fix it.
`hard` marks a requirement: only hard checks fail, and any failed one makes the exit code 1 (else 0);
`warn` is something that works but slower or with less (TCG instead of KVM, cgroup v1, no NVIDIA driver on
a CPU-only host, no EK certificate). The node-agent runs the same checks when it starts (`gate`), refusing
to start on a failed hard check when `QVM_NODE_DOCTOR=enforce`, logging them when `warn` (the default).

Every file read goes through one `HostRoot` (`/` on hosts, a fixture tree in tests), and every live probe
that is not a file read (effective uid, PATH lookups, commands, the KVM ioctl, NVML, the TPM, free disk)
through one `Probes` object, so tests run the doctor on fixture trees with fake probes. GPU isolation is the
node-agent's own VFIO check (`isolation.vfio.check_isolation`) over the same root.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from services.node_agent import cvm_host
from services.node_agent.isolation.vfio import PciDevice, Sysfs, VfioError, check_isolation
from services.node_agent.settings import NodeAgentSettings
from shared.errors import ConfigError
from shared.models import GpuInfo
from shared.telemetry import get_logger

__all__ = ["Check", "HostProbes", "HostRoot", "Probes", "gate", "main", "render", "run_checks"]

log = get_logger("qvm.node_agent.doctor")

Status = Literal["ok", "warn", "fail"]
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO=0xAE, 0x00)
KVM_API_VERSION = 12  # the only version Linux has ever reported
EK_CERT_INDICES = (0x01C00002, 0x01C0000A)  # TCG EK Credential Profile: RSA-2048, ECC P-256 EK certificates
MIN_FREE_BYTES = 20 * 1024**3
PROBE_TIMEOUT_S = 5.0
IOMMU_HINT = ("enable VT-d / AMD-Vi (IOMMU) in the firmware, add `intel_iommu=on iommu=pt` (Intel) or "
              "`amd_iommu=on iommu=pt` (AMD) to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub, reboot")


@dataclass(frozen=True)
class Check:
    """One line of the report. `hard`: a requirement (its failure makes the exit code 1)."""

    name: str
    status: Status
    hard: bool
    found: str
    hint: str = ""


@dataclass(frozen=True)
class HostRoot:
    """The one root every file the doctor reads lives under: `/` on hosts, a fixture tree in tests."""

    path: Path = Path("/")

    def file(self, host_path: str | Path) -> Path:
        return self.path / str(host_path).lstrip("/")

    def read(self, host_path: str) -> str | None:
        """The file's text, stripped; None when it is not there or unreadable."""
        try:
            return self.file(host_path).read_text(errors="replace").strip()
        except OSError:
            return None

    def sysfs(self) -> Sysfs:
        return Sysfs(self.path)


class Probes:
    """What the doctor learns from the live machine rather than from files. Tests subclass it."""

    def euid(self) -> int:
        return os.geteuid()

    def which(self, name: str) -> str | None:
        return shutil.which(name)

    def run(self, argv: Sequence[str]) -> tuple[int, str] | None:
        """(exit status, stdout) of a command; None when it is not installed or does not answer in time."""
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.returncode, done.stdout.strip()

    def kvm_api_version(self, dev: Path) -> int | str:
        """KVM_GET_API_VERSION on `dev`: the version, or why it could not be asked."""
        try:
            fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            return f"cannot open {dev}: {exc.strerror or exc}"
        try:
            return fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as exc:
            return f"KVM_GET_API_VERSION on {dev} failed: {exc.strerror or exc}"
        finally:
            os.close(fd)

    def runtime_guard(self) -> tuple[str | None, str]:
        """The eBPF runtime guard's mode on this host (enforce / observe / None) and why: built and really
        loaded once (a kernel can list the BPF LSM and still refuse its programs)."""
        from shared.guard import available

        return available()

    def gpus(self) -> tuple[GpuInfo, ...]:
        from services.node_agent.gpu.nvml import nvml_gpus

        return nvml_gpus()

    def ek_certificate(self, dev: Path) -> bool | None:
        """Whether the TPM at `dev` holds an EK certificate in NV; None: not checked (no TPM stack, not a
        character device, or no answer within the timeout: the doctor never hangs on a TPM)."""
        try:
            if not stat.S_ISCHR(dev.stat().st_mode):
                return None
        except OSError:
            return None
        found: list[bool] = []

        def probe() -> None:
            try:
                from shared.tpm.device import TpmDevice

                tpm = TpmDevice(f"device:{dev}")
            except Exception:  # no tpm2-pytss, or the device would not open: not checked
                return
            try:
                present = False
                for index in EK_CERT_INDICES:
                    try:
                        tpm.esapi.tr_from_tpmpublic(index)
                        present = True
                    except Exception:  # TSS2_Exception: no such NV index
                        continue
                found.append(present)
            finally:
                tpm.esapi.close()

        worker = threading.Thread(target=probe, name="doctor-tpm", daemon=True)
        worker.start()
        worker.join(PROBE_TIMEOUT_S)
        return found[0] if found else None

    def free_bytes(self, path: Path) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize


class HostProbes(Probes):
    """The production probes (the base class's behaviour, named for callers)."""


# ---------------------------------------------------------------------------------------------- checks
def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def check_os(root: HostRoot) -> list[Check]:
    fields: dict[str, str] = {}
    for line in (root.read("/etc/os-release") or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip('"')
    distro, version = fields.get("ID", "unknown"), fields.get("VERSION_ID", "")
    name = fields.get("PRETTY_NAME") or f"{distro} {version}".strip()
    minimum = {"ubuntu": (22, 4), "debian": (12,)}.get(distro)
    os_ok = minimum is not None and _version(version) >= minimum
    release = root.read("/proc/sys/kernel/osrelease") or ""
    kernel_ok = _version(release) >= (5, 15)
    return [
        Check("os", "ok" if os_ok else "warn", False, name or "no /etc/os-release",
              "" if os_ok else "qvm is tested on Ubuntu >= 22.04 and Debian >= 12; other systems may work"),
        Check("kernel", "ok" if kernel_ok else "warn", False, release or "unknown",
              "" if kernel_ok else "use a kernel >= 5.15 (Ubuntu 22.04's GA kernel or newer)"),
    ]


def check_root(probes: Probes) -> Check:
    uid = probes.euid()
    if uid == 0:
        return Check("root", "ok", True, "running as root")
    return Check("root", "fail", True, f"running as uid {uid}",
                 "run the node-agent (and this check) as root: it binds GPUs to vfio-pci, makes cgroups, "
                 "network namespaces and nftables rules")


def check_virtualisation(root: HostRoot, probes: Probes) -> list[Check]:
    flags: set[str] = set()
    for line in (root.read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    have = sorted(flags & {"vmx", "svm"})
    cpu = Check("cpu virtualisation", "ok" if have else "warn", False,
                f"CPU flag {have[0]}" if have else "no vmx/svm in /proc/cpuinfo (virtualisation off, or a VM "
                                                   "without nested virtualisation)",
                "" if have else "enable VT-x / AMD-V (SVM) in the firmware; in a VM, enable nested virtualisation")
    dev = root.file("/dev/kvm")
    answer: int | str = probes.kvm_api_version(dev) if dev.exists() else "no /dev/kvm"
    qemu = probes.which("qemu-system-x86_64")
    if answer == KVM_API_VERSION:
        kvm = Check("kvm", "ok", True, f"/dev/kvm answers KVM_GET_API_VERSION = {KVM_API_VERSION}")
    elif qemu:
        kvm = Check("kvm", "warn", True, f"{answer}; VMs run under TCG ({qemu}), many times slower",
                    "load kvm_intel or kvm_amd (modprobe), make sure /dev/kvm is readable and writable by root")
    else:
        kvm = Check("kvm", "fail", True, f"{answer}, and no qemu-system-x86_64 on PATH: no way to run a VM",
                    "apt install qemu-system-x86 and enable KVM (VT-x / AMD-V in firmware, modprobe kvm_intel "
                    "or kvm_amd)")
    return [cpu, kvm]


def nvidia_gpus(sysfs: Sysfs) -> list[PciDevice]:
    """NVIDIA display / 3D controllers on the PCI bus (vendor 0x10de, class 0x03xxxx)."""
    try:
        return [d for d in sysfs.nvidia_functions() if d.is_nvidia_gpu]
    except (OSError, VfioError):
        return []


def check_iommu(root: HostRoot, gpus_present: bool) -> Check:
    cmdline = root.read("/proc/cmdline") or ""
    flags = [w for w in cmdline.split() if re.match(r"^(intel_iommu|amd_iommu|iommu)=", w)]
    groups_dir = root.file("/sys/kernel/iommu_groups")
    groups = sum(1 for _ in groups_dir.iterdir()) if groups_dir.is_dir() else 0
    found = f"{groups} IOMMU group(s); kernel command line: {' '.join(flags) or 'no IOMMU option'}"
    if groups:
        return Check("iommu", "ok", gpus_present, found)
    if gpus_present:
        return Check("iommu", "fail", True, found + "; GPUs cannot be passed through", IOMMU_HINT)
    return Check("iommu", "warn", False, found + " (needed only for GPU passthrough)", IOMMU_HINT)


def check_isolation_of(sysfs: Sysfs, gpus: list[PciDevice]) -> list[Check]:
    if not gpus:
        return [Check("gpu isolation", "warn", False, "no NVIDIA GPU on the PCI bus: CPU-only host",
                      "nothing to do for CPU jobs; GPU jobs need an NVIDIA GPU in its own IOMMU group")]
    out = []
    for gpu in gpus:
        name = f"gpu {gpu.bdf} isolation"
        try:
            _, functions = check_isolation(gpu.bdf, sysfs)
        except VfioError as exc:
            hint = {
                "iommu_off": IOMMU_HINT,
                "iommu_group_shared": "move the GPU to a slot with its own IOMMU group (a CPU root port, not a "
                                      "chipset or PCIe-switch slot sharing ACS), or enable ACS in the firmware",
                "driver_unsafe": "blacklist nouveau (echo 'blacklist nouveau' > /etc/modprobe.d/qvm.conf, "
                                 "update-initramfs -u, reboot) and install the NVIDIA driver",
            }.get(exc.reason, "see the node-agent's VFIO documentation (isolation/vfio.py)")
            out.append(Check(name, "fail", True, f"{exc.reason}: {exc.detail}", hint))
            continue
        out.append(Check(name, "ok", True, f"IOMMU group {gpu.iommu_group}: {', '.join(f.bdf for f in functions)}"))
    return out


def check_nvml(probes: Probes, pci_gpus: int) -> Check:
    try:
        gpus = probes.gpus()
    except Exception as exc:  # NVML is best effort here: a broken driver is a finding, not a crash
        gpus, error = (), f" ({exc})"
    else:
        error = ""
    if gpus:
        drivers = sorted({g.driver_version for g in gpus if g.driver_version}) or ["unknown"]
        found = f"driver {', '.join(drivers)}, {len(gpus)} GPU(s): {', '.join(sorted({g.name for g in gpus}))}"
        if pci_gpus and len(gpus) != pci_gpus:
            return Check("nvidia driver", "warn", False, f"{found}; the PCI bus shows {pci_gpus}",
                         "GPUs missing from NVML are on another driver (vfio-pci at boot?) or failed: nvidia-smi, "
                         "dmesg")
        return Check("nvidia driver", "ok", False, found)
    if pci_gpus:
        return Check("nvidia driver", "warn", False, f"the PCI bus shows {pci_gpus} NVIDIA GPU(s), NVML none{error}",
                     "install the NVIDIA data-center driver (and nvidia-ml-py): the agent inventories GPUs with NVML "
                     "and scrubs VRAM through the host driver between jobs")
    return Check("nvidia driver", "warn", False, f"no GPU (NVML reports none{error}): CPU-only host",
                 "nothing to do for CPU jobs; GPU hosts need the NVIDIA driver")


def check_tpm(root: HostRoot, probes: Probes) -> list[Check]:
    rm = root.file("/dev/tpmrm0")
    if not rm.exists():
        other = " (/dev/tpm0 is there, without the kernel resource manager)" if root.file("/dev/tpm0").exists() \
            else ""
        return [Check("tpm", "fail", True, f"no /dev/tpmrm0{other}",
                      "enable the TPM 2.0 (discrete, fTPM or Intel PTT) in the firmware and use a kernel with "
                      "tpm_crb / tpm_tis; without it the node cannot attest and stays unverified (the scheduler "
                      "places no jobs on it unless QVM_MIN_TRUST allows unverified nodes)")]
    checks = [Check("tpm", "ok", True, "TPM 2.0 resource manager at /dev/tpmrm0")]
    cert = probes.ek_certificate(rm)
    if cert is None:
        checks.append(Check("tpm ek certificate", "warn", False, "not checked",
                            "check with `tpm2_nvreadpublic` for index 0x1c00002 (RSA) or 0x1c0000a (ECC)"))
    elif cert:
        checks.append(Check("tpm ek certificate", "ok", False, "EK certificate in NV"))
    else:
        checks.append(Check("tpm ek certificate", "warn", False, "no EK certificate in NV (0x1c00002, 0x1c0000a)",
                            "the verifier cannot chain this TPM to its manufacturer: enroll the EK by hand, or use "
                            "a TPM that ships its EK certificate"))
    return checks


def check_cgroups(root: HostRoot) -> Check:
    controllers = root.read("/sys/fs/cgroup/cgroup.controllers")
    if controllers is None:
        return Check("cgroups", "warn", False, "cgroup v1 (no /sys/fs/cgroup/cgroup.controllers)",
                     "qvm supports v1; for v2 boot with systemd.unified_cgroup_hierarchy=1 (the default on "
                     "Ubuntu >= 21.10, Debian >= 11)")
    missing = [c for c in ("cpu", "memory") if c not in controllers.split()]
    if missing:
        return Check("cgroups", "warn", False, f"cgroup v2 without {', '.join(missing)} ({controllers or 'none'})",
                     "enable the cpu and memory controllers (+cpu +memory in cgroup.subtree_control)")
    return Check("cgroups", "ok", False, f"cgroup v2 ({controllers})")


def check_nftables(probes: Probes) -> Check:
    nft = probes.which("nft")
    if nft:
        return Check("nftables", "ok", False, nft)
    return Check("nftables", "warn", False, "no `nft` on PATH",
                 "apt install nftables: each VM's network namespace is default-deny through nftables, and jobs "
                 "with an egress allowlist need it")


_CVM_LABEL = {"sev-snp": "SEV-SNP", "tdx": "TDX"}


def check_runtime_guard(probes: Probes) -> Check:
    """Optional but trusted nodes need it where the policy requires it: the eBPF guard over every VMM."""
    mode, why = probes.runtime_guard()
    if mode == "enforce":
        return Check("runtime guard", "ok", False, why)
    if mode == "observe":
        return Check("runtime guard", "warn", False, why,
                     "BPF LSM programs cannot attach here (the kernel needs lsm=...,bpf and BPF trampolines): "
                     "findings stop the job, but nothing is denied in the kernel")
    return Check("runtime guard", "warn", False, f"unavailable: {why}",
                 "install clang, libbpf-dev and bpftool, run as root on a kernel with BTF "
                 "(/sys/kernel/btf/vmlinux); without the guard the node advertises no runtime guard and a policy "
                 "that requires one does not trust it")


def check_confidential(root: HostRoot, probes: Probes | None = None) -> Check:
    """Optional: SEV-SNP / TDX, every layer (`cvm_host.detect`). A kind whose CPU has it but some layer
    lacks it gets that layer's fix; a host whose CPUs have neither gets the generic hint."""
    host = cvm_host.detect(root.path, probes.run if probes is not None else None)
    capable = host.features()
    found = "; ".join(f"{_CVM_LABEL[k]} {line}" for k, line in host.explain().items())
    if host.microcode:
        found += f"; microcode {host.microcode}"
    if capable:
        return Check("confidential vms", "ok", False, found)
    near = [k for k in host.kinds if k.piece("cpu").ok]  # the hardware has it: say what else is missing
    hint = " ".join(f"{_CVM_LABEL[k.kind]}: " + "; ".join(p.hint for p in k.missing) + "." for k in near) or (
        "only for confidential jobs: an AMD EPYC with SEV-SNP or an Intel Xeon with TDX, enabled in the "
        "firmware and in kvm_amd / kvm_intel, with the matching OVMF build and a QEMU that has the guest object")
    return Check("confidential vms", "warn", False, found, hint)


def check_disk(root: HostRoot, probes: Probes, state_dir: Path) -> Check:
    target = root.file(state_dir.absolute())
    probe = next((p for p in (target, *target.parents) if p.exists()), root.path)
    try:
        free = probes.free_bytes(probe)
    except OSError as exc:
        return Check("disk", "warn", False, f"{state_dir}: {exc.strerror or exc}", "check the state directory")
    found = f"{free / 1024**3:.1f} GiB free for {state_dir.absolute()}"
    if free >= MIN_FREE_BYTES:
        return Check("disk", "ok", False, found)
    return Check("disk", "warn", False, found,
                 f"keep >= {MIN_FREE_BYTES // 1024**3} GiB free under the state directory (QVM_STATE_DIR): images "
                 "and each job's encrypted scratch disk live there")


def check_clock(root: HostRoot, probes: Probes) -> Check:
    answer = probes.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    if answer is not None and answer[0] == 0 and answer[1] in ("yes", "no"):
        synced: bool | None = answer[1] == "yes"
        how = "timedatectl"
    elif root.file("/run/systemd/timesync/synchronized").exists():
        synced, how = True, "/run/systemd/timesync/synchronized"
    else:
        synced, how = None, "no timedatectl answer, no /run/systemd/timesync/synchronized"
    if synced:
        return Check("clock", "ok", False, f"synchronised ({how})")
    hint = ("enable NTP (timedatectl set-ntp true, or chrony): certificates, attestation freshness and "
            "deadlines depend on the clock")
    return Check("clock", "warn", False, "not synchronised (timedatectl)" if synced is False else f"unknown: {how}",
                 hint)


def run_checks(root: HostRoot | None = None, probes: Probes | None = None,
               state_dir: Path = Path(".qvm")) -> list[Check]:
    """Every check, in the order the report prints them."""
    root, probes = root or HostRoot(), probes or HostProbes()
    sysfs = root.sysfs()
    gpus = nvidia_gpus(sysfs)
    return [
        *check_os(root),
        check_root(probes),
        *check_virtualisation(root, probes),
        check_iommu(root, bool(gpus)),
        *check_isolation_of(sysfs, gpus),
        check_nvml(probes, len(gpus)),
        *check_tpm(root, probes),
        check_cgroups(root),
        check_nftables(probes),
        check_confidential(root, probes),
        check_runtime_guard(probes),
        check_disk(root, probes, state_dir),
        check_clock(root, probes),
    ]


def hard_failures(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if c.hard and c.status == "fail"]


def render(checks: Sequence[Check]) -> str:
    """The report as a plain-text table, a fix hint under each check that is not ok."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  status  found", f"{'-' * width}  ------  -----"]
    for c in checks:
        mark = c.status + (" *" if c.hard and c.status == "fail" else "")
        lines.append(f"{c.name:<{width}}  {mark:<6}  {c.found}")
        if c.hint and c.status != "ok":
            lines.append(f"{'':<{width}}          fix: {c.hint}")
    failed = hard_failures(checks)
    lines.append("")
    lines.append(f"{len(failed)} hard requirement(s) failed: {', '.join(c.name for c in failed)}" if failed
                 else "all hard requirements met")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- node-agent start
def gate(settings: NodeAgentSettings, root: HostRoot | None = None, probes: Probes | None = None,
         warn: Callable[[str], None] | None = None) -> list[Check]:
    """The doctor at node-agent start, as `QVM_NODE_DOCTOR` says: `off` skips it, `warn` logs each failed
    hard requirement, `enforce` raises `ConfigError` naming each with its fix (the agent does not start)."""
    if settings.node_doctor == "off":
        return []
    checks = run_checks(root, probes, settings.state_dir)
    failed = hard_failures(checks)
    if failed and settings.node_doctor == "enforce":
        raise ConfigError("node doctor: hard requirement(s) not met: "
                          + "; ".join(f"{c.name}: {c.found} (fix: {c.hint})" for c in failed)
                          + " (QVM_NODE_DOCTOR=warn starts anyway)")
    for c in failed:
        (warn or (lambda m: log.warning(m)))(f"node doctor: {c.name}: {c.found} (fix: {c.hint})")
    return checks


# ------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None, probes: Probes | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qvm node doctor", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", type=Path, default=Path("/"), help="read the host's files under this root")
    parser.add_argument("--state-dir", type=Path, default=None, help="the state directory (default QVM_STATE_DIR)")
    parser.add_argument("--json", action="store_true", help="a JSON list of {name, status, hard, found, hint}")
    args = parser.parse_args(argv)
    state_dir = args.state_dir or NodeAgentSettings().state_dir
    checks = run_checks(HostRoot(args.root), probes, state_dir)
    print(json.dumps([asdict(c) for c in checks], indent=2) if args.json else render(checks))
    return 1 if hard_failures(checks) else 0


if __name__ == "__main__":
    sys.exit(main())
