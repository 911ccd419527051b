"""Settings for every qvm process, from environment variables (`QVM_*`) or a `qvm.toml`-free .env.

Defaults give the embedded single-machine stack; a real deployment sets `QVM_NATS_URL` to its NATS
cluster, `QVM_PKI_DIR` to the directory holding this process's certificates, and tunes the rest.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError
from shared.models import TrustState

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QVM_", env_file=None, extra="ignore")

    state_dir: Path = Field(Path(".qvm"), description="Embedded stack state: PKI, NATS store, logs.")
    nats_url: str | None = Field(None, description="External NATS (tls://...). Unset: the embedded server.")
    pki_dir: Path | None = Field(None, description="Certificates; default <state_dir>/pki.")

    stream_replicas: int = Field(1, ge=1, le=5, description="JetStream replicas per stream (3 on a cluster).")
    stream_max_age_s: float = Field(90 * 86400, gt=0, description="How long lifecycle events are kept.")
    dead_letter_max_age_s: float = Field(30 * 86400, gt=0)
    duplicate_window_s: float = Field(600, gt=0, description="Nats-Msg-Id dedupe window.")

    min_trust: TrustState = Field(TrustState.TRUSTED, description="Lowest node trust the scheduler places on.")
    heartbeat_interval_s: float = Field(5.0, gt=0)
    offline_after_s: float = Field(20.0, gt=0, description="A node silent this long is offline.")
    sweep_interval_s: float = Field(2.0, gt=0)
    agent_sweep_interval_s: float = Field(60.0, gt=0, description="How often a node-agent reclaims what no live "
                                                                  "job owns (instance leftovers, GPUs on vfio-pci).")
    max_inflight: int = Field(128, ge=1, le=4096, description="Messages one consumer handles at once.")

    deadline_pending_s: float = Field(3600, gt=0, description="Longest a job may wait for capacity.")
    deadline_placed_s: float = Field(60, gt=0, description="Longest a node may take to accept.")
    deadline_provisioning_s: float = Field(900, gt=0, description="Longest from accept to a running VM.")
    deadline_run_grace_s: float = Field(300, gt=0, description="Beyond a job's max_runtime_s before it is failed.")
    deadline_teardown_s: float = Field(300, gt=0, description="Longest from exit to a torn-down instance.")

    images_dir: Path | None = Field(None, description="Signed image bundles <dir>/<image>/; default <state>/images.")
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
    instances_dir: Path | None = Field(None, description="Per-instance work dirs; default <state_dir>/instances.")

    node_id: str | None = Field(None, description="The node-agent's node id (default: from the hostname).")

    tpm: str | None = Field(None, description="The node's TPM as a tss2 TCTI: device:/dev/tpmrm0 on hosts, "
                            "swtpm:host=127.0.0.1,port=P for swtpm; unset: no TPM (the node is never trusted).")
    tpm_ak_algorithm: str = Field("ecc-p256", pattern="^(ecc-p256|rsa-2048)$", description="Attestation key type.")
    measurement_pcr: int = Field(15, ge=0, le=23, description="PCR the agent extends with its measurement log.")
    measurement_log: Path | None = Field(None, description="Append-only measurement log; default "
                                         "<state_dir>/tpm/measurements-<node>.jsonl.")
    attest_interval_s: float = Field(60.0, gt=0, description="Node re-attestation period (plus jitter).")
    attest_jitter_s: float = Field(10.0, ge=0)
    attest_timeout_s: float = Field(30.0, gt=0, description="Longest an instance waits for its verdict.")
    key_release_timeout_s: float = Field(30.0, gt=0, description="Longest an attested instance waits for its "
                                                                 "volume key from the key-broker.")
    client_secrets_timeout_s: float = Field(300.0, gt=0, description="Longest an attested instance waits for "
                                                                     "its client to verify it and release secrets.")
    attest_policy: Path | None = Field(None, description="The verifier's attestation policy (JSON); default "
                                       "<state_dir>/attestation-policy.json.")

    kek_source: str = Field("", max_length=1024, description="Where the key-broker's KEK ring comes from: "
                            "file:PATH (passphrase file), tpm:PATH?pcrs=0,7 (sealed to QVM_TPM), "
                            "kms:module:factory (plug-in); empty: a development passphrase file under "
                            "<state_dir>/keys, created on first use (protects nothing at rest).")
    kek_passphrase_file: Path | None = Field(None, description="File holding the KEK passphrase for a file: "
                                             "source (else QVM_KEK_PASSPHRASE); never logged.")

    @property
    def pki_path(self) -> Path:
        return self.pki_dir or self.state_dir / "pki"

    @property
    def images_path(self) -> Path:
        return self.images_dir or self.state_dir / "images"

    @property
    def instances_path(self) -> Path:
        return self.instances_dir or self.state_dir / "instances"

    @property
    def attest_policy_path(self) -> Path:
        return self.attest_policy or self.state_dir / "attestation-policy.json"

    def measurement_log_path(self, node_id: str) -> Path:
        return self.measurement_log or self.state_dir / "tpm" / f"measurements-{node_id}.jsonl"

    def publisher_key_files(self) -> list[Path]:
        return self.publisher_keys or sorted(self.images_path.glob("*.pub"))

    def resolve_nats_url(self) -> str:
        if self.nats_url:
            return self.nats_url
        f = self.state_dir / "nats.url"
        if f.exists():
            return f.read_text().strip()
        raise ConfigError("no NATS url: set QVM_NATS_URL or start the embedded stack with `qvm up`")
