"""A tiny external-KMS plug-in for the `kms:` KEK source tests (`kms:tests.unit.kek_kms_plugin:factory`).

A real plug-in would fetch (or unwrap) the KEKs from its KMS; this one derives them from a seed in an
environment variable, which is exactly as good as it sounds: test use only.
"""

from __future__ import annotations

import hashlib
import os

from shared.crypto.kek import KekRing

SEED_ENV = "QVM_TEST_KMS_SEED"


class EnvSeedKms:
    def __init__(self, seed: str, versions: int) -> None:
        self.seed = seed
        self.versions = versions

    def load(self) -> KekRing:
        keys = {v: bytearray(hashlib.sha256(f"{self.seed}/{v}".encode()).digest()) for v in range(1, self.versions + 1)}
        return KekRing(keys, {v: 1_700_000_000_000_000_000 + v for v in keys}, source="kms:test")

    def describe(self) -> str:
        return f"test KMS ({self.versions} versions)"


def factory() -> EnvSeedKms:
    return EnvSeedKms(os.environ.get(SEED_ENV, "seed"), int(os.environ.get("QVM_TEST_KMS_VERSIONS", "2")))


def not_a_source() -> object:
    return object()


def broken() -> EnvSeedKms:
    raise RuntimeError("KMS unreachable")


NOT_CALLABLE = 42
