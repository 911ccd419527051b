"""The warm pool's bookkeeping (the launches themselves are the runtime's, tested with real VMs in
tests/integration/test_warm_pool.py): it keeps the configured count per shape, hands each instance out once,
refills, discards on request, retries a failed boot later, and tears everything down at close."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from services.node_agent.settings import WarmPoolEntry
from services.node_agent.warm_pool import PoolKey, Warm, WarmPool

SMALL = WarmPoolEntry(image="img", cpu_cores=1, ram_mib=256, count=2)


class Host:
    """Launches that succeed (or fail while `failing`), and the teardowns asked for."""

    def __init__(self) -> None:
        self.launched: list[str] = []
        self.destroyed: list[str] = []
        self.failing = False

    async def launch(self, key: PoolKey, instance_id: str) -> Warm:
        await asyncio.sleep(0)
        if self.failing:
            raise RuntimeError("no room")
        self.launched.append(instance_id)
        instance = SimpleNamespace(spec=SimpleNamespace(instance_id=instance_id), boot_ms=1.0)
        return Warm(instance, "ab" * 32)  # type: ignore[arg-type]  # only its id matters here

    async def destroy(self, warm: Warm) -> None:
        self.destroyed.append(warm.instance.spec.instance_id)


async def _settle(pool: WarmPool, ready: int) -> None:
    for _ in range(200):
        if pool.ready == ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pool has {pool.ready} ready, expected {ready}")


async def test_each_warm_instance_goes_to_one_job_and_the_pool_refills() -> None:
    host = Host()
    pool = WarmPool((SMALL,), host.launch, host.destroy)
    pool.fill()
    await _settle(pool, 2)
    key = PoolKey.of(SMALL)
    first, second = pool.take(key), pool.take(key)
    assert first is not None and second is not None
    assert first.instance.spec.instance_id != second.instance.spec.instance_id
    assert pool.take(PoolKey("img", 1, 512, 0)) is None  # another shape: nothing
    await asyncio.sleep(0.02)
    assert pool.ready == 0  # no replacement until the runtime asks (once the job runs)
    pool.fill()
    await _settle(pool, 2)  # two fresh ones
    ids = pool.instance_ids()
    assert first.instance.spec.instance_id not in ids and second.instance.spec.instance_id not in ids
    assert len(set(host.launched)) == 4
    await pool.close()
    assert sorted(host.destroyed) == sorted(ids)


async def test_a_discarded_instance_is_replaced_and_never_handed_out() -> None:
    host = Host()
    pool = WarmPool((WarmPoolEntry(image="img", count=1),), host.launch, host.destroy)
    pool.fill()
    await _settle(pool, 1)
    (bad,) = pool.instance_ids()
    warm = pool.discard(bad)
    assert warm is not None and pool.discard(bad) is None
    await _settle(pool, 1)  # discard refills at once: no job is starting
    taken = pool.take(PoolKey.of(WarmPoolEntry(image="img", count=1)))
    assert taken is not None and taken.instance.spec.instance_id != bad
    await pool.close()


async def test_a_failed_boot_is_retried_later() -> None:
    host = Host()
    host.failing = True
    pool = WarmPool((WarmPoolEntry(image="img", count=1),), host.launch, host.destroy, retry_s=0.05)
    pool.fill()
    await asyncio.sleep(0.02)
    assert pool.ready == 0
    host.failing = False
    await _settle(pool, 1)
    await pool.close()


async def test_an_empty_configuration_boots_nothing() -> None:
    host = Host()
    pool = WarmPool((WarmPoolEntry(image="img", count=0),), host.launch, host.destroy)
    pool.fill()
    await asyncio.sleep(0.02)
    assert pool.ready == 0 and not host.launched
    assert pool.take(PoolKey("img", 1, 256, 0)) is None
