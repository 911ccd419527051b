"""The one error type of `shared.crypto` (its own module so every submodule can import it cheaply)."""

from __future__ import annotations

from shared.errors import ReasonedError

__all__ = ["CryptoError"]


class CryptoError(ReasonedError):
    """A key could not be sealed, opened, wrapped, unwrapped or loaded.

    `reason` is a stable code (unwrap_failed, bad_recipient_key, unknown_kek_version, bad_passphrase,
    kek_file_corrupt, tpm_policy_mismatch, ...); `detail` says what happened and never holds key material.
    """
