"""The event catalogue: the single source of truth for every event's schema, subject, stream and parties.

Each lifecycle event is one `EventSpec`: its payload model, its subject template, the stream (domain)
that stores it and the roles allowed to produce it. Who consumes it is declared once, by the consumers and
readers themselves (`shared/consumers.py`: `consumers_of`). Nothing in qvm builds a
subject string by hand: services call `subject_for(...)`, the NATS permission generator and the docs
generator read `CATALOGUE`, and the codec checks every received event against its spec.

Subject templates use `{job_id}`, `{node_id}` and `{producer}`; `node_scoped` events carry the producing
node's id in the subject, which is what lets the NATS server itself refuse a node-agent that publishes
for another node.

One module (over 700 lines) on purpose: every payload model sits next to the spec that publishes it, so the
catalogue is the one place to read what any event carries, where it goes and who may send it.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from shared.crypto import CryptoError
from shared.crypto.hpke import ENC_BYTES, TAG_BYTES, check_public_key
from shared.errors import Reason
from shared.identity import JobId, NodeId, Role
from shared.models import (
    Frozen,
    HardwareProfile,
    Inventory,
    MemoryScrub,
    ResourceClaim,
    SecurityLevel,
    TrustState,
    VolumeErasure,
    VramScrub,
    field_or,
)

__all__ = [
    "CATALOGUE",
    "DEAD_LETTER_SUBJECT",
    "OUTPUT_CHUNK_BYTES",
    "STREAMS",
    "AttestChallenge",
    "AttestEvidence",
    "AttestPurpose",
    "AttestRequested",
    "AttestationFailed",
    "AttestationResult",
    "BootBreakdown",
    "CvmEvidence",
    "CvmKind",
    "Domain",
    "EnrollRequested",
    "EventRejected",
    "EventSpec",
    "EventType",
    "GpuEvidence",
    "GuardAction",
    "GuardPolicy",
    "InstanceAttestationFailed",
    "InstanceAttested",
    "InstanceBooted",
    "InstanceDestroyed",
    "InstanceExited",
    "InstanceFailed",
    "InstanceOutput",
    "InstanceProvisioning",
    "InstanceRunning",
    "InstanceSuspicious",
    "JobAccepted",
    "JobCancelRequested",
    "JobCancelled",
    "JobDone",
    "JobFailed",
    "JobPending",
    "JobPlaced",
    "JobRefused",
    "JobSubmitted",
    "KeyDestruction",
    "KeyReleasePolicy",
    "KeyReleaseRefused",
    "KeyReleased",
    "KeysDestroyed",
    "NodeCleared",
    "NodeHeartbeat",
    "NodeOffline",
    "NodeRegistered",
    "NodeRevoked",
    "NodeSwept",
    "NodeTampered",
    "SecretsReleased",
    "Severity",
    "StreamSpec",
    "TeardownRecord",
    "TeardownRequested",
    "TeardownStep",
    "VerifiedClaims",
    "scope_filter",
    "spec_for",
    "subject_for",
]


class Domain(StrEnum):
    """One JetStream stream per lifecycle domain."""

    JOBS = "jobs"
    NODES = "nodes"
    ATTESTATION = "attestation"
    KEYS = "keys"
    TEARDOWN = "teardown"
    DEAD = "dead"  # dead letters and `event.rejected` reports


@dataclass(frozen=True)
class StreamSpec:
    domain: Domain
    name: str
    subjects: tuple[str, ...]
    description: str


STREAMS: Mapping[Domain, StreamSpec] = {
    d: StreamSpec(d, f"QVM_{d.value.upper()}", (f"qvm.{d.value}.>",), desc)
    for d, desc in [
        (Domain.JOBS, "Job lifecycle: submission, placement, acceptance, failure, cancellation."),
        (Domain.NODES, "Node registration, heartbeats and liveness."),
        (Domain.ATTESTATION, "Challenges, evidence and attestation results."),
        (Domain.KEYS, "Wrapped key releases and key destruction."),
        (Domain.TEARDOWN, "Teardown requests and wipe evidence."),
        (Domain.DEAD, "Poison messages with the reason, and signed event.rejected reports."),
    ]
}


class EventType(StrEnum):
    JOB_SUBMITTED = "job.submitted"
    JOB_PENDING = "job.pending"
    JOB_PLACED = "job.placed"
    JOB_ACCEPTED = "job.accepted"
    JOB_REFUSED = "job.refused"
    JOB_CANCEL_REQUESTED = "job.cancel_requested"
    JOB_CANCELLED = "job.cancelled"
    JOB_FAILED = "job.failed"
    JOB_DONE = "job.done"
    INSTANCE_PROVISIONING = "instance.provisioning"
    INSTANCE_BOOTED = "instance.booted"
    INSTANCE_RUNNING = "instance.running"
    INSTANCE_OUTPUT = "instance.output"
    INSTANCE_EXITED = "instance.exited"
    INSTANCE_FAILED = "instance.failed"
    INSTANCE_DESTROYED = "instance.destroyed"
    INSTANCE_ATTESTED = "instance.attested"
    INSTANCE_ATTESTATION_FAILED = "instance.attestation_failed"
    INSTANCE_SUSPICIOUS = "instance.suspicious"
    NODE_REGISTERED = "node.registered"
    NODE_HEARTBEAT = "node.heartbeat"
    NODE_OFFLINE = "node.offline"
    NODE_SWEPT = "node.swept"
    NODE_REVOKED = "node.revoked"
    NODE_TAMPERED = "node.tampered"
    NODE_CLEARED = "node.cleared"
    ATTEST_ENROLL_REQUESTED = "attest.enroll_requested"
    ATTEST_REQUESTED = "attest.requested"
    ATTEST_CHALLENGE = "attest.challenge"
    ATTEST_EVIDENCE = "attest.evidence"
    ATTEST_VERIFIED = "attest.verified"
    ATTEST_FAILED = "attest.failed"
    ATTEST_REVOKED = "attest.revoked"
    KEY_RELEASED = "key.released"
    KEY_RELEASE_REFUSED = "key.release_refused"
    KEYS_DESTROYED = "key.destroyed"
    SECRETS_RELEASED = "key.secrets_released"
    TEARDOWN_REQUESTED = "teardown.requested"
    TEARDOWN_RECORD = "teardown.record"
    EVENT_REJECTED = "event.rejected"


# ---------------------------------------------------------------- payloads


_HEX64 = r"^[0-9a-f]{64}$"


MIN_VOLUME_MIB = 16


class KeyReleasePolicy(Frozen):
    """What an attested instance must show before the key-broker releases the job's volume key to it."""

    allowed_images: tuple[Annotated[str, StringConstraints(pattern=_HEX64)], ...] = Field(
        (), max_length=64, description="Image manifest digests (hex SHA-256) the key may go to; empty: any image "
                                       "the verifier's policy approved.")
    min_trust: TrustState = Field(TrustState.TRUSTED, description="Lowest trust the attestation result may carry.")
    max_result_age_s: int = Field(120, ge=1, le=3600, description="How old a verified result may be at release.")


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class GuardAction(StrEnum):
    """What the instance's security policy makes of a runtime-guard finding."""

    RECORD = "record"  # reported only
    STOP = "stop"  # the workload is stopped: the job fails with suspicious_activity, full teardown, keys destroyed
    REVOKE_NODE = "revoke_node"  # also the node: host-side tampering, untrusted until an operator clears it


class GuardPolicy(Frozen):
    """What each severity of runtime-guard finding does to the job's instance. The platform's floor applies
    whatever the job says: a critical finding always stops the workload, and a host process reaching into
    the instance (its memory, its files) always revokes the node too; a job can only ask for more."""

    info: GuardAction = GuardAction.RECORD
    warning: GuardAction = GuardAction.RECORD
    critical: GuardAction = GuardAction.STOP


class JobSubmitted(Frozen):
    """A client's job, as the marketplace hands it to qvm."""

    owner: str = Field(max_length=128, description="The client (marketplace account) that owns the job.")
    image: str = Field(max_length=512, description="Guest image reference (a signed image bundle).")
    command: tuple[str, ...] = Field((), max_length=256, description="Workload argv inside the guest.")
    profile: HardwareProfile = HardwareProfile()
    security: SecurityLevel = SecurityLevel.BASIC
    max_runtime_s: int = Field(3600, ge=1, le=30 * 86400, description="Hard limit on the workload's run time.")
    egress: tuple[str, ...] = Field((), max_length=64, description="Destinations the guest may reach (host:port); "
                                    "empty: none. Nodes that cannot enforce an allowlist refuse such jobs.")
    volume_mib: int = Field(0, ge=0, le=1 << 20, description="An encrypted (LUKS2) data volume of this size at "
                            "/data, its key released by the key-broker after attestation; 0: none.")
    client_secrets: bool = Field(False, description="The workload waits for the client's own secret bundle "
                                 "(verified and released by the client, mounted at /run/secrets).")
    key_release: KeyReleasePolicy = KeyReleasePolicy()
    runtime_guard: GuardPolicy = Field(GuardPolicy(), description="What runtime-guard findings do (per severity).")
    output_key: str | None = Field(None, pattern=_HEX64, description="The client's X25519 public key (hex): each "
                                   "chunk of the workload's output is HPKE-sealed to it (`instance.output`), so "
                                   "only the client reads it. Without one, NO output is published at all "
                                   "(`instance.exited` still says how many bytes the workload wrote).")

    @field_validator("volume_mib")
    @classmethod
    def _volume_size(cls, v: int) -> int:
        if 0 < v < MIN_VOLUME_MIB:
            raise ValueError(f"a data volume needs at least {MIN_VOLUME_MIB} MiB (LUKS2 header and a file system)")
        return v

    @field_validator("output_key")
    @classmethod
    def _output_key(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_public_key(bytes.fromhex(v))
            except CryptoError as exc:
                raise ValueError(f"not a usable X25519 public key ({exc.detail})") from None
        return v


class JobPending(Frozen):
    """No node can take the job now; it stays queued and is retried when capacity appears."""

    reason: str = Field(max_length=64, examples=["no_capacity", "no_trusted_node"])
    detail: str = Field("", max_length=1024)


class JobPlaced(Frozen):
    """The assignment: what the node must run, and what was reserved for it there."""

    node_id: NodeId
    attempt: int = Field(ge=0, description="Placement attempt; a refusal starts the next one.")
    claim: ResourceClaim
    job: JobSubmitted


class JobAccepted(Frozen):
    node_id: NodeId
    attempt: int = Field(ge=0)


class JobRefused(Frozen):
    node_id: NodeId
    attempt: int = Field(ge=0)
    reason: str = Field(max_length=64, examples=["insufficient_ram", "gpu_missing"])
    detail: str = Field("", max_length=1024)


class JobCancelRequested(Frozen):
    reason: str = Field("client_request", max_length=256)


class JobCancelled(Frozen):
    reason: str = Field(max_length=256)


class JobFailed(Frozen):
    reason: str = Field(max_length=64, examples=["deadline_exceeded", "node_lost"])
    detail: str = Field("", max_length=1024)
    phase: str = Field("", max_length=32, description="The job state the failure happened in.")


class JobDone(Frozen):
    """The job's instance exited and was torn down."""

    exit_code: int | None = Field(None, ge=0, le=255)


_INSTANCE_ID = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class InstanceProvisioning(Frozen):
    """The node-agent verified the image and is starting a micro VM for the job."""

    instance_id: str = _INSTANCE_ID
    image: str = Field(max_length=128)
    image_manifest_sha256: str = Field(pattern=_HEX64, description="SHA-256 of the signed manifest.")
    vmm: str = Field(max_length=32)
    public_key: str = Field(pattern=_HEX64, description="The instance's ephemeral X25519 public key (hex).")


class BootBreakdown(Frozen):
    """Where a boot's time went, in milliseconds, in order; they add up to `InstanceBooted.boot_ms`. The
    guest's stages come from its init's uptime stamps (the guest's clock starts with its kernel's)."""

    accel_probe_ms: float = Field(0.0, ge=0, le=86_400_000,
                                  description="Waiting for the host's KVM-or-TCG answer (0 once known: it is asked "
                                              "once per host boot, when the agent starts).")
    vmm_start_ms: float = Field(0.0, ge=0, le=86_400_000,
                                description="The VMM process started and configured (QEMU spawned; Firecracker "
                                            "and Cloud Hypervisor through their API up to InstanceStart).")
    firmware_ms: float = Field(0.0, ge=0, le=86_400_000,
                               description="From the VMM running to the guest kernel's clock starting: firmware, "
                                           "kernel and initramfs loading, decompression (and READY's trip to "
                                           "the host, which the guest's clock cannot see).")
    kernel_ms: float = Field(0.0, ge=0, le=86_400_000, description="Guest kernel start to init (PID 1).")
    modules_ms: float = Field(0.0, ge=0, le=86_400_000,
                              description="init loading kernel modules (0 with qvm's minimal kernel: none).")
    channel_ms: float = Field(0.0, ge=0, le=86_400_000, description="init waiting for the host channel's device.")
    disks_ms: float = Field(0.0, ge=0, le=86_400_000,
                            description="Waiting for the root and scratch disks, mounting the read-only root.")
    scratch_ms: float = Field(0.0, ge=0, le=86_400_000, description="Opening the scratch disk's dm-crypt mapping.")
    mkfs_ms: float = Field(0.0, ge=0, le=86_400_000, description="Formatting the encrypted scratch disk (ext4).")
    overlay_ms: float = Field(0.0, ge=0, le=86_400_000,
                              description="The overlay root and its /proc, /sys, /dev (and the network, if any).")
    ready_ms: float = Field(0.0, ge=0, le=86_400_000, description="From init's last stage to sending READY.")


class InstanceBooted(Frozen):
    instance_id: str = _INSTANCE_ID
    boot_ms: float = Field(ge=0, description="VMM start to the guest init's READY.")
    accel: str = Field(max_length=16, description="kvm or tcg.")
    kernel: str = Field("", max_length=128, description="The guest kernel's release (the image manifest's).")
    breakdown: BootBreakdown | None = Field(None, description="Where the boot's time went (None from a guest "
                                                              "init that sends no stamps).")
    warm: bool = Field(False, description="The instance was taken from the node's warm pool: booted before "
                                          "the job was assigned (`boot_ms` is that earlier boot).")


class InstanceRunning(Frozen):
    instance_id: str = _INSTANCE_ID


OUTPUT_CHUNK_BYTES = 64 * 1024
"""The most workload output one `instance.output` chunk seals."""
_SEALED_OVERHEAD = ENC_BYTES + TAG_BYTES  # HPKE enc and the AEAD tag around each sealed chunk
_SEALED_HEX = r"^([0-9a-f]{2})+$"


class InstanceOutput(Frozen):
    """A chunk of the workload's output, HPKE-sealed to the client's `output_key` (only jobs with one get any):
    the platform, the operator and every other reader of the job stream see ciphertext only."""

    instance_id: str = _INSTANCE_ID
    seq: int = Field(ge=0, description="Chunk number: 0, 1, 2, ... with no gap; bound into the seal.")
    suite: str = Field(max_length=64, description="HPKE suite (RFC 9180 base mode).")
    sealed: str = Field(pattern=_SEALED_HEX, min_length=2 * _SEALED_OVERHEAD,
                        max_length=2 * (OUTPUT_CHUNK_BYTES + _SEALED_OVERHEAD),
                        description="HPKE enc || ciphertext (hex) of up to 64 KiB of output, sealed to the job's "
                                    "output_key; the info binds the purpose (output), job id, instance id and seq.")


class InstanceExited(Frozen):
    instance_id: str = _INSTANCE_ID
    exit_code: int = Field(ge=0, le=255)
    runtime_ms: float = Field(ge=0)
    output_sha256: str = Field(pattern=_HEX64, description="SHA-256 over the sealed chunks as published (in seq "
                               "order, each as its 4-byte big-endian length then its sealed bytes), never over the "
                               "plaintext: the client checks it has every chunk as sent, nobody can confirm a "
                               "guess of the output. No chunk published: the SHA-256 of nothing.")
    output_bytes: int = Field(ge=0, description="Bytes the workload wrote in all, published or not.")
    output_chunks: int = Field(ge=0, description="Chunks published (seq 0 to output_chunks - 1); 0 when the job "
                                                 "gave no output_key.")
    output_truncated: bool = Field(False, description="Only the first MiB was sealed and published; the rest is "
                                                      "counted in output_bytes only.")


class InstanceFailed(Frozen):
    instance_id: str = _INSTANCE_ID
    reason: str = Field(max_length=64, examples=["image_digest_mismatch", "boot_timeout"])
    detail: str = Field("", max_length=1024)


class InstanceSuspicious(Frozen):
    """A runtime-guard finding (eBPF) about one instance: the rule, the process, the evidence, and what the
    instance's security policy did about it."""

    instance_id: str = _INSTANCE_ID
    rule: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    severity: Severity
    enforced: bool = Field(description="The kernel denied the operation (BPF LSM), not only reported it.")
    action: GuardAction
    pid: int = Field(ge=0)
    comm: str = Field("", max_length=16)
    target_pid: int = Field(0, ge=0)
    detail: str = Field("", max_length=256, description="The file, the access mode, the address family.")
    detected_ns: int = Field(ge=0)


class InstanceDestroyed(Frozen):
    instance_id: str = _INSTANCE_ID
    removed: tuple[str, ...] = Field((), max_length=64, description="What the agent removed (no secrets).")
    volume: VolumeErasure | None = Field(None, description="The encrypted data volume's erasure, with evidence.")
    ram: MemoryScrub | None = Field(None, description="The guest RAM's scrub, with evidence.")
    gpus: tuple[VramScrub, ...] = Field((), max_length=16, description="Each GPU's VRAM scrub, with evidence.")


class NodeRegistered(Frozen):
    inventory: Inventory
    agent_version: str = Field(max_length=64)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)


class NodeHeartbeat(Frozen):
    seq: int = Field(ge=0, description="Monotonic per agent run.")
    jobs: tuple[JobId, ...] = Field((), max_length=4096, description="Jobs the agent currently holds.")
    draining: bool = Field(False, description="The hoster drains the node (`qvm node drain`): it refuses new "
                                              "jobs and finishes the ones it holds; the scheduler places nothing "
                                              "there until a heartbeat says false again.")


class NodeOffline(Frozen):
    last_seen_ns: int = Field(ge=0)
    reason: str = Field("heartbeat_timeout", max_length=64)


class NodeWithdrawn(Frozen):
    """The operator withdraws a node from the platform (`qvm node revoke`, or the hoster's uninstall): its
    bus identity is already gone; the verifier withdraws its trust, which stops its jobs and their keys."""

    reason: str = Field(max_length=64, examples=["operator_revoked", "node_left"])
    detail: str = Field("", max_length=1024)


class NodeTampered(Frozen):
    """The node's runtime guard saw a host process reach into an instance (its memory, its files): the node
    must lose its trust until an operator looked and cleared it (`qvm node clear`)."""

    rule: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    instance_id: str = _INSTANCE_ID
    pid: int = Field(ge=0)
    comm: str = Field("", max_length=16)
    detail: str = Field("", max_length=256)


class NodeCleared(Frozen):
    """The operator cleared a node the runtime guard had revoked: it may enroll and attest again."""

    reason: str = Field(max_length=256, examples=["investigated: test host, tampering by an operator's script"])


class NodeSwept(Frozen):
    """A node's sweep found what no live job owns (after an agent crash): GPUs left on vfio-pci, given back
    and scrubbed. A verified scrub here lists a quarantined GPU again."""

    reason: str = Field(max_length=32, examples=["agent_restart", "sweep"])
    gpus: tuple[VramScrub, ...] = Field((), max_length=16)


class TeardownRequested(Frozen):
    node_id: NodeId
    reason: str = Field(max_length=64)


# ---------------------------------------------------------------- attestation

_HEX = r"^([0-9a-f]{2})*$"


class AttestPurpose(StrEnum):
    ENROLL = "enroll"  # credential activation + first node quote
    NODE = "node"  # a node-level quote (re-attestation)
    INSTANCE = "instance"  # a quote bound to one instance's ephemeral key, before its workload runs


class EnrollRequested(Frozen):
    """A node-agent presents its TPM: the EK (identity), its certificate, and a new attestation key."""

    ek_public: str = Field(pattern=_HEX, max_length=2048, description="TPM2B_PUBLIC of the EK (hex).")
    ek_certificate: str = Field("", pattern=_HEX, max_length=8192, description="EK certificate, DER (hex).")
    ak_public: str = Field(pattern=_HEX, max_length=2048, description="TPM2B_PUBLIC of the AK (hex).")
    ak_qualified_name: str = Field(pattern=_HEX, max_length=140, description="The AK's Qualified Name (hex).")
    node_key: str = Field(pattern=_HEX64, description="SHA-256 of the node's event-signing public key.")


class AttestRequested(Frozen):
    """A node asks to be challenged: on its re-attestation schedule, or for an instance about to run."""

    purpose: AttestPurpose
    instance_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    job_id: JobId | None = None
    key: str = Field(pattern=_HEX64, description="The key the quote binds: the instance's X25519 public key, "
                                                 "or the SHA-256 of the node's signing key.")


class AttestChallenge(Frozen):
    """A verifier's challenge: a single-use nonce (or, to enroll, an encrypted credential)."""

    challenge_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    purpose: AttestPurpose
    instance_id: str | None = Field(None, max_length=64)
    job_id: JobId | None = None
    nonce: str = Field("", pattern=_HEX, max_length=64)
    pcrs: tuple[int, ...] = Field(max_length=24)
    expires_ns: int = Field(ge=0)
    credential_blob: str = Field("", pattern=_HEX, max_length=1024, description="TPM2B_ID_OBJECT (enroll).")
    encrypted_secret: str = Field("", pattern=_HEX, max_length=1024, description="TPM2B_ENCRYPTED_SECRET.")


class GpuEvidence(Frozen):
    """A GPU's confidential-computing attestation report, fetched with the challenge's nonce."""

    uuid: str = Field(max_length=96)
    cc_mode: str = Field(max_length=32)
    report: str = Field("", pattern=_HEX, max_length=16384)
    certificate_chain: str = Field("", max_length=32768)


class CvmKind(StrEnum):
    """The confidential-VM technologies qvm verifies."""

    SEV_SNP = "sev-snp"
    TDX = "tdx"


class CvmEvidence(Frozen):
    """A confidential VM's hardware report, fetched inside the guest (configfs-tsm) with REPORT_DATA bound to
    the challenge's nonce and the instance key, and passed out by the agent unchanged (it cannot forge one)."""

    kind: CvmKind
    report: str = Field(pattern=_HEX, min_length=2, max_length=2 * 16384,
                        description="SEV-SNP: the attestation report (1184 bytes); TDX: the quote (hex).")
    certificates: str = Field("", pattern=_HEX, max_length=2 * 16384,
                              description="SEV-SNP: the extended report's certificate table or the VCEK (DER); "
                                          "TDX: unused (the PCK chain is inside the quote).")


class AttestEvidence(Frozen):
    """The node's answer: a quote, the quoted PCR values and the measurement log that explains them."""

    challenge_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    purpose: AttestPurpose
    instance_id: str | None = Field(None, max_length=64)
    job_id: JobId | None = None
    attest: str = Field(pattern=_HEX, max_length=2048, description="TPMS_ATTEST (hex).")
    signature: str = Field(pattern=_HEX, max_length=1200, description="TPMT_SIGNATURE (hex).")
    pcrs: dict[int, str] = Field(max_length=24, description="Quoted sha256 PCR values (hex) by index.")
    log: tuple[dict[str, object], ...] = Field((), max_length=10_000, description="The measurement log.")
    gpus: tuple[GpuEvidence, ...] = Field((), max_length=16)
    cvm: CvmEvidence | None = Field(None, description="The guest's confidential-VM report (confidential instances).")


class AttestationResult(Frozen):
    """A verifier's signed verdict (the envelope's signature makes it an attestation result)."""

    purpose: AttestPurpose
    challenge_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    evidence_id: str = Field(max_length=64, description="Event id of the evidence that was appraised.")
    instance_id: str | None = Field(None, max_length=64)
    job_id: JobId | None = None
    trust: TrustState
    ak_name: str = Field(pattern=_HEX, max_length=140)
    ek_sha256: str = Field(pattern=_HEX64)
    agent_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    image_manifest_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    vmm_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    public_key: str = Field("", pattern=r"^([0-9a-f]{64})?$", description="The attested instance key.")
    pcr_sha256: str = Field(pattern=_HEX64, description="The measurement PCR's quoted value.")
    reset_count: int = Field(ge=0)
    restart_count: int = Field(ge=0)
    firmware_version: str = Field(max_length=16)
    gpus: tuple[str, ...] = Field((), max_length=16, description="Per-GPU evidence outcome.")
    cvm: CvmKind | None = Field(None, description="Set only when the instance's confidential-VM report verified "
                                                  "(signature, vendor chain, policy, REPORT_DATA binding).")
    cvm_measurement: str = Field("", pattern=r"^([0-9a-f]{96})?$", description="SNP MEASUREMENT / TDX MRTD.")
    cvm_tcb: str = Field("", max_length=128, description="The verified TCB (SNP reported TCB, TDX TCB status).")
    verified_ns: int = Field(ge=0)
    expires_ns: int = Field(ge=0)


class InstanceAttested(AttestationResult):
    """The verdict on an instance's quote (same fields; its own event type on the job's subject)."""


class AttestationFailed(Frozen):
    purpose: AttestPurpose
    challenge_id: str = Field("", pattern=r"^([0-9a-f]{32})?$")
    instance_id: str | None = Field(None, max_length=64)
    job_id: JobId | None = None
    reason: str = Field(max_length=64, examples=["nonce_mismatch", "pcr_digest_mismatch", "tpm_rebooted"])
    detail: str = Field("", max_length=1024)


class InstanceAttestationFailed(AttestationFailed):
    """An instance's quote failed; the instance must not run."""


class NodeRevoked(Frozen):
    """A node's trust is withdrawn: its instances are stopped and its keys revoked."""

    reason: str = Field(max_length=64, examples=["attestation_failed", "attestation_deadline_missed"])
    detail: str = Field("", max_length=1024)
    last_verified_ns: int = Field(0, ge=0)


# ---------------------------------------------------------------- keys

_SEALED = r"^[0-9a-f]{66,512}$"


class KeyReleased(Frozen):
    """The job's volume key, sealed with HPKE to the attested instance's ephemeral key (never in the clear)."""

    instance_id: str = _INSTANCE_ID
    result_id: str = Field(max_length=64, description="Event id of the attestation result the release rests on.")
    suite: str = Field(max_length=64, description="HPKE suite (RFC 9180 base mode).")
    sealed: str = Field(pattern=_SEALED, description="HPKE enc || ciphertext of the key (hex); the info binds "
                                                     "the purpose, job id and instance id.")
    kek_version: int = Field(ge=1, description="The key-encryption key version the stored copy is wrapped under.")
    released_ns: int = Field(ge=0)
    lease_expires_ns: int = Field(ge=0, description="The attestation result's expiry.")


class KeyReleaseRefused(Frozen):
    instance_id: str = _INSTANCE_ID
    result_id: str = Field("", max_length=64)
    reason: str = Field(max_length=64, examples=["result_expired", "wrong_instance_key", "image_not_allowed",
                                                 "replayed_release", "node_revoked", "second_instance"])
    detail: str = Field("", max_length=1024)


class KeyDestruction(Frozen):
    """Evidence of one key's destruction (no key material: digests and counts only)."""

    kek_version: int = Field(0, ge=0)
    wrapped_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$", description="Digest of the deleted wrapped copy.")
    wrapped_deleted: bool = Field(description="The wrapped copy was replaced by a tombstone in the key store.")
    store_revision: int = Field(0, ge=0, description="Key-store revision of the tombstone.")
    revisions_erased: int = Field(0, ge=0, description="Key-store revisions still holding the wrapped key at "
                                                      "destruction, each erased (its bytes overwritten by the "
                                                      "store) before this report; none is left. Earlier "
                                                      "revisions were erased as they were superseded.")
    plaintext_buffers_zeroed: int = Field(0, ge=0, description="Plaintext key buffers overwritten in the broker.")
    released_to: str = Field("", max_length=64, description="The instance that held the key, if any.")


class KeysDestroyed(Frozen):
    reason: str = Field(max_length=64, examples=["instance_destroyed", "job_failed", "node_revoked"])
    volume: KeyDestruction | None = None
    destroyed_ns: int = Field(ge=0)


class VerifiedClaims(Frozen):
    """What a client checked itself before releasing its secrets (kept on the bus for audit)."""

    result_id: str = Field(max_length=64)
    evidence_id: str = Field(max_length=64)
    node_id: NodeId
    image_manifest_sha256: str = Field(pattern=_HEX64)
    pcr_sha256: str = Field(pattern=_HEX64)
    ak_name: str = Field(pattern=_HEX, max_length=140)


class SecretsReleased(Frozen):
    """A client's secret bundle, sealed with HPKE to the instance key it verified; the broker never sees it."""

    instance_id: str = _INSTANCE_ID
    suite: str = Field(max_length=64)
    sealed: str = Field(pattern=_HEX, min_length=66, max_length=600_000, description="HPKE enc || ciphertext "
                        "(hex) of the msgpack bundle {name: bytes}; the info binds job and instance ids.")
    verified: VerifiedClaims


# ---------------------------------------------------------------- teardown


class TeardownStep(Frozen):
    name: str = Field(max_length=128, examples=["guest_ram", "vram:GPU-…", "volume", "keys", "instance"])
    status: Literal["ok", "failed", "missing", "not_needed"]
    detail: str = Field("", max_length=512)


class TeardownRecord(Frozen):
    """The end of a job: one signed record of what was wiped, how many bytes, by which method, whether it
    verified, and how long it took. `complete` is true only when every wipe the job needed verified."""

    node: str = Field("", max_length=64, description="The node the job ran on (not in the subject: a record "
                                                      "is the janitor's, one per job).")
    instance_id: str = Field("", max_length=64)
    outcome: str = Field(max_length=16, examples=["done", "failed", "cancelled"])
    reason: str = Field("", max_length=64)
    complete: bool
    steps: tuple[TeardownStep, ...] = Field(max_length=64)
    ram: MemoryScrub | None = None
    gpus: tuple[VramScrub, ...] = Field((), max_length=16)
    volume: VolumeErasure | None = None
    keys: KeyDestruction | None = None
    removed: tuple[str, ...] = Field((), max_length=64)
    gpus_clean: tuple[str, ...] = Field((), max_length=16, description="GPU UUIDs the node may list again: "
                                        "scrubbed and verified, or never handed to the job's VM.")
    gpus_quarantined: tuple[str, ...] = Field((), max_length=16, description="GPUs held back: no verified scrub.")
    ended_ns: int = Field(ge=0, description="When the job reached its end state.")
    recorded_ns: int = Field(ge=0)
    duration_ms: float = Field(ge=0, description="Job end (or instance exit) to instance destroyed.")


class EventRejected(Frozen):
    """A consumer refused a message before any handler saw it; the raw message is in the dead letters."""

    consumer: str = Field(max_length=128)
    subject: str = Field(max_length=512)
    stream_seq: int = Field(ge=0)
    reason: Reason
    detail: str = Field(max_length=1024)
    size: int = Field(ge=0)


# ---------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class EventSpec:
    type: EventType
    payload: builtins.type[Frozen]
    domain: Domain
    subject: str  # template
    producers: frozenset[Role]
    description: str
    version: int = 1

    @property
    def node_scoped(self) -> bool:
        """The producer's node id is part of the subject (node-agent events)."""
        return Role.NODE_AGENT in self.producers and "{node_id}" in self.subject


_ALL_SERVICES = frozenset(
    {Role.SCHEDULER, Role.NODE_AGENT, Role.ATTESTATION_VERIFIER, Role.KEY_BROKER, Role.JANITOR}
)
_R = Role


def _spec(t: EventType, payload: type[Frozen], subject: str, producers: set[Role], description: str) -> EventSpec:
    domain = Domain(subject.split(".")[1])
    return EventSpec(t, payload, domain, subject, frozenset(producers), description)


_SPECS = [
    _spec(EventType.JOB_SUBMITTED, JobSubmitted, "qvm.jobs.{job_id}.submitted",
          {_R.MARKETPLACE}, "A client job enters qvm."),
    _spec(EventType.JOB_PENDING, JobPending, "qvm.jobs.{job_id}.pending",
          {_R.SCHEDULER}, "No node fits now; the job waits for capacity."),
    _spec(EventType.JOB_PLACED, JobPlaced, "qvm.jobs.{job_id}.placed.{node_id}",
          {_R.SCHEDULER}, "Capacity reserved on a node; the subject is that node's assignment queue."),
    _spec(EventType.JOB_ACCEPTED, JobAccepted, "qvm.jobs.{job_id}.accepted.{node_id}",
          {_R.NODE_AGENT}, "The node's own hardware check passed."),
    _spec(EventType.JOB_REFUSED, JobRefused, "qvm.jobs.{job_id}.refused.{node_id}",
          {_R.NODE_AGENT}, "The node's hardware check failed; the scheduler releases the claim and places again."),
    _spec(EventType.JOB_CANCEL_REQUESTED, JobCancelRequested, "qvm.jobs.{job_id}.cancel_requested",
          {_R.MARKETPLACE}, "The client asks to stop the job."),
    _spec(EventType.JOB_CANCELLED, JobCancelled, "qvm.jobs.{job_id}.cancelled",
          {_R.SCHEDULER, _R.JANITOR}, "The job was cancelled."),
    _spec(EventType.JOB_FAILED, JobFailed, "qvm.jobs.{job_id}.failed",
          {_R.SCHEDULER, _R.JANITOR}, "The job failed, with a reason code."),
    _spec(EventType.JOB_DONE, JobDone, "qvm.jobs.{job_id}.done",
          {_R.JANITOR}, "The job's instance exited and was torn down."),
    _spec(EventType.INSTANCE_PROVISIONING, InstanceProvisioning, "qvm.jobs.{job_id}.instance.provisioning.{node_id}",
          {_R.NODE_AGENT}, "Image verified; a micro VM is being started (with its public key)."),
    _spec(EventType.INSTANCE_BOOTED, InstanceBooted, "qvm.jobs.{job_id}.instance.booted.{node_id}",
          {_R.NODE_AGENT}, "The guest init answered over the host channel."),
    _spec(EventType.INSTANCE_RUNNING, InstanceRunning, "qvm.jobs.{job_id}.instance.running.{node_id}",
          {_R.NODE_AGENT}, "The workload started inside the guest."),
    _spec(EventType.INSTANCE_OUTPUT, InstanceOutput, "qvm.jobs.{job_id}.instance.output.{node_id}",
          {_R.NODE_AGENT}, "Workload output, sealed to the client's output key."),
    _spec(EventType.INSTANCE_EXITED, InstanceExited, "qvm.jobs.{job_id}.instance.exited.{node_id}",
          {_R.NODE_AGENT}, "The workload ended: exit code, run time, output digest."),
    _spec(EventType.INSTANCE_FAILED, InstanceFailed, "qvm.jobs.{job_id}.instance.failed.{node_id}",
          {_R.NODE_AGENT}, "The instance could not start or run; nothing of it is left running."),
    _spec(EventType.INSTANCE_SUSPICIOUS, InstanceSuspicious, "qvm.jobs.{job_id}.instance.suspicious.{node_id}",
          {_R.NODE_AGENT}, "The runtime guard (eBPF) saw something the instance's policy forbids, and what it did."),
    _spec(EventType.INSTANCE_DESTROYED, InstanceDestroyed, "qvm.jobs.{job_id}.instance.destroyed.{node_id}",
          {_R.NODE_AGENT}, "VMM stopped, descriptors closed, work directory removed."),
    _spec(EventType.INSTANCE_ATTESTED, InstanceAttested, "qvm.jobs.{job_id}.instance.attested.{node_id}",
          {_R.ATTESTATION_VERIFIER}, "The instance's quote verified: it may receive keys and run."),
    _spec(EventType.INSTANCE_ATTESTATION_FAILED, InstanceAttestationFailed,
          "qvm.jobs.{job_id}.instance.attestation_failed.{node_id}",
          {_R.ATTESTATION_VERIFIER}, "The instance's quote did not verify (reason code); it never runs."),
    _spec(EventType.NODE_REGISTERED, NodeRegistered, "qvm.nodes.{node_id}.registered",
          {_R.NODE_AGENT}, "A node-agent announces itself with its measured inventory."),
    _spec(EventType.NODE_HEARTBEAT, NodeHeartbeat, "qvm.nodes.{node_id}.heartbeat",
          {_R.NODE_AGENT}, "A node-agent is alive."),
    _spec(EventType.NODE_SWEPT, NodeSwept, "qvm.nodes.{node_id}.swept",
          {_R.NODE_AGENT}, "Leftovers no live job owns were reclaimed; GPUs scrubbed, with evidence."),
    _spec(EventType.NODE_REVOKED, NodeWithdrawn, "qvm.nodes.{node_id}.revoked",
          {_R.ADMIN}, "The operator withdrew a node: its certificates no longer open the bus; its trust goes next."),
    _spec(EventType.NODE_TAMPERED, NodeTampered, "qvm.nodes.{node_id}.tampered",
          {_R.NODE_AGENT}, "A host process reached into an instance: the node's trust goes until it is cleared."),
    _spec(EventType.NODE_CLEARED, NodeCleared, "qvm.nodes.{node_id}.cleared",
          {_R.ADMIN}, "The operator cleared a node the runtime guard revoked: it may attest again."),
    _spec(EventType.NODE_OFFLINE, NodeOffline, "qvm.nodes.{node_id}.offline",
          {_R.SCHEDULER}, "A node's heartbeats stopped."),
    _spec(EventType.ATTEST_ENROLL_REQUESTED, EnrollRequested, "qvm.attestation.{node_id}.enroll",
          {_R.NODE_AGENT}, "A node presents its EK and a new AK."),
    _spec(EventType.ATTEST_REQUESTED, AttestRequested, "qvm.attestation.{node_id}.requested",
          {_R.NODE_AGENT}, "A node asks for a challenge (schedule, or an instance)."),
    _spec(EventType.ATTEST_CHALLENGE, AttestChallenge, "qvm.attestation.{node_id}.challenge",
          {_R.ATTESTATION_VERIFIER}, "A single-use nonce, or an encrypted credential to activate."),
    _spec(EventType.ATTEST_EVIDENCE, AttestEvidence, "qvm.attestation.{node_id}.evidence",
          {_R.NODE_AGENT}, "A quote, its PCR values and the measurement log."),
    _spec(EventType.ATTEST_VERIFIED, AttestationResult, "qvm.attestation.{node_id}.verified",
          {_R.ATTESTATION_VERIFIER}, "The node's quote verified: it is trusted until the result expires."),
    _spec(EventType.ATTEST_FAILED, AttestationFailed, "qvm.attestation.{node_id}.failed",
          {_R.ATTESTATION_VERIFIER}, "The node's enrollment or quote failed, with a reason code; it is untrusted."),
    _spec(EventType.ATTEST_REVOKED, NodeRevoked, "qvm.attestation.{node_id}.revoked",
          {_R.ATTESTATION_VERIFIER},
          "A node lost its trust (failed or missed re-attestation): stop its instances, revoke its keys."),
    _spec(EventType.KEY_RELEASED, KeyReleased, "qvm.keys.{job_id}.released.{node_id}",
          {_R.KEY_BROKER},
          "The job's volume key, sealed to the attested instance's key (released to one instance at a time)."),
    _spec(EventType.KEY_RELEASE_REFUSED, KeyReleaseRefused, "qvm.keys.{job_id}.refused.{node_id}",
          {_R.KEY_BROKER}, "No key for this instance (reason code); the instance never runs."),
    _spec(EventType.KEYS_DESTROYED, KeysDestroyed, "qvm.keys.{job_id}.destroyed",
          {_R.KEY_BROKER}, "The job's keys are gone from the broker's memory and store, with evidence."),
    _spec(EventType.SECRETS_RELEASED, SecretsReleased, "qvm.keys.{job_id}.secrets.{node_id}",
          {_R.MARKETPLACE},
          "A client verified the instance's evidence itself and sealed its secrets to the instance key."),
    _spec(EventType.TEARDOWN_REQUESTED, TeardownRequested, "qvm.teardown.{job_id}.requested.{node_id}",
          {_R.JANITOR}, "Tear a job down on its node and free its claim."),
    _spec(EventType.TEARDOWN_RECORD, TeardownRecord, "qvm.teardown.{job_id}.record",
          {_R.JANITOR},
          "One per finished job: what was wiped and how, verified or not; GPUs return to the pool only here."),
    _spec(EventType.EVENT_REJECTED, EventRejected, "qvm.dead.rejected.{producer}",
          set(_ALL_SERVICES), "A consumer dead-lettered a message, with the reason."),
]

DEAD_LETTER_SUBJECT = "qvm.dead.raw.{producer}.{consumer}"
"""Raw poison messages, stored unchanged with `Qvm-Reason`, `Qvm-Detail`, `Qvm-Subject`, `Qvm-Consumer` and
`Qvm-Stream-Seq` headers; not an envelope, so not a catalogue entry. The subject names the identity and the
durable consumer that dead-lettered the message (the server lets each identity publish only under its own
consumers' names), and every raw copy is paired with a signed `event.rejected` from that identity naming the
same consumer, stream sequence and subject: that pair is what proves a dead letter's origin."""

CATALOGUE: Mapping[EventType, EventSpec] = {s.type: s for s in _SPECS}
_BY_NAME: Mapping[str, EventSpec] = {s.type.value: s for s in _SPECS}
_BY_PAYLOAD: Mapping[type[Frozen], EventSpec] = {s.payload: s for s in _SPECS}


def spec_for(type_name: str) -> EventSpec | None:
    return _BY_NAME.get(type_name)


def spec_of_payload(payload: Frozen) -> EventSpec:
    return _BY_PAYLOAD[type(payload)]


def subject_for(
    spec: EventSpec, *, job_id: str | None = None, node_id: str | None = None, producer: str | None = None
) -> str:
    """Render a spec's subject; every placeholder it names must be given."""
    values = {"job_id": job_id, "node_id": node_id, "producer": producer}
    needed = {k: values[k] for k in _placeholders(spec.subject)}
    missing = [k for k, v in needed.items() if not v]
    if missing:
        raise ValueError(f"{spec.type}: subject needs {', '.join(missing)}")
    return spec.subject.format(**needed)


@functools.cache
def _placeholders(template: str) -> tuple[str, ...]:
    """The ids a subject template names (once per template: every event encoded or decoded renders one)."""
    return tuple(k for k in ("job_id", "node_id", "producer") if "{" + k + "}" in template)


def subject_filter(spec: EventSpec, **fixed: str) -> str:
    """The subject with every placeholder not fixed replaced by a wildcard (for consumers, permissions)."""
    values = {"job_id": "*", "node_id": "*", "producer": ">"}
    values.update(fixed)
    return spec.subject.format(**values)


def scope_filter(domain: Domain, scope: str) -> str:
    """Every event of one job (jobs, keys, teardown streams) or one node (nodes, attestation): the catalogue's
    subjects all put that id right after the domain."""
    if not scope or any(c in scope for c in ".*> "):
        raise ValueError(f"invalid subject scope {scope[:80]!r}")
    return f"{STREAMS[domain].subjects[0].removesuffix('>')}{scope}.>"


def payload_field_node(payload: Frozen) -> str | None:
    """Events whose payload names a node (placed/accepted/refused) must agree with their subject."""
    node = field_or(payload, "node_id", None)
    return node if isinstance(node, str) else None
