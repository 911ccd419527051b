"""The one failure type of CVM evidence checks: `reason` is a stable code (the CLI prints it and exits 1, the
verifier publishes it in `instance.attestation_failed`), `detail` a sentence for a human."""

from __future__ import annotations

import hashlib

from shared.errors import ReasonedError

__all__ = ["CvmError", "expected_report_data"]


class CvmError(ReasonedError):
    """CVM evidence that must not be trusted (malformed, badly signed, outside policy)."""


def expected_report_data(nonce: bytes, key: bytes) -> bytes:
    """The 64-byte REPORT_DATA a qvm guest asks its CPU to sign: the same binding as a TPM quote's extraData
    (SHA-256 of the challenge nonce and the instance's X25519 key), zero-padded to the field's width."""
    return hashlib.sha256(nonce + key).digest() + bytes(32)
