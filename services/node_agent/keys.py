"""Sealed keys and client secrets on their way to this node's instances.

    key-broker --key.released / key.release_refused--> `resolve` --> `wait_key` (the instance's run)
    client     --key.secrets_released-->               `resolve` --> `wait_secrets`

A release can arrive before the instance's run starts waiting for it (the broker answers the verdict as
fast as the agent does), so whatever arrives first creates the slot. Only ciphertext passes through here:
the instance's private key opens it (`Instance.open_sealed`), in RAM, just before the guest gets it: the
job's keys phase, after the attestation verdict and before the workload runs (`KeyInbox.deliver`).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from services.node_agent.instance import Instance, InstanceError
from shared.client.bundle import BundleError, unpack_bundle
from shared.codec import Event
from shared.crypto.errors import CryptoError
from shared.crypto.secret import zeroize
from shared.errors import ReasonedError
from shared.events import KeyReleased, KeyReleaseRefused, SecretsReleased
from shared.telemetry import get_logger

__all__ = ["KeyError_", "KeyInbox"]

log = get_logger("qvm.node_agent.keys")
T = TypeVar("T")
MAX_PENDING = 4096  # slots for instances not (or no longer) waiting: bounded against a flood


class KeyError_(ReasonedError):
    """No key for an instance: refused by the broker, or none in time."""


class KeyInbox:
    def __init__(self) -> None:
        self._keys: dict[str, asyncio.Future[KeyReleased]] = {}
        self._secrets: dict[str, asyncio.Future[SecretsReleased]] = {}

    def resolve(self, event: Event) -> None:
        p = event.payload
        if isinstance(p, KeyReleaseRefused):
            slot = _slot(self._keys, p.instance_id)
            if slot is not None and not slot.done():
                slot.set_exception(KeyError_(f"key_{p.reason}"[:64], p.detail))
        elif isinstance(p, KeyReleased):
            _settle(_slot(self._keys, p.instance_id), p)
        elif isinstance(p, SecretsReleased):
            _settle(_slot(self._secrets, p.instance_id), p)

    async def wait_key(self, instance_id: str, timeout_s: float) -> KeyReleased:
        return await _wait(self._keys, instance_id, timeout_s, "key_timeout", "no key release")

    async def wait_secrets(self, instance_id: str, timeout_s: float) -> SecretsReleased:
        return await _wait(self._secrets, instance_id, timeout_s, "secrets_timeout", "no client secrets")

    async def deliver(self, instance: Instance, volume: bool, secrets: bool, key_timeout_s: float,
                      secrets_timeout_s: float) -> None:
        """After the verdict: the volume key from the key-broker, then the client's own secrets, each opened
        with the instance's private key in RAM and handed to the guest over its channel only."""
        instance_id = instance.spec.instance_id
        try:
            if volume:
                release = await self.wait_key(instance_id, key_timeout_s)
                dek = await asyncio.to_thread(instance.open_sealed, bytes.fromhex(release.sealed), "dek")
                try:
                    uuid = await instance.unlock_volume(dek)
                finally:
                    zeroize(dek)
                log.info("volume opened in the guest", extra={"instance_id": instance_id, "luks_uuid": uuid})
            if secrets:
                sealed = await self.wait_secrets(instance_id, secrets_timeout_s)
                raw = await asyncio.to_thread(instance.open_sealed, bytes.fromhex(sealed.sealed), "client-secrets")
                try:
                    files = unpack_bundle(raw)
                finally:
                    zeroize(raw)
                await instance.deliver_secrets(files)
                log.info("client secrets delivered", extra={"instance_id": instance_id, "files": len(files)})
        except (KeyError_, CryptoError, BundleError) as exc:
            raise InstanceError(exc.reason, exc.detail) from None

    def forget(self, instance_id: str) -> None:
        """The instance is gone: drop its slots (and anything that arrived for it)."""
        for table in (self._keys, self._secrets):
            slot: asyncio.Future[Any] | None = table.pop(instance_id, None)
            if slot is None:
                continue
            if not slot.done():
                slot.cancel()
            elif not slot.cancelled():
                slot.exception()  # retrieved: no "exception never retrieved" warning


def _slot(table: dict[str, asyncio.Future[T]], instance_id: str) -> asyncio.Future[T] | None:
    slot = table.get(instance_id)
    if slot is None:
        if len(table) >= MAX_PENDING:
            return None
        slot = asyncio.get_running_loop().create_future()
        table[instance_id] = slot
    return slot


def _settle(slot: asyncio.Future[T] | None, value: T) -> None:
    if slot is not None and not slot.done():
        slot.set_result(value)  # the first answer counts (a redelivery or a second release changes nothing)


async def _wait(table: dict[str, asyncio.Future[T]], instance_id: str, timeout_s: float, reason: str,
                what: str) -> T:
    slot = _slot(table, instance_id)
    if slot is None:
        raise KeyError_("agent_overloaded", "too many pending key slots")
    try:
        return await asyncio.wait_for(asyncio.shield(slot), timeout_s)
    except TimeoutError:
        raise KeyError_(reason, f"{what} within {timeout_s:g}s") from None
