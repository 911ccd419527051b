"""Settings from environment variables (`QVM_*`): the part every qvm process shares, and the groups that
shared code reads.

Each service loads its own class (`services/<name>/settings.py`, e.g. `SchedulerSettings`), which holds only
the fields that service reads: `CommonSettings` plus the groups below it needs. Every variable is defined
once: a field that one service alone reads lives in that service's class; one that shared code (the CLI,
the KEK sources) or several services read lives here, in the group named for what it is about.

Defaults give the embedded single-machine stack; a real deployment sets `QVM_NATS_URL` to its NATS
cluster, `QVM_PKI_DIR` to the directory holding this process's certificates, and tunes the rest.
Logging and tracing are read from the environment by `shared.telemetry` (`QVM_LOG_LEVEL`,
`QVM_TRACE_FILE`) before any settings are loaded.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError

__all__ = [
    "CommonSettings",
    "ConsumerSettings",
    "KekSettings",
    "MeasurementSettings",
    "NodeSettings",
    "PolicySettings",
    "StackSettings",
    "SweepSettings",
    "TpmSettings",
]


class CommonSettings(BaseSettings):
    """What every process reads: where its state and certificates are, how it reaches NATS, and the stream
    settings that provisioning (`qvm provision`, `qvm up`) applies."""

    model_config = SettingsConfigDict(env_prefix="QVM_", env_file=None, extra="ignore")

    state_dir: Path = Field(Path(".qvm"), description="Embedded stack state: PKI, NATS store, logs.")
    nats_url: str | None = Field(None, description="External NATS (tls://...). Unset: the embedded server.")
    pki_dir: Path | None = Field(None, description="Certificates; default <state_dir>/pki.")

    stream_replicas: int = Field(1, ge=1, le=5, description="JetStream replicas per stream (3 on a cluster).")
    stream_max_age_s: float = Field(90 * 86400, gt=0, description="How long lifecycle events are kept.")
    dead_letter_max_age_s: float = Field(30 * 86400, gt=0)
    duplicate_window_s: float = Field(600, gt=0, description="Nats-Msg-Id dedupe window.")

    @property
    def pki_path(self) -> Path:
        return self.pki_dir or self.state_dir / "pki"

    def resolve_nats_url(self) -> str:
        if self.nats_url:
            return self.nats_url
        f = self.state_dir / "nats.url"
        if f.exists():
            return f.read_text().strip()
        raise ConfigError("no NATS url: set QVM_NATS_URL or start the embedded stack with `qvm up`")


class ConsumerSettings(CommonSettings):
    """For services that handle their work-queue consumer concurrently (scheduler, verifier, key-broker)."""

    max_inflight: int = Field(128, ge=1, le=4096, description="Messages one consumer handles at once.")


class SweepSettings(CommonSettings):
    """For services with a periodic sweep (scheduler, janitor, verifier)."""

    sweep_interval_s: float = Field(2.0, gt=0)


class TpmSettings(CommonSettings):
    """The host's TPM: the node-agent's, and the key-broker's for a TPM-sealed KEK ring."""

    tpm: str | None = Field(None, description="The node's TPM as a tss2 TCTI: device:/dev/tpmrm0 on hosts, "
                            "swtpm:host=127.0.0.1,port=P for swtpm; unset: no TPM (the node is never trusted).")


class MeasurementSettings(CommonSettings):
    """The PCR the node-agent extends with its measurement log, which clients check in its quotes."""

    measurement_pcr: int = Field(15, ge=0, le=23, description="PCR the agent extends with its measurement log.")


class NodeSettings(TpmSettings, MeasurementSettings):
    """This machine as a node: read by its node-agent and by the CLI that sets one up (`qvm pki init`,
    `qvm up`, the demo)."""

    node_id: str | None = Field(None, description="The node-agent's node id (default: from the hostname).")
    images_dir: Path | None = Field(None, description="Signed image bundles <dir>/<image>/; default <state>/images.")
    guard: str = Field("auto", pattern="^(off|auto|required)$",
                       description="The eBPF runtime guard over every VMM: auto loads it where the kernel allows "
                                   "(BPF LSM) and runs without it elsewhere (a node the policy then may not trust), "
                                   "required refuses to start without it, off never loads it.")

    @property
    def images_path(self) -> Path:
        return self.images_dir or self.state_dir / "images"


class KekSettings(TpmSettings):
    """Where the key-broker's KEK ring comes from: read by the key-broker and `qvm keys`."""

    kek_source: str = Field("", max_length=1024, description="Where the key-broker's KEK ring comes from: "
                            "file:PATH (passphrase file), tpm:PATH?pcrs=0,7 (sealed to QVM_TPM), "
                            "kms:module:factory (plug-in); empty: a development passphrase file under "
                            "<state_dir>/keys, created on first use (protects nothing at rest).")
    kek_passphrase_file: Path | None = Field(None, description="File holding the KEK passphrase for a file: "
                                             "source (else QVM_KEK_PASSPHRASE); never logged.")


class PolicySettings(CommonSettings):
    """The attestation policy: read by the verifier, written by `qvm up`."""

    attest_policy: Path | None = Field(None, description="The verifier's attestation policy (JSON); default "
                                       "<state_dir>/attestation-policy.json.")

    @property
    def attest_policy_path(self) -> Path:
        return self.attest_policy or self.state_dir / "attestation-policy.json"


class StackSettings(NodeSettings, PolicySettings):
    """`qvm up` and the demo: this machine's node and TPM, the images, the verifier's policy. The services
    they start read their own settings from the environment `qvm up` gives them."""
