"""Value types shared by several events: hardware, inventory, claims, trust and security levels."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Frozen",
    "GpuInfo",
    "GpuRequest",
    "HardwareProfile",
    "Inventory",
    "ResourceClaim",
    "SecurityLevel",
    "TpmInfo",
    "TrustState",
    "VolumeErasure",
    "field_or",
]


class Frozen(BaseModel):
    """Base of every wire model: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def field_or(model: BaseModel, name: str, default: Any) -> Any:
    """`getattr(model, name, default)` for a field the model may not have, without pydantic's slow path: a
    missing name goes through `BaseModel.__getattr__`, which builds and raises an AttributeError (tens of
    microseconds: more than all of an event's other checks after its signature)."""
    return getattr(model, name) if name in type(model).__pydantic_fields__ else default


class SecurityLevel(StrEnum):
    BASIC = "basic"  # micro VM with a measured, attested launch
    CONFIDENTIAL = "confidential"  # confidential VM (SEV-SNP / TDX) on a CC-capable host


class TrustState(StrEnum):
    """A node's trust, set by attestation results. Ordered: untrusted < unverified < trusted."""

    UNTRUSTED = "untrusted"
    UNVERIFIED = "unverified"
    TRUSTED = "trusted"

    @property
    def rank(self) -> int:
        return _TRUST_RANK[self]


_TRUST_RANK = {TrustState.UNTRUSTED: 0, TrustState.UNVERIFIED: 1, TrustState.TRUSTED: 2}


class GpuRequest(Frozen):
    count: int = Field(0, ge=0, le=16, description="Number of whole GPUs.")
    model: str | None = Field(
        None, max_length=64, description="Substring the GPU name must contain, e.g. 'H100'.", examples=["H100"]
    )
    min_vram_mib: int = Field(0, ge=0, le=1 << 24, description="Minimum memory per GPU, MiB.")


class HardwareProfile(Frozen):
    """What a job needs from the host."""

    cpu_cores: int = Field(1, ge=1, le=1024)
    ram_mib: int = Field(512, ge=64, le=1 << 30)
    gpus: GpuRequest = GpuRequest()


class GpuInfo(Frozen):
    """One GPU as NVML reports it. The health and mode fields default to "unknown" (None / "unsupported") so
    that an older agent's inventory still validates, and because NVML does not report them on every GPU and
    driver: a field the GPU cannot report is None, never a guess."""

    index: int = Field(ge=0, le=255)
    uuid: str = Field(max_length=96)
    name: str = Field(max_length=96)
    memory_mib: int = Field(ge=0)
    pci_bus_id: str = Field(max_length=32)
    driver_version: str = Field("", max_length=32, description="NVIDIA driver version ('' if unknown).")
    vbios_version: str = Field("", max_length=32, description="VBIOS version ('' if unknown).")
    compute_capability: str = Field("", max_length=8, description="CUDA compute capability, e.g. '9.0'.")
    ecc_enabled: bool | None = Field(None, description="ECC currently on; None: not supported or unknown.")
    retired_pages: int | None = Field(
        None, ge=0, description="Pages retired for single-bit and double-bit ECC errors (pre-Ampere page "
                                "retirement); None: the GPU does not report it (Ampere and later remap rows).")
    retired_pages_pending: bool | None = Field(None, description="A page retirement waits for the next reset.")
    remapped_rows: int | None = Field(
        None, ge=0, description="Rows remapped for correctable + uncorrectable errors; None: not supported.")
    remapped_rows_pending: bool | None = Field(None, description="A row remap waits for the next GPU reset.")
    remapped_rows_failure: bool | None = Field(
        None, description="A row remap failed: the GPU has memory it cannot repair and should not take jobs.")
    mig_enabled: bool | None = Field(None, description="MIG mode currently on; None: not supported.")
    cc_mode: Literal["on", "off", "devtools", "unsupported"] = Field(
        "unsupported", description="Confidential-computing mode of the GPUs (system-wide in NVML): devtools "
                                   "lifts the CC debug protections and must not be trusted as CC.")

    @property
    def healthy(self) -> bool:
        """NVML says the memory is sound: no failed row remap, no remap or page retirement waiting for a reset.
        The scheduler lists only healthy GPUs and the node-agent refuses a claim on another."""
        return not (self.remapped_rows_failure or self.remapped_rows_pending or self.retired_pages_pending)


class TpmInfo(Frozen):
    present: bool
    device: str | None = Field(None, max_length=256)


class Inventory(Frozen):
    """A node's hardware as the node-agent read it (never as a hoster typed it)."""

    hostname: str = Field(max_length=255)
    cpu_model: str = Field(max_length=255)
    cpu_cores: int = Field(ge=1, le=4096)
    ram_mib: int = Field(ge=1)
    gpus: tuple[GpuInfo, ...] = ()
    vmms: tuple[str, ...] = Field((), description="VMMs found on the host, e.g. qemu-microvm.")
    kvm: bool = False
    tpm: TpmInfo = TpmInfo(present=False)
    confidential: tuple[str, ...] = Field((), description="CPU confidential-computing features (sev-snp, tdx).")
    runtime_guard: str = Field("", pattern="^(|enforce|observe)$",
                               description="The eBPF runtime guard over the VMMs: enforce (BPF LSM denies), observe "
                                           "(tracepoints report, the agent stops the job), or none.")


class ResourceClaim(Frozen):
    """What a placement reserves on one node."""

    cpu_cores: int = Field(ge=0)
    ram_mib: int = Field(ge=0)
    gpu_uuids: tuple[str, ...] = ()


class VolumeErasure(Frozen):
    """Evidence that an instance's encrypted data volume was destroyed at teardown (no key material: sizes,
    outcomes and a duration only). The host never held the volume's plaintext. The job's DEK is only the LUKS
    passphrase: the volume key that encrypts the data is random, made by cryptsetup in the guest and stored
    only in the keyslots, wrapped under the DEK. With the keyslots erased and the header area overwritten
    (and read back), the ciphertext left in freed blocks cannot be decrypted even by someone holding the DEK."""

    volume_bytes: int = Field(ge=0, description="Size of the volume file before its removal.")
    luks_header_found: bool = Field(description="A LUKS2 header (primary or secondary magic) was on the file.")
    luks_erase: Literal["ok", "no_header", "failed", "unavailable"] = Field(
        description="`cryptsetup erase` (all keyslots destroyed): ok; no_header: nothing to erase; failed: "
                    "it refused (the overwrite still ran); unavailable: no cryptsetup on the node.")
    data_offset: int = Field(0, ge=0, description="Where the LUKS2 data segment starts, read from the header "
                                                  "(0: unknown).")
    overwritten_bytes: int = Field(ge=0, description="Bytes from the start of the file overwritten with zeros: "
                                                     "the whole header area (both headers and the keyslots).")
    verified_zero: bool = Field(description="The overwritten range was read back after fsync and is all zero.")
    removed: bool = Field(description="The file was unlinked.")
    duration_ms: float = Field(ge=0)
    detail: str = Field("", max_length=512, description="Why a step failed, if one did.")


class MemoryScrub(Frozen):
    """Evidence that an instance's guest RAM (the memfd the agent owns and handed to the VMM) was wiped
    after the VMM exited: every byte overwritten and read back, or the pages handed back to the kernel
    (which zeroes them before any reuse) and the range read back as zero. Sizes, method, outcome, time."""

    bytes_total: int = Field(ge=0, description="Size of the guest RAM backing.")
    bytes_scrubbed: int = Field(ge=0, description="Bytes overwritten (or released) and read back.")
    method: Literal["overwrite-verify", "punch-hole-verify"]
    verified: bool = Field(description="Every byte of the range read back as zero.")
    duration_ms: float = Field(ge=0)
    rate_gbps: float = Field(ge=0, description="bytes_scrubbed / duration, in GB/s.")
    detail: str = Field("", max_length=512)


class VramScrub(Frozen):
    """Evidence that one GPU's memory was wiped after a job: all free VRAM claimed in chunks through the
    CUDA driver API, filled with zeros, verified zero on the GPU itself, released."""

    gpu_uuid: str = Field(max_length=96)
    pci_bus_id: str = Field("", max_length=32)
    method: str = Field(max_length=64, examples=["cuda-memset-verify"])
    bytes_total: int = Field(ge=0, description="The GPU's memory size.")
    bytes_scrubbed: int = Field(ge=0, description="Bytes claimed, zeroed and verified.")
    verified: bool
    duration_ms: float = Field(ge=0)
    rate_gbps: float = Field(ge=0)
    detail: str = Field("", max_length=512)
