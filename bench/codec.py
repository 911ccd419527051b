"""1. Per-event cost: sign (Codec.encode), verify (Codec.decode), and sign+publish+verify through JetStream."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import Figure, say, section, windowed
from bench.pipeline import pipelined_us
from bench.stack import bench_stack
from shared.codec import Codec
from shared.events import JobSubmitted
from shared.identity import Identity, Role
from shared.models import GpuRequest, HardwareProfile
from shared.pki import Pki
from shared.replay import read_stream

__all__ = ["run"]

N = 5000
WINDOW = 64
TARGET_RATIO = 1.3  # of the codec's sign + verify alone: what the bus and the two processes add

PAYLOAD = JobSubmitted(
    owner="bench-client", image="registry.example/qvm/pytorch:2.4-cuda12", command=("python", "train.py"),
    profile=HardwareProfile(cpu_cores=8, ram_mib=65536, gpus=GpuRequest(count=1, model="H100", min_vram_mib=80000)),
)


async def run(tmp: Path) -> list[Figure]:
    section(
        "1. Per-event cost (codec and bus)",
        f"job.submitted signed by `marketplace`; sign/verify: Codec.encode/decode of {N:,} events in a loop after "
        f"200 warm-ups; end to end: Bus.publish of {N:,} events ({WINDOW} in flight, sliding window, "
        "each awaiting its JetStream ack) on an embedded TLS NATS, then read back from QVM_JOBS as `admin` and "
        "Codec.decode each; total wall time / N. Then the same with the reader in its own process verifying "
        "while events arrive (as services run): first publish -> last verified / N",
    )
    pki = Pki(tmp / "pki")
    pki.init()
    signer = pki.signer(Identity(Role.MARKETPLACE))
    codec = Codec(signer, pki.load_trust())

    for i in range(200):
        out = codec.encode(PAYLOAD, job_id=f"warm-{i}")
        codec.decode(out.subject, out.data)

    t0 = time.perf_counter()
    outs = [codec.encode(PAYLOAD, job_id=f"job-{i:05d}") for i in range(N)]
    sign_us = (time.perf_counter() - t0) / N * 1e6
    t0 = time.perf_counter()
    for o in outs:
        codec.decode(o.subject, o.data)
    verify_us = (time.perf_counter() - t0) / N * 1e6

    # The Ed25519 primitives alone, for context: what the codec adds on top is pydantic + msgpack.
    data = outs[0].data
    t0 = time.perf_counter()
    sigs = [signer.key.sign(data) for _ in range(N)]
    raw_sign_us = (time.perf_counter() - t0) / N * 1e6
    pub = signer.key.public_key()
    t0 = time.perf_counter()
    for s in sigs:
        pub.verify(s, data)
    raw_verify_us = (time.perf_counter() - t0) / N * 1e6

    async with bench_stack(pki, tmp / "nats") as stack:
        market = await stack.bus(Role.MARKETPLACE)
        admin = await stack.bus(Role.ADMIN)
        ids = [f"e2e-{i:05d}" for i in range(N)]

        async def publish(job_id: str) -> None:
            await market.publish(PAYLOAD, job_id=job_id)

        t0 = time.perf_counter()
        await windowed(ids, publish, WINDOW)
        t1 = time.perf_counter()
        seen = 0
        async for batch in read_stream(admin.js, "QVM_JOBS"):
            for m in batch:
                admin.codec.decode(m.subject, m.data)
                seen += 1
        t2 = time.perf_counter()
    e2e_us = (t2 - t0) / N * 1e6
    async with bench_stack(pki, tmp / "nats-pipeline") as stack:
        piped_us, piped_n = await pipelined_us(stack, PAYLOAD, N, WINDOW)

    pair = sign_us + verify_us
    figs = [
        Figure("sign (Codec.encode)", sign_us, "µs/event", limit=raw_sign_us, limit_of="Ed25519 sign alone"),
        Figure("verify (Codec.decode)", verify_us, "µs/event", limit=raw_verify_us,
               limit_of="Ed25519 verify alone"),
        Figure("sign+publish+verify, producer + consumer processes", piped_us, "µs/event", TARGET_RATIO,
               note=f"wall time first publish -> last verified / N; {piped_n:,}/{N:,} verified", limit=pair,
               limit_of="Codec sign + verify alone"),
        Figure("sign+publish+verify, one process, serial", e2e_us, "µs/event",
               note=f"publish phase {(t1 - t0) / N * 1e6:.0f} µs/event, read+verify {(t2 - t1) / N * 1e6:.0f} "
                    f"µs/event, {seen:,}/{N:,} read back", limit=pair, limit_of="Codec sign + verify alone"),
    ]
    for f in figs:
        say(f.line())
    return figs
