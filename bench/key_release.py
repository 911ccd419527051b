"""6. Key release: verified result -> sealed key at the node, latency and throughput.

The key-broker runs as deployed (`python -m services.key_broker`, its KEK ring from a passphrase file);
the bench process plays the marketplace (job.submitted with a volume), the node-agent (instance
announcements; it receives the releases through a push consumer) and the verifier (signed
instance.attested results). Every release is a real one: read the job's record, decide, compare-and-set,
unwrap the DEK under the KEK, seal it with HPKE to the instance key, publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from bench.common import Figure, say, section, windowed
from bench.limits import CpuMeter, release_crypto_s
from bench.stack import BenchStack, bench_stack, service_process
from services.key_broker.store import BUCKET
from shared.bus import Bus
from shared.crypto import hpke
from shared.crypto.kek import create_kek_file
from shared.events import (
    AttestPurpose,
    InstanceAttested,
    InstanceProvisioning,
    JobSubmitted,
    KeyReleased,
)
from shared.identity import Identity, Role
from shared.models import TrustState
from shared.pki import Pki

__all__ = ["run"]

P50_TARGET_MS = 5.0
RATE_TARGET_RATIO = 0.5  # of 1 / (the release's own crypto alone: verify, unwrap, HPKE seal, sign)
LATENCY_SAMPLES = 300
BURST = 3000
NODE = "bench-node"
PASSPHRASE = "bench passphrase"


def _pub(key: x25519.X25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _result(job_id: str, instance: str, public_key: str, n: int) -> InstanceAttested:
    now = time.time_ns()
    return InstanceAttested(
        purpose=AttestPurpose.INSTANCE, challenge_id=f"{n:032x}", evidence_id=f"e-{n}", instance_id=instance,
        job_id=job_id, trust=TrustState.TRUSTED, ak_name="00", ek_sha256="cd" * 32, image_manifest_sha256="ab" * 32,
        public_key=public_key, pcr_sha256="ef" * 32, reset_count=0, restart_count=0, firmware_version="0",
        verified_ns=now, expires_ns=now + 600 * 10**9)


async def run(tmp: Path) -> list[Figure]:
    section(
        "6. Key release (key-broker)",
        f"`python -m services.key_broker` in its own process (KEK ring from a scrypt passphrase file); "
        f"{LATENCY_SAMPLES + BURST:,} jobs with a volume submitted and their instances announced first (keys made "
        f"and stored wrapped); latency: {LATENCY_SAMPLES} instance.attested published one at a time (signed as "
        "the verifier), timed to the key.released arrival at a push consumer (the node's side), whose sealed key "
        f"is opened with the instance key; throughput: {BURST:,} results pre-signed as the verifier, published "
        "with 256 in flight, arrivals stamped by subject; releases/s = releases / (first publish -> last arrival); "
        "limit: 1 / the CPU time of one release's crypto alone in this process (Ed25519 verify of a signed result, "
        "AES-256-GCM unwrap under a KEK, HPKE seal to a fresh X25519 key, Ed25519 sign of a key.released)",
    )
    pki = Pki(tmp / "pki")
    pki.init(nodes=[NODE])
    async with bench_stack(pki, tmp / "nats") as stack, _broker(stack, tmp):
        market = await stack.bus(Role.MARKETPLACE)
        verifier = await stack.bus(Role.ATTESTATION_VERIFIER)
        node = await Bus.connect(stack.server.url, pki, Identity(Role.NODE_AGENT, NODE))
        stack.buses.append(node)
        admin = await stack.bus(Role.ADMIN)
        total = LATENCY_SAMPLES + BURST
        keys = [x25519.X25519PrivateKey.generate() for _ in range(total)]
        jobs = [f"kr-{i}" for i in range(total)]
        await windowed(list(range(total)), lambda i: market.publish(
            JobSubmitted(owner="b", image="img", volume_mib=32), job_id=jobs[i]), window=128)
        await windowed(list(range(total)), lambda i: node.publish(InstanceProvisioning(
            instance_id=f"i-{i}", image="img", image_manifest_sha256="ab" * 32, vmm="qemu-microvm",
            public_key=_pub(keys[i])), job_id=jobs[i], node_id=NODE), window=128)
        await _until_announced(admin, total)

        arrived: dict[str, float] = {}
        sealed: dict[str, str] = {}
        waiters: dict[str, asyncio.Future[float]] = {}
        all_in = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            """Latency samples are decoded and checked; burst arrivals are only stamped (the node's signature
            checks are not the broker's cost, and this process shares the two cores with it)."""
            t = time.perf_counter()
            job = msg.subject.split(".")[2]
            arrived[job] = t
            if len(arrived) == total:
                all_in.set()
            w = waiters.pop(job, None)
            if w is not None and not w.done():
                event = admin.codec.decode(msg.subject, msg.data)
                assert isinstance(event.payload, KeyReleased)
                sealed[job] = event.payload.sealed
                w.set_result(t)

        sub = await admin.js.subscribe("qvm.keys.*.released.*", stream="QVM_KEYS", ordered_consumer=True, cb=on_msg)
        try:
            lat = []
            for i in range(LATENCY_SAMPLES):
                fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                waiters[jobs[i]] = fut
                t0 = time.perf_counter()
                await verifier.publish(_result(jobs[i], f"i-{i}", _pub(keys[i]), i), job_id=jobs[i], node_id=NODE)
                lat.append((await asyncio.wait_for(fut, 30) - t0) * 1000)
            opened = hpke.open_sealed(bytes.fromhex(sealed[jobs[0]]), keys[0], hpke.release_info("dek", jobs[0], "i-0"))
            assert len(opened) == 32

            sample = verifier.codec.encode(_result(jobs[0], "i-0", _pub(keys[0]), 0), job_id=jobs[0], node_id=NODE)
            key = verifier.codec.signer.key  # type: ignore[union-attr]
            crypto_before = release_crypto_s(sample.data, sample.data, key)

            burst = list(range(LATENCY_SAMPLES, total))
            signed = {i: verifier.codec.encode(_result(jobs[i], f"i-{i}", _pub(keys[i]), i), job_id=jobs[i],
                                               node_id=NODE) for i in burst}  # the verifier's cost: not timed

            async def publish(i: int) -> None:
                out = signed[i]
                ack = await verifier.js.publish_async(out.subject, out.data, headers={"Nats-Msg-Id": out.event_id})
                await ack

            broker_pids = CpuMeter.children("services.key_broker")
            meter = CpuMeter.with_server({"key-broker": broker_pids[0], "bench (verifier + node)": os.getpid()},
                                         stack.server_pid)
            meter.start()
            t0 = time.perf_counter()
            await windowed(burst, publish, window=256)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), 120)
            meter.stop()
            crypto_after = release_crypto_s(sample.data, sample.data, key)
            crypto_s = (crypto_before + crypto_after) / 2  # on each side of the burst: the machine's speed drifts
            say(f"  limit: one release's crypto alone {crypto_before * 1e6:.0f} µs before the burst, "
                f"{crypto_after * 1e6:.0f} µs after -> {1 / crypto_s:,.0f} releases/s")
            say(f"  burst: {meter.per(len(burst), 'release')}")
            done = [arrived[jobs[i]] for i in burst if jobs[i] in arrived]
            rate = len(done) / (max(done) - t0) if done else 0.0
        finally:
            await sub.unsubscribe()
    lat.sort()
    p50, p99 = statistics.median(lat), lat[int(len(lat) * 0.99) - 1]
    figs = [
        Figure("verified -> released latency p50", p50, "ms", P50_TARGET_MS),
        Figure("verified -> released latency p99", p99, "ms", note=f"max {lat[-1]:.1f} ms"),
        Figure("key releases/s (burst)", rate, "/s", RATE_TARGET_RATIO, higher_is_better=True,
               note=f"{len(done):,} of {len(burst):,} released", limit=1 / crypto_s,
               limit_of="1 / release crypto alone"),
    ]
    for f in figs:
        say(f.line())
    return figs


async def _until_announced(admin: Bus, total: int) -> None:
    """Until the broker stored every job's key with its announced instance (the KV stream's last sequence
    counts writes: one create plus one update per job)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        info = await admin.stream_info(f"KV_{BUCKET}")
        if info is not None and info.state.last_seq >= 2 * total:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the key-broker did not store every job's key in time")


@contextlib.asynccontextmanager
async def _broker(stack: BenchStack, tmp: Path, replicas: int = 1) -> AsyncIterator[None]:
    kek = tmp / "kek.json"
    if not kek.exists():
        create_kek_file(kek, bytearray(PASSPHRASE.encode()))
    env = {"QVM_KEK_SOURCE": f"file:{kek}", "QVM_KEK_PASSPHRASE": PASSPHRASE}
    async with contextlib.AsyncExitStack() as running:
        for n in range(replicas):
            await running.enter_async_context(
                service_process(stack, "services.key_broker", b"key-broker ready", f"key-broker-{n}", env))
        yield
