"""The node's measurement log: what the agent extended into its measurement PCR, entry by entry.

The node-agent appends an entry and extends the PCR with the entry's digest, in that order, for
    agent     its own code digest and security-relevant configuration, once per boot of the host TPM
    instance  every instance before its VMM starts: image manifest, kernel, initrd, command line, VMM
              binary, security policy and the instance's ephemeral public key (the job it was started for;
              none for a warm instance, booted ahead of any job)
    assignment  a warm instance given to a job: which instance (and key), which job; once per instance
A verifier replays the log (PCR := SHA-256(PCR || digest), from zero) and compares the result with the
quoted PCR: a log that was edited, reordered or truncated no longer replays. The digest of an entry is
recomputed from its content, so an entry cannot claim one digest and describe another.

Entries carry digests and public keys only, never a secret; the log is safe to publish.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError

from shared.errors import ReasonedError
from shared.models import Frozen

__all__ = [
    "AgentMeasurement",
    "AssignmentMeasurement",
    "Entry",
    "InstanceMeasurement",
    "LogError",
    "Measurement",
    "entry_digest",
    "parse_log",
    "replay",
]

_HEX64 = r"^[0-9a-f]{64}$"
MAX_LOG_ENTRIES = 10_000


class LogError(ReasonedError):
    """A measurement log that is unreadable or does not replay (`reason` malformed_log / log_replay_mismatch)."""


class AgentMeasurement(Frozen):
    kind: Literal["agent"] = "agent"
    node_id: str = Field(max_length=64)
    agent_version: str = Field(max_length=64)
    agent_sha256: str = Field(pattern=_HEX64, description="Digest of the agent's code (shared.tpm.code_digest).")
    config_sha256: str = Field(pattern=_HEX64, description="Digest of the agent's security settings.")
    config: dict[str, str] = Field(default_factory=dict, max_length=32, description="Those settings, readable.")
    guard_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$",
                              description="The runtime guard loaded (its BPF programs, rules and loader); empty: "
                                          "none. A guard that stops is logged as a new entry with none.")


class InstanceMeasurement(Frozen):
    kind: Literal["instance"] = "instance"
    instance_id: str = Field(max_length=64)
    job_id: str = Field(max_length=64, description="The job it was launched for; empty: a warm instance (its "
                                                   "job comes with an assignment entry).")
    image_manifest_sha256: str = Field(pattern=_HEX64)
    kernel_sha256: str = Field(pattern=_HEX64)
    initrd_sha256: str = Field(pattern=_HEX64)
    rootfs_sha256: str = Field(pattern=_HEX64)
    cmdline: str = Field(max_length=4096)
    vmm: str = Field(max_length=32)
    vmm_sha256: str = Field(pattern=_HEX64, description="Digest of the VMM binary that runs the instance.")
    security_policy_sha256: str = Field(pattern=_HEX64)
    security_policy: dict[str, str] = Field(default_factory=dict, max_length=32)
    public_key: str = Field(pattern=_HEX64, description="The instance's ephemeral X25519 public key.")


class AssignmentMeasurement(Frozen):
    """A warm instance (launched with no job) given to a job. A verifier accepts one per instance, for an
    instance the log launched warm, with the same key: the quote then binds that job to that launch."""

    kind: Literal["assignment"] = "assignment"
    instance_id: str = Field(max_length=64)
    job_id: str = Field(min_length=1, max_length=64)
    public_key: str = Field(pattern=_HEX64, description="The instance's key, as its launch entry gave it.")


Entry = AgentMeasurement | InstanceMeasurement | AssignmentMeasurement
Measurement = Annotated[Entry, Field(discriminator="kind")]
_LOG = TypeAdapter(list[Measurement])


def canonical(entry: Entry) -> bytes:
    return json.dumps(entry.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def entry_digest(entry: Entry) -> bytes:
    return hashlib.sha256(canonical(entry)).digest()


def digest_of(values: dict[str, str]) -> str:
    """The digest of a small settings map (the agent's config, an instance's security policy)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_log(raw: Sequence[object]) -> list[Entry]:
    if len(raw) > MAX_LOG_ENTRIES:
        raise LogError("malformed_log", f"{len(raw)} entries (at most {MAX_LOG_ENTRIES})")
    try:
        return _LOG.validate_python(list(raw), strict=True)  # bus data: types exact, as the codec checks them
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        msg = errors[0]["msg"] if errors else "invalid"
        raise LogError("malformed_log", f"entry {where}: {msg}"[:300]) from None


def replay(entries: Iterable[Entry], start: bytes = b"\x00" * 32) -> bytes:
    pcr = start
    for e in entries:
        pcr = hashlib.sha256(pcr + entry_digest(e)).digest()
    return pcr
