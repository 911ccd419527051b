"""One exception tree for all of qvm.

    QvmError
    ├── ConfigError              bad settings, missing files, unusable paths
    ├── PkiError                 certificates and signing keys: missing, expired, not issued by our CA
    ├── BusError                 NATS / JetStream failures, translated at the boundary
    ├── ReasonedError            a failure with a stable reason code that events report
    │     (ImageError, VmmError, InstanceError, ChannelError, NetworkError, CgroupError)
    ├── RejectedEvent            a message that must never reach a handler (carries a `Reason`)
    ├── TransitionNotAllowed     an event that would move a job through an illegal transition
    └── JobSpecError             a job description a client submitted is invalid

Foreign exceptions (nats-py, cryptography, pydantic, msgpack) are translated where they enter qvm,
with `raise ... from exc`, so callers only ever catch `QvmError` subclasses.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "EXIT_WITHDRAWN",
    "BusError",
    "ConfigError",
    "JobSpecError",
    "NotYet",
    "PkiError",
    "QvmError",
    "Reason",
    "ReasonedError",
    "RejectedEvent",
    "TransitionNotAllowed",
    "Unauthorized",
]


class QvmError(Exception):
    """Root of every error qvm raises on purpose."""


class ConfigError(QvmError):
    """Settings or files that qvm cannot work with."""


class PkiError(QvmError):
    """Certificates and signing keys that are missing or untrusted."""


class NotYet(QvmError):
    """A handler met an event before one it depends on (the replicas of a work queue handle a job's events
    concurrently, so a later event can overtake an earlier one): the bus hands it back after a short delay,
    as no failure. The handler decides, from `Event.deliveries`, when to stop waiting."""


class Unauthorized(QvmError):
    """The bus refused this identity's certificate: it is not, or no longer, a member (withdrawn). Retrying
    cannot help; a node-agent stops its instances and exits with `EXIT_WITHDRAWN`."""


EXIT_WITHDRAWN = 3
"""The exit status of a service whose identity was withdrawn (the systemd unit does not restart on it)."""


class BusError(QvmError):
    """The message bus failed (connection, JetStream API, permissions)."""


class ReasonedError(QvmError):
    """A failure reported on the bus: `reason` is a stable code, `detail` a human sentence (never secret)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Reason(StrEnum):
    """Why a message was rejected before any handler saw it (machine-readable, stable)."""

    MALFORMED = "malformed"  # not msgpack, wrong shape, wrong types
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_SIGNER = "unknown_signer"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_TYPE = "unknown_type"
    PRODUCER_NOT_ALLOWED = "producer_not_allowed"
    SUBJECT_MISMATCH = "subject_mismatch"
    SCHEMA_INVALID = "schema_invalid"
    ILLEGAL_TRANSITION = "illegal_transition"
    HANDLER_FAILED = "handler_failed"  # redelivery budget spent
    JOB_EXISTS = "job_exists"  # a second job.submitted for a job id the stream already holds (a replay)
    SUBMISSION_STALE = "submission_stale"  # a submission older than the job stream keeps its history


class RejectedEvent(QvmError):
    """A message failed validation; `reason` says which check, `detail` says how (never secret)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class TransitionNotAllowed(QvmError):
    """An event would move a job from a state that does not allow it."""

    def __init__(self, job_id: str, state: str, event_type: str) -> None:
        super().__init__(f"job {job_id}: {event_type} not allowed in state {state}")
        self.job_id = job_id
        self.state = state
        self.event_type = event_type


class JobSpecError(QvmError):
    """A submitted job description is not valid."""
