"""Value types shared by several events: hardware, inventory, claims, trust and security levels."""

from __future__ import annotations

from enum import StrEnum

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
