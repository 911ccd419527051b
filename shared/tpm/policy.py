"""The attestation policy (what an approved node and instance look like) and the appraisal of evidence.

`AttestationPolicy` is a file the platform's operators own (`qvm attest policy` writes one from the
images, agent and VMM at hand). `appraise()` turns a quote that already verified (shared.tpm.quote) into
a verdict: static PCR values, the measurement log replayed to the quoted measurement PCR, every entry
against the allow-lists, the firmware deny-list. `check_counters()` compares the TPM's boot counters
with what enrollment recorded for the AK: a reset or restart means the host rebooted (or the TPM was
power-cycled under it) and the node must enroll again.

Everything here is pure, so the verifier service, `qvm attest verify` and the tests share it.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator

from shared.cvm.evidence import CvmPolicy
from shared.errors import ConfigError
from shared.models import Frozen
from shared.tpm.measurements import (
    AgentMeasurement,
    AssignmentMeasurement,
    InstanceMeasurement,
    LogError,
    parse_log,
    replay,
)
from shared.tpm.quote import ALLOWED_AK_ALGORITHMS, QuoteError
from shared.tpm.structures import Attest

__all__ = ["Appraisal", "AttestationPolicy", "Counters", "ImageReference", "appraise", "check_counters", "load_policy"]

_HEX64 = r"^[0-9a-f]{64}$"


class ImageReference(Frozen):
    """An approved image: its manifest digest (the key) names exactly these parts."""

    name: str = Field(max_length=128)
    kernel_sha256: str = Field(pattern=_HEX64)
    initrd_sha256: str = Field(pattern=_HEX64)
    rootfs_sha256: str = Field(pattern=_HEX64)
    vmlinux_sha256: str | None = Field(None, pattern=_HEX64, description="The same kernel as an ELF image, where "
                                       "the manifest ships one (Firecracker, Cloud Hypervisor, QEMU's PVH boot).")

    def kernels(self) -> tuple[str, ...]:
        """The kernel digests a launch of this image may name: its bzImage, or its ELF vmlinux."""
        return (self.kernel_sha256, *((self.vmlinux_sha256,) if self.vmlinux_sha256 else ()))


class AttestationPolicy(Frozen):
    measurement_pcr: int = Field(15, ge=0, le=23, description="The PCR the node-agent extends (not resettable).")
    pcrs: tuple[int, ...] = Field((15,), max_length=24, description="PCRs every quote must cover (sha256 bank).")
    pcr_values: dict[int, str] = Field(default_factory=dict,
                                       description="Expected values of static PCRs (firmware, boot loader).")
    agents: tuple[str, ...] = Field((), description="Approved node-agent code digests.")
    images: dict[str, ImageReference] = Field(default_factory=dict, description="Approved images by manifest digest.")
    vmms: dict[str, tuple[str, ...]] = Field(default_factory=dict, description="Approved VMM binaries: digest -> "
                                                                              "the VMM drivers it may serve.")
    security_policies: tuple[str, ...] = Field((), description="Approved instance security-policy digests.")
    ak_algorithms: tuple[str, ...] = tuple(sorted(ALLOWED_AK_ALGORITHMS))
    firmware_denylist: tuple[str, ...] = Field((), description="TPM firmwareVersion values (16 hex digits) "
                                                               "with known flaws (ROCA, TPM-Fail).")
    require_ek_certificate: bool = Field(True, description="Refuse EKs without a certificate from `ek_ca`.")
    ek_ca: Path | None = Field(None, description="PEM bundle of TPM manufacturer CAs that sign EK certificates.")
    require_safe_clock: bool = True
    nonce_ttl_s: float = Field(30.0, gt=0, le=600)
    result_ttl_s: float = Field(150.0, gt=0, description="How long a node result keeps the node trusted.")
    reattest_interval_s: float = Field(60.0, gt=0)
    cvm: CvmPolicy = Field(CvmPolicy(), description="Confidential VMs: SEV-SNP and TDX report checks.")
    guards: tuple[str, ...] = Field((), description="Approved runtime-guard digests (eBPF programs + rules).")
    require_guard: bool = Field(False, description="Every agent measurement must name an approved runtime guard: "
                                                   "a node without it, or with other rules, fails attestation.")

    @field_validator("vmms", mode="before")
    @classmethod
    def _one_driver_as_a_tuple(cls, value: object) -> object:
        """Policies written before a binary could serve several drivers name one: read it as a tuple of one."""
        if isinstance(value, dict):
            return {k: (v,) if isinstance(v, str) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _measurement_pcr_quoted(self) -> AttestationPolicy:
        if self.measurement_pcr not in self.pcrs:
            raise ValueError(f"measurement PCR {self.measurement_pcr} must be among the quoted PCRs {self.pcrs}")
        if len(set(self.pcrs)) != len(self.pcrs):
            raise ValueError("PCRs listed twice")
        return self


def load_policy(path: Path) -> AttestationPolicy:
    try:
        return AttestationPolicy.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"attestation policy {path}: {exc.strerror}") from None
    except ValidationError as exc:
        raise ConfigError(f"attestation policy {path}: {exc.errors()[0].get('msg', 'invalid')}") from None


@dataclass(frozen=True)
class Appraisal:
    agent: AgentMeasurement | None
    instances: Mapping[str, InstanceMeasurement]
    pcr: bytes
    # instance id -> the runtime guard (digest, "" for none) the agent had loaded when it launched the instance
    instance_guards: Mapping[str, str] = field(default_factory=dict)


def _not_allowed(what: str) -> QuoteError:
    return QuoteError("measurement_not_allowed", what)


def _assigned(launched: InstanceMeasurement | None, a: AssignmentMeasurement) -> InstanceMeasurement:
    """A warm instance's launch, now bound to its job: only an instance launched warm (no job), with the key
    it was launched with, and only once (a warm instance is never reused)."""
    if launched is None:
        raise QuoteError("assignment_unlaunched", f"the log assigns instance {a.instance_id}, which it never launched")
    if launched.job_id:
        raise QuoteError("instance_reassigned", f"instance {a.instance_id} already served job {launched.job_id}")
    if launched.public_key != a.public_key:
        raise QuoteError("assignment_key_mismatch", f"instance {a.instance_id} was assigned under another key")
    return launched.model_copy(update={"job_id": a.job_id})


def appraise(policy: AttestationPolicy, attest: Attest, pcr_values: Mapping[int, bytes],
             raw_log: Sequence[object]) -> Appraisal:
    """Check a verified quote's PCRs and log against the policy; raises `QuoteError` on the first problem."""
    for index, want in policy.pcr_values.items():
        got = pcr_values.get(index)
        if got is None or got.hex() != want:
            raise QuoteError("pcr_value_not_allowed", f"PCR {index} is not the approved value")
    firmware = f"{attest.firmware_version:016x}"
    if firmware in policy.firmware_denylist:
        raise QuoteError("firmware_denied", f"TPM firmware {firmware} is on the deny-list")
    try:
        entries = parse_log(raw_log)
    except LogError as exc:
        raise QuoteError(exc.reason, exc.detail) from None
    pcr = pcr_values.get(policy.measurement_pcr, b"")
    if not hmac.compare_digest(replay(entries), pcr):
        raise QuoteError("log_replay_mismatch", f"the measurement log ({len(entries)} entries) does not replay to "
                                                f"the quoted PCR {policy.measurement_pcr}")
    agent: AgentMeasurement | None = None
    instances: dict[str, InstanceMeasurement] = {}
    guards: dict[str, str] = {}
    for e in entries:
        if isinstance(e, AssignmentMeasurement):
            instances[e.instance_id] = _assigned(instances.get(e.instance_id), e)
            continue
        if isinstance(e, AgentMeasurement):
            if e.agent_sha256 not in policy.agents:
                raise _not_allowed(f"agent code {e.agent_sha256[:16]}… is not approved")
            if e.guard_sha256 and e.guard_sha256 not in policy.guards and (policy.require_guard or policy.guards):
                raise QuoteError("guard_not_approved", f"runtime guard {e.guard_sha256[:16]}… is not approved")
            agent = e
            continue
        image = policy.images.get(e.image_manifest_sha256)
        if image is None:
            raise _not_allowed(f"image {e.image_manifest_sha256[:16]}… ({e.instance_id}) is not approved")
        if e.kernel_sha256 not in image.kernels() or (e.initrd_sha256, e.rootfs_sha256) != (
                image.initrd_sha256, image.rootfs_sha256):
            raise _not_allowed(f"instance {e.instance_id} booted parts that are not image {image.name}'s")
        if e.vmm not in policy.vmms.get(e.vmm_sha256, ()):
            raise _not_allowed(f"VMM binary {e.vmm_sha256[:16]}… ({e.vmm}) is not approved")
        if e.security_policy_sha256 not in policy.security_policies:
            raise _not_allowed(f"instance {e.instance_id} ran under an unapproved security policy")
        instances[e.instance_id] = e
        guards[e.instance_id] = agent.guard_sha256 if agent else ""
    if agent is None:
        raise QuoteError("log_incomplete", "the log has no agent measurement")
    # What runs now is what the last agent entry says (an earlier run without the guard, since restarted with
    # it, is history); an instance's own quote also needs the guard that was loaded when it was launched.
    if policy.require_guard and not agent.guard_sha256:
        raise QuoteError("guard_missing", "the agent runs without its runtime guard (or the guard stopped)")
    return Appraisal(agent, instances, pcr, guards)


@dataclass(frozen=True)
class Counters:
    reset_count: int
    restart_count: int
    clock: int


def check_counters(policy: AttestationPolicy, enrolled: Counters, attest: Attest) -> Counters:
    """Boot counters must match enrollment; the clock must be safe and must not run backwards."""
    c = attest.clock
    if c.reset_count != enrolled.reset_count or c.restart_count != enrolled.restart_count:
        if (c.reset_count, c.restart_count) < (enrolled.reset_count, enrolled.restart_count):
            raise QuoteError("counter_regressed", "TPM reset/restart counters went backwards")
        raise QuoteError("tpm_rebooted", f"TPM reset {enrolled.reset_count}->{c.reset_count}, restart "
                                         f"{enrolled.restart_count}->{c.restart_count}: re-enrollment required")
    if policy.require_safe_clock and not c.safe:
        raise QuoteError("clock_unsafe", "the TPM reports its clock as not safe")
    if c.clock < enrolled.clock:
        raise QuoteError("clock_regressed", "the TPM clock went backwards")
    return Counters(c.reset_count, c.restart_count, c.clock)
