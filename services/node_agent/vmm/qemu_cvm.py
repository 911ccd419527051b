"""QEMU `q35` confidential guests: AMD SEV-SNP (QEMU >= 9.1) and Intel TDX (QEMU >= 10.1), controlled over QMP.

microvm cannot host either (QEMU launches confidential guests on its PC machines only, from a firmware that
carries the SEV metadata or TDVF layout; microvm boots qboot/SeaBIOS), so a confidential instance is a q35
machine booted by the matching OVMF build, and everything else stays as `qemu_microvm` does it:
the agent's verified kernel, initramfs and root filesystem passed as open descriptors (`/proc/self/fd/N`), QMP
and the guest channel on socketpairs (`-chardev socket,fd=N`, virtio-serial port `qvm.0`), the scratch disk and
the data volume, a tap in the instance's namespace, GPUs on vfio-pci, a pidfile.

What is measured, and why the command line looks the way it does:

- SEV-SNP: `-object sev-snp-guest` with `kernel-hashes=on` and `-bios OVMF.amdsev.fd` (the AmdSev build, the
  only one with the SEV hashes table): QEMU writes the SHA-256 of the kernel, initrd and command line into that
  table, the firmware measures it with the rest of OVMF and the VMSAs into the launch digest, and OVMF refuses
  to boot a kernel whose hash differs. So direct kernel boot (`-kernel/-initrd/-append`) puts the image and
  the command line in the report's MEASUREMENT, which `shared.cvm.measure.snp_measurement` predicts. The
  vCPU model is part of that digest (each VMSA holds the CPUID signature), so it is fixed (`EPYC-v4` by
  default, as sev-snp-measure assumes) rather than `host`. `cbitpos` must equal the host's (QEMU checks it):
  read from CPUID 0x8000001F through /dev/cpu/0/cpuid at launch when not given, else 51 (every SNP-capable
  EPYC: Milan, Genoa, Bergamo, Siena, Turin). The guest policy (default 0x30000: SMT allowed, bit 17 set as
  the ABI requires, debug off, no migration agent) is a constructor parameter; a debug policy is refused.
- TDX: `-object tdx-guest` (`sept-ve-disable` on: Linux TD guests refuse to boot without it) with `-bios
  OVMF.inteltdx.fd` (TDVF, whose image is MRTD) and `kernel-irqchip=split` (TDX requires it). TDVF measures the
  kernel, initrd and command line into RTMR[1..2], not MRTD. `mrconfigid` / `mrowner` (48 bytes each) are bound
  into the TD report when given. Quotes are made by the host's Quote Generation Service: `quote_socket`
  (default `vsock:2:4050`, where Intel's and Canonical's qgsd listen) is where QEMU forwards the guest's
  GetQuote, given as JSON because it is a nested QAPI struct.

Both: `-accel kvm` always (a confidential guest never runs under TCG: without /dev/kvm the launch is refused
with `cvm_needs_kvm`), guest RAM from a `memory-backend-memfd` QEMU makes itself, `-nodefaults -no-user-config
-display none -no-reboot`. Every virtio device is PCI with `disable-legacy=on,iommu_platform=on`: SNP and TDX
guests only accept virtio devices that go through the DMA API (bounce buffers in shared memory), and legacy
devices cannot offer that. virtio-net gets `romfile=` so no unmeasured option ROM reaches the firmware. Each
GPU sits behind its own `pcie-root-port` (its BARs get their own window), with OVMF's 64-bit MMIO aperture
raised (`opt/ovmf/X-PciMmio64Mb`, `pci_mmio64_mb`, default 256 GiB: an H100's 128 GiB BAR1; several GPUs or
an H200 need more, within the guest's physical address bits). GPU confidential computing (an H100 in CC mode)
is plain `vfio-pci` here; iommufd (`-object iommufd` + `vfio-pci,iommufd=`) is not used.

Guest RAM: `ram_from_agent` is False. A confidential guest's private memory lives in KVM's guest_memfd, not
in any file the agent could hand over, and is encrypted under a per-VM key (SEV-SNP ASID key / TDX private
HKID) that the firmware retires when the VM is torn down: what is left in those pages is ciphertext under a
key that no longer exists. The agent's memfd scrub therefore does not apply (and could not reach the pages).
What the backend memfd holds are the pages the guest chose to share (virtio bounce buffers): plaintext by
design, holding only what was already on its way to or from the host.

Attestation needs nothing from this driver: the guest asks its CPU for a report through configfs-tsm
(`/sys/kernel/config/tsm/report/<entry>/{inblob,outblob,auxblob}`, Linux >= 6.7 guests), and the agent carries
it over the channel (`CVM_REPORT`, shared/image/guest_init.sh).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

from services.node_agent.cvm_host import OVMF_CANDIDATES, Kind, find_ovmf, snp_cbit
from services.node_agent.isolation.seccomp import QEMU_ALLOW
from services.node_agent.isolation.vfio import VfioError, pci_address
from services.node_agent.vmm.base import LaunchSpec, VmmError, VmProcess
from services.node_agent.vmm.qemu_microvm import QemuMicrovm, spawn_qemu
from shared.telemetry import get_logger
from shared.tpm.digests import QEMU

__all__ = ["CVM_ALLOW", "NAMES", "SNP_CBITPOS", "SNP_POLICY", "TDX_QGS_ALLOW", "QemuConfidential"]

log = get_logger("qvm.node_agent.vmm.qemu_cvm")

NAMES: dict[Kind, str] = {"sev-snp": "qemu-sev-snp", "tdx": "qemu-tdx"}
"""The driver's `name` per kind: the verifier (`shared.cvm.evidence.CVM_VMMS`) demands a report of that kind
from an instance launched by it."""

SNP_POLICY = 0x30000  # bit 16 SMT allowed, bit 17 reserved-must-be-one; debug (19), migration agent (18) off
SNP_CBITPOS = 51  # C-bit of every SNP-capable EPYC generation so far
_SNP_POLICY_RESERVED = 1 << 17
_SNP_POLICY_DEBUG = 1 << 19
QGS_DEFAULT = "vsock:2:4050"
MMIO64_MB = 262144  # OVMF's 64-bit PCI MMIO aperture, 256 GiB: one H100's 128 GiB BAR1, naturally aligned

CVM_ALLOW: frozenset[str] = QEMU_ALLOW
"""The seccomp allow-list for SEV-SNP and TDX guests: QEMU_ALLOW as it stands. What a confidential launch adds
is ioctls on /dev/kvm, the VM and /dev/sev (KVM_CREATE_GUEST_MEMFD, KVM_SET_USER_MEMORY_REGION2,
KVM_SET_MEMORY_ATTRIBUTES, KVM_MEMORY_ENCRYPT_OP: all `ioctl`), private/shared conversions (`fallocate` punch
hole on the guest_memfd, `madvise`), the RAM memfd (`memfd_create`, `ftruncate`) and reading OVMF (`openat`,
`read`): all already allowed. guest_memfd is made by an ioctl, not a syscall of its own, and memfd_secret is
not used. This list was derived, not traced on SNP/TDX hardware; a gap shows as `seccomp_violation` with the
syscall in the audit log (type 1326), never as silent misbehaviour."""

TDX_QGS_ALLOW: frozenset[str] = frozenset({"socket", "connect"})
"""Added for TDX with a Quote Generation Service: QEMU itself connects to the QGS (vsock or unix) when the guest
asks for a quote, so it needs the two syscalls the microvm list never had to allow."""


def _bdf(dev: str) -> str:
    try:
        return pci_address(dev)
    except VfioError as exc:
        raise VmmError(exc.reason, exc.detail) from None


def _qgs_address(spec: str) -> dict[str, str]:
    """`vsock:CID:PORT` or `unix:PATH` as QAPI's SocketAddress (vsock's cid and port are strings there)."""
    kind, _, rest = spec.partition(":")
    if kind == "vsock":
        cid, _, port = rest.partition(":")
        if cid.isdigit() and port.isdigit():
            return {"type": "vsock", "cid": cid, "port": port}
    elif kind == "unix" and rest.startswith("/"):
        return {"type": "unix", "path": rest}
    raise ValueError(f"quote_socket must be vsock:CID:PORT or unix:/PATH, not {spec!r}")


def _digest48(name: str, value: bytes | None) -> str | None:
    """MRCONFIGID / MROWNER: 48 bytes (a SHA-384 by convention), base64 as tdx-guest takes them."""
    if value is None:
        return None
    if len(value) != 48:
        raise ValueError(f"{name} must be 48 bytes, not {len(value)}")
    return base64.b64encode(value).decode()


class QemuConfidential:
    """The Vmm protocol for SEV-SNP and TDX guests (see the module docstring for every choice)."""

    shared_channel = False
    elf_kernel = False  # the bzImage: OVMF boots its EFI stub after checking its hash (SNP) / measuring it (TDX)
    ram_from_agent = False  # private memory is guest_memfd under a per-VM key the firmware retires at teardown

    def __init__(self, kind: Kind, qemu: str = QEMU, ovmf: Path | None = None, *, policy: int = SNP_POLICY,
                 cpu: str = "EPYC-v4", cbitpos: int | None = None, reduced_phys_bits: int = 1,
                 mrconfigid: bytes | None = None, mrowner: bytes | None = None,
                 quote_socket: str | None = QGS_DEFAULT, pci_mmio64_mb: int = MMIO64_MB,
                 kvm: Path = Path("/dev/kvm")) -> None:
        """`ovmf`: the firmware (default: the first installed build for `kind`, `cvm_host.OVMF_CANDIDATES`).
        SEV-SNP only: `policy`, `cpu` (the vCPU model, part of the measurement), `cbitpos` (None: the host's,
        read at launch), `reduced_phys_bits`. TDX only: `mrconfigid`, `mrowner` (48 bytes each),
        `quote_socket` (None: no quotes, only TD reports). `pci_mmio64_mb`: OVMF's 64-bit MMIO aperture when
        GPUs are passed through. `kvm`: the KVM device (tests point it elsewhere)."""
        if kind not in NAMES:
            raise ValueError(f"unknown confidential VM kind {kind!r}")
        if policy & _SNP_POLICY_DEBUG:
            raise ValueError("an SEV-SNP policy with DEBUG (bit 19) lets the host read guest memory: refused")
        if not policy & _SNP_POLICY_RESERVED:
            raise ValueError("an SEV-SNP policy must have bit 17 set (reserved, must be one)")
        self.kind: Kind = kind
        self.name = NAMES[kind]
        self.cvm_kind = kind  # the instance asks its guest for a hardware report of this kind (attest/gate.py)
        self.qemu = qemu
        self.ovmf = ovmf or find_ovmf(kind) or Path(OVMF_CANDIDATES[kind][0])  # named when it is missing
        self.policy, self.cpu = policy, cpu
        self.cbitpos, self.reduced_phys_bits = cbitpos, reduced_phys_bits
        self.mrconfigid, self.mrowner = _digest48("mrconfigid", mrconfigid), _digest48("mrowner", mrowner)
        self.quote_socket = _qgs_address(quote_socket) if quote_socket and kind == "tdx" else None
        self.pci_mmio64_mb, self.kvm = pci_mmio64_mb, kvm
        self.seccomp_allow: frozenset[str] | None = CVM_ALLOW | (TDX_QGS_ALLOW if self.quote_socket else frozenset())
        self._stopper = QemuMicrovm(qemu)  # QMP `quit`, then SIGKILL after the grace: the same for any QEMU

    # ----------------------------------------------------------------------------------- the command line
    def _machine(self) -> str:
        if self.kind == "sev-snp":
            return "q35,confidential-guest-support=sev0,memory-backend=ram0,vmport=off"
        return "q35,kernel-irqchip=split,confidential-guest-support=tdx0,memory-backend=ram0"

    def _guest_object(self) -> str:
        if self.kind == "sev-snp":
            cbit = SNP_CBITPOS if self.cbitpos is None else self.cbitpos
            return (f"sev-snp-guest,id=sev0,cbitpos={cbit},reduced-phys-bits={self.reduced_phys_bits},"
                    f"kernel-hashes=on,policy={self.policy:#x}")
        obj: dict[str, Any] = {"qom-type": "tdx-guest", "id": "tdx0", "sept-ve-disable": True}
        if self.mrconfigid:
            obj["mrconfigid"] = self.mrconfigid
        if self.mrowner:
            obj["mrowner"] = self.mrowner
        if self.quote_socket:
            obj["quote-generation-socket"] = self.quote_socket
        return json.dumps(obj, separators=(",", ":"))

    @staticmethod
    def _pci(device: str) -> str:
        return f"{device},disable-legacy=on,iommu_platform=on"

    def _disks(self, spec: LaunchSpec) -> list[str]:
        """root (read-only, the verified file by descriptor), scratch, and the data volume: vda, vdb, vdc."""
        disks = [("root", f"/proc/self/fd/{spec.rootfs_fd}", ",readonly=on"), ("scratch", str(spec.scratch), "")]
        if spec.volume is not None:
            disks.append(("volume", str(spec.volume), ""))
        argv: list[str] = []
        for name, path, extra in disks:
            argv += ["-drive", f"id={name},file={path},format=raw,if=none{extra}",
                     "-device", self._pci(f"virtio-blk-pci,drive={name}")]
        return argv

    def _channel(self, qmp_fd: int, channel_fd: int) -> list[str]:
        return ["-device", self._pci("virtio-serial-pci,id=vser0"),
                "-chardev", f"socket,id=ch0,fd={channel_fd}", "-device", "virtserialport,chardev=ch0,name=qvm.0",
                "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control"]

    def _nic(self, spec: LaunchSpec) -> list[str]:
        if not spec.tap:
            return []
        return ["-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
                "-device", self._pci("virtio-net-pci,netdev=n0,romfile=")]

    def _gpus(self, spec: LaunchSpec) -> list[str]:
        argv: list[str] = []
        for i, dev in enumerate(spec.vfio_devices):
            argv += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1}",
                     "-device", f"vfio-pci,host={_bdf(dev)},id=vfio{i},bus=rp{i}"]
        if argv:
            argv += ["-fw_cfg", f"name=opt/ovmf/X-PciMmio64Mb,string={self.pci_mmio64_mb}"]
        return argv

    def argv(self, spec: LaunchSpec, qmp_fd: int, channel_fd: int) -> list[str]:
        """The whole command line; no I/O (the contract tests check it, and QEMU's own parser where installed)."""
        return [
            self.qemu, "-machine", self._machine(), "-accel", "kvm",
            "-cpu", self.cpu if self.kind == "sev-snp" else "host",
            "-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M",
            "-object", f"memory-backend-memfd,id=ram0,size={spec.memory_mib}M,share=true,prealloc=false",
            "-object", self._guest_object(),
            "-bios", str(self.ovmf),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", f"/proc/self/fd/{spec.kernel_fd}", "-initrd", f"/proc/self/fd/{spec.initrd_fd}",
            "-append", spec.cmdline,
            "-serial", f"file:{spec.workdir / 'console.log'}",
            *self._disks(spec),
            *self._channel(qmp_fd, channel_fd),
            "-pidfile", str(spec.workdir / "vmm.pid"),
            *self._nic(spec),
            *self._gpus(spec),
        ]

    # ------------------------------------------------------------------------------------ the process
    def available(self) -> bool:
        """QEMU on PATH, /dev/kvm, and the firmware file. Whether the host's CPU, kernel and QEMU can really
        launch this kind is `cvm_host.detect` (the inventory and the doctor)."""
        return shutil.which(self.qemu) is not None and self.kvm.exists() and self.ovmf.is_file()

    def _preflight(self) -> None:
        """Refuse what cannot give a confidential guest, before anything is started; fix the C-bit."""
        if not self.kvm.exists():
            raise VmmError("cvm_needs_kvm", f"a {self.kind} guest runs only under KVM, and there is no {self.kvm}")
        if shutil.which(self.qemu) is None:
            raise VmmError("vmm_missing", f"{self.qemu} not found (install qemu-system-x86)")
        if not self.ovmf.is_file():
            raise VmmError("cvm_firmware_missing", f"no {self.ovmf}: the {self.kind} build of OVMF")
        if self.kind == "sev-snp" and self.cbitpos is None:
            found = snp_cbit()
            if found is None:
                log.warning(f"no CPUID 0x8000001F through /dev/cpu/0/cpuid (modprobe cpuid): C-bit {SNP_CBITPOS}")
            self.cbitpos = found[0] if found else SNP_CBITPOS

    async def launch(self, spec: LaunchSpec) -> VmProcess:
        self._preflight()
        return await spawn_qemu(spec, self.name, "kvm", lambda qmp_fd, channel_fd: self.argv(spec, qmp_fd, channel_fd))

    async def stop(self, vm: VmProcess, grace_s: float = 5.0) -> None:
        await self._stopper.stop(vm, grace_s)

