"""The key-broker's settings (`QVM_*`): the common ones, its KEK source and its consumer."""

from __future__ import annotations

from shared.config import ConsumerSettings, KekSettings

__all__ = ["KeyBrokerSettings"]


class KeyBrokerSettings(KekSettings, ConsumerSettings):
    """Nothing of its own: the KEK source (`QVM_KEK_SOURCE`, `QVM_KEK_PASSPHRASE_FILE`, `QVM_TPM` for a
    TPM-sealed ring) and `QVM_MAX_INFLIGHT`."""
