"""The launch measurement a confidential guest must report, computed from the image, before any guest runs.

SEV-SNP: the report's MEASUREMENT is the firmware's launch digest (SHA-384 chained over every page QEMU gave
`SNP_LAUNCH_UPDATE`): the OVMF image, its metadata pages (zero, secrets, CPUID, and the SEV hashes table that
holds the SHA-256 of the kernel, initrd and command line when QEMU runs with `kernel-hashes=on`), then one VMSA
per vCPU (whose contents depend on the vCPU model's CPUID signature and on the VMSA features). `qvm attest
policy` writes `snp_measurement(...)` into the verifier's policy, so a guest booted from anything but this
image, this command line and this vCPU count fails attestation. The arithmetic is sev-snp-measure's (virtee,
Apache-2.0, the reference the AMD community checks against real hardware); this module pins its inputs to what
`services/node_agent/vmm/qemu_cvm.py` launches:

- QEMU as the VMM (`VMMType.QEMU`: its reset state and FPU defaults are in the VMSAs);
- `vcpu_type` is the `-cpu` model the driver passes (EPYC-v4 by default, not `host`: the signature is measured);
- `guest_features` is the VMSA SEV_FEATURES the hypervisor sets: 0x1 (SNP active only) is sev-snp-measure's
  default and what QEMU's KVM_SEV_INIT2 launch asks for unless told otherwise; a host that turns on DebugSwap
  (bit 5) or other VMSA features measures differently, and the value must then match it (check it once against
  a report from the target host: nothing here has run on SNP hardware);
- the firmware must be the AmdSev build (OVMF.amdsev.fd): only it has the SNP_KERNEL_HASHES metadata section
  and the hashes table. Generic OVMF builds (Debian bookworm's OVMF.fd, OVMF_CODE*.fd) boot SNP guests but
  cannot bind the kernel: refused with `ovmf_no_kernel_hashes` rather than giving a measurement that would not
  cover the image.

TDX has nothing to compute here: see `tdx_note`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.cvm.errors import CvmError

__all__ = ["ovmf_supports_kernel_hashes", "snp_measurement", "tdx_note"]


def _load_ovmf(ovmf: Path) -> Any:  # sevsnpmeasure.ovmf.OVMF (the package is untyped)
    from sevsnpmeasure.ovmf import OVMF  # type: ignore[import-untyped]

    try:
        return OVMF(str(ovmf))
    except OSError as exc:
        raise CvmError("ovmf_unreadable", f"{ovmf}: {exc.strerror or exc}") from None
    except (RuntimeError, ValueError) as exc:  # a footer table or SEV metadata that does not parse
        raise CvmError("ovmf_unusable", f"{ovmf}: {exc}") from None


def ovmf_supports_kernel_hashes(ovmf: Path) -> bool:
    """Whether `ovmf` is a build QEMU's `kernel-hashes=on` works with for SNP: an SNP_KERNEL_HASHES section in
    its SEV metadata and a (non-zero) SEV hashes table address in its footer table."""
    from sevsnpmeasure.ovmf import SectionType

    fw = _load_ovmf(ovmf)
    has_section: bool = fw.has_metadata_section(SectionType.SNP_KERNEL_HASHES)
    has_table: bool = fw.is_sev_hashes_table_supported()
    return has_section and has_table


def _vcpu_signature(vcpu_type: str) -> int:
    from sevsnpmeasure.vcpu_types import CPU_SIGS  # type: ignore[import-untyped]

    if vcpu_type not in CPU_SIGS:
        raise CvmError("unknown_vcpu_type", f"{vcpu_type!r} is not a QEMU CPU model sev-snp-measure knows "
                                            f"({', '.join(sorted(CPU_SIGS))})")
    signature: int = CPU_SIGS[vcpu_type]
    return signature


def snp_measurement(ovmf: Path, kernel: Path, initrd: Path, cmdline: str, vcpus: int, vcpu_type: str = "EPYC-v4",
                    guest_features: int = 0x1) -> str:
    """The expected SEV-SNP launch MEASUREMENT (96 lowercase hex digits, SHA-384) of a guest QEMU starts with
    `-bios ovmf -kernel kernel -initrd initrd -append cmdline -smp vcpus -cpu vcpu_type` and
    `sev-snp-guest,kernel-hashes=on`. `cmdline` is hashed exactly as given (QEMU adds the terminating NUL, as
    sev-snp-measure does): the agent must launch with the same string, byte for byte."""
    if vcpus < 1:
        raise CvmError("bad_vcpus", f"a guest has at least one vCPU, not {vcpus}")
    signature = _vcpu_signature(vcpu_type)
    if not ovmf_supports_kernel_hashes(ovmf):
        raise CvmError("ovmf_no_kernel_hashes",
                       f"{ovmf} has no SNP kernel-hashes table: it cannot bind the kernel, initrd and command line "
                       "into the measurement (use the AmdSev build, OVMF.amdsev.fd)")
    from sevsnpmeasure import guest  # type: ignore[import-untyped]
    from sevsnpmeasure.sev_mode import SevMode  # type: ignore[import-untyped]
    from sevsnpmeasure.vmm_types import VMMType  # type: ignore[import-untyped]

    try:
        digest: bytes = guest.calc_launch_digest(SevMode.SEV_SNP, vcpus, signature, str(ovmf), str(kernel),
                                                 str(initrd), cmdline, guest_features, vmm_type=VMMType.QEMU)
    except OSError as exc:
        raise CvmError("image_unreadable", f"{exc.filename}: {exc.strerror or exc}") from None
    except (RuntimeError, ValueError, AssertionError) as exc:  # sev-snp-measure asserts page-sized regions
        raise CvmError("ovmf_unusable", f"{ovmf}: {exc or type(exc).__name__}") from None
    return digest.hex()


def tdx_note() -> str:
    """Why `qvm attest policy` computes nothing for TDX, for it to print next to the policy."""
    return ("TDX: nothing is computed here. MRTD is the measurement of the TD firmware (TDVF, OVMF.inteltdx.fd) "
            "as the TDX module loaded it, which depends only on that build: take it from the firmware's vendor or "
            "from one quote of a known-good TD on the target QEMU and TDX module. The kernel, initrd and command "
            "line are measured by TDVF into RTMR[1] and RTMR[2], replayed from the guest's event log, not into "
            "MRTD.")
