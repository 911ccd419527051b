"""Warm instances: micro VMs booted to READY before any job asks, so a job's time to running is attestation,
key release and RUN, not a boot.

The hoster configures the pool per image and size (`QVM_WARM_POOL`, `WarmPoolEntry`; empty by default). Each
warm instance is a whole instance of its own: its image verified, its launch measured into the TPM with no
job (`InstanceMeasurement.job_id` empty), its own fresh instance key (made by the agent) and scratch key
(made in the guest at boot), its own netns, cgroup and agent-owned RAM, watched by the runtime guard from its
launch. An assignment that fits exactly (same image, vCPUs, RAM and data-volume size; no GPUs, no egress,
not a confidential VM) takes one: the agent measures an assignment entry binding the job to that instance and
key, and the verifier accepts one per instance (a warm instance is never reused). After its job it is torn
down like any other, and the pool boots a replacement.

The pool only holds instances and refills; the runtime (runtime.py) launches and tears them down.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.node_agent.instance import Instance
from services.node_agent.settings import WarmPoolEntry
from shared.telemetry import get_logger

__all__ = ["PoolKey", "Warm", "WarmPool"]

log = get_logger("qvm.node_agent.warm_pool")


@dataclass(frozen=True)
class PoolKey:
    """What a job must match exactly to take a warm instance."""

    image: str
    vcpus: int
    memory_mib: int
    volume_mib: int

    @classmethod
    def of(cls, entry: WarmPoolEntry) -> PoolKey:
        return cls(entry.image, entry.cpu_cores, max(128, entry.ram_mib), entry.volume_mib)


@dataclass
class Warm:
    """A booted, measured instance waiting for a job."""

    instance: Instance
    manifest_sha256: str


Launcher = Callable[[PoolKey, str], Awaitable[Warm]]  # (key, instance id): launched, READY, measured
Destroyer = Callable[[Warm], Awaitable[None]]


class WarmPool:
    def __init__(self, entries: tuple[WarmPoolEntry, ...], launch: Launcher, destroy: Destroyer,
                 retry_s: float = 30.0) -> None:
        self._wanted = {PoolKey.of(e): e.count for e in entries if e.count}
        self._launch = launch
        self._destroy = destroy
        self._retry_s = retry_s
        self._ready: dict[PoolKey, list[Warm]] = {k: [] for k in self._wanted}
        self._booting: dict[PoolKey, int] = dict.fromkeys(self._wanted, 0)
        self._booting_ids: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def ready(self) -> int:
        return sum(len(v) for v in self._ready.values())

    def instance_ids(self) -> set[str]:
        """Every warm instance, ready or booting (the sweep leaves their directories alone)."""
        return {w.instance.spec.instance_id for v in self._ready.values() for w in v} | self._booting_ids

    def fill(self) -> None:
        """Boot what is missing, in the background (one at a time per key: a boot is CPU-bound)."""
        if self._closed:
            return
        for key, count in self._wanted.items():
            if len(self._ready[key]) + self._booting[key] < count and not self._booting[key]:
                self._booting[key] += 1
                task = asyncio.create_task(self._boot(key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _boot(self, key: PoolKey) -> None:
        instance_id = "w-" + secrets.token_hex(8)  # not derived from any job: none exists yet
        self._booting_ids.add(instance_id)
        try:
            warm = await self._launch(key, instance_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the image is missing or broken, the host is short: try again later
            log.warning("warm instance did not boot", extra={"image": key.image,
                                                             "reason": getattr(exc, "reason", type(exc).__name__)})
            self._booting[key] -= 1
            await asyncio.sleep(self._retry_s)
            self.fill()
            return
        finally:
            self._booting_ids.discard(instance_id)
        self._booting[key] -= 1
        if self._closed:
            await self._destroy(warm)
            return
        self._ready[key].append(warm)
        log.info("warm instance ready", extra={"instance_id": warm.instance.spec.instance_id, "image": key.image,
                                               "boot_ms": round(warm.instance.boot_ms)})
        self.fill()

    def take(self, key: PoolKey) -> Warm | None:
        """A ready warm instance for a job of exactly this shape (never handed out twice), or None. Its
        replacement is booted when the runtime calls `fill` again, once the job runs: a boot started now
        would take the CPU the job's own attestation needs."""
        ready = self._ready.get(key)
        if not ready:
            return None
        return ready.pop(0)

    def discard(self, instance_id: str) -> Warm | None:
        """Take a ready warm instance out of the pool without a job (to tear it down); None if not here."""
        for ready in self._ready.values():
            for warm in ready:
                if warm.instance.spec.instance_id == instance_id:
                    ready.remove(warm)
                    self.fill()
                    return warm
        return None

    async def close(self) -> None:
        """Stop booting and tear down every warm instance (agent shutdown)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for ready in self._ready.values():
            while ready:
                await self._destroy(ready.pop())
