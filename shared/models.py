"""Value types shared by several events: hardware, inventory, claims, trust and security levels."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

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
]


class Frozen(BaseModel):
    """Base of every wire model: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


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
    index: int = Field(ge=0, le=255)
    uuid: str = Field(max_length=96)
    name: str = Field(max_length=96)
    memory_mib: int = Field(ge=0)
    pci_bus_id: str = Field(max_length=32)


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
