"""The node-agent's settings (`QVM_*`): the common ones, this node and its TPM (`NodeSettings`), and how it
runs instances, attests and reports."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from shared.config import NodeSettings
from shared.models import Frozen

__all__ = ["NodeAgentSettings", "WarmPoolEntry"]


class WarmPoolEntry(Frozen):
    """How many warm instances of one image and size this node keeps booted."""

    image: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    cpu_cores: int = Field(1, ge=1, le=64)
    ram_mib: int = Field(256, ge=128, le=1 << 20)
    volume_mib: int = Field(0, ge=0, description="A data volume disk of this size (formatted in the guest only "
                                                 "when the job's key arrives); 0: none.")
    count: int = Field(1, ge=0, le=16)


class NodeAgentSettings(NodeSettings):
    heartbeat_interval_s: float = Field(5.0, gt=0)
    agent_sweep_interval_s: float = Field(60.0, gt=0, description="How often a node-agent reclaims what no live "
                                                                  "job owns (instance leftovers, GPUs on vfio-pci).")

    publisher_keys: list[Path] = Field(default_factory=list,
                                       description="Trusted image publisher keys (PEM); default <images_dir>/*.pub.")
    vmm: str = Field("qemu-microvm", description="VMM driver for instances.")
    vm_accel: str = Field("auto", pattern="^(auto|kvm|tcg)$", description="auto: KVM where it works, else TCG.")
    vm_cgroups: bool = Field(True, description="Put each VMM in a cgroup with the job's CPU and memory limits.")
    vm_seccomp: bool = Field(True, description="Run each VMM under a seccomp syscall allow-list.")
    egress_netns: str | None = Field(None, description="Uplink network namespace for jobs with an egress allowlist; "
                                     "unset: such jobs are refused.")
    vm_network: str = Field("netns", pattern="^(netns|none)$",
                            description="netns: a tap in the instance's netns, nftables default-deny; none: no NIC.")
    node_doctor: str = Field("warn", pattern="^(off|warn|enforce)$",
                             description="Host checks at start (`qvm node doctor`): enforce refuses to start on a "
                                         "failed hard requirement, warn logs it, off skips them.")
    instances_dir: Path | None = Field(None, description="Per-instance work dirs; default <state_dir>/instances.")
    warm_pool: tuple[WarmPoolEntry, ...] = Field((), description="Warm instances kept booted per image and size "
                                                 "(JSON list of {image, cpu_cores, ram_mib, volume_mib, count}); "
                                                 "empty: none (small hosts).")

    tpm_ak_algorithm: str = Field("ecc-p256", pattern="^(ecc-p256|rsa-2048)$", description="Attestation key type.")
    measurement_log: Path | None = Field(None, description="Append-only measurement log; default "
                                         "<state_dir>/tpm/measurements-<node>.jsonl.")
    attest_interval_s: float = Field(60.0, gt=0, description="Node re-attestation period (plus jitter).")
    attest_jitter_s: float = Field(10.0, ge=0)
    attest_timeout_s: float = Field(30.0, gt=0, description="Longest an instance waits for its verdict.")
    key_release_timeout_s: float = Field(30.0, gt=0, description="Longest an attested instance waits for its "
                                                                 "volume key from the key-broker.")
    client_secrets_timeout_s: float = Field(300.0, gt=0, description="Longest an attested instance waits for "
                                                                     "its client to verify it and release secrets.")

    @property
    def instances_path(self) -> Path:
        return self.instances_dir or self.state_dir / "instances"

    def measurement_log_path(self, node_id: str) -> Path:
        return self.measurement_log or self.state_dir / "tpm" / f"measurements-{node_id}.jsonl"

    def publisher_key_files(self) -> list[Path]:
        return self.publisher_keys or sorted(self.images_path.glob("*.pub"))
