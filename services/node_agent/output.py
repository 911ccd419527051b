"""The run phase's output: the workload runs in its instance while its output streams to the client, each
chunk sealed to the client's key before it reaches the bus, and the exit is reported with the byte count
and the digest of the sealed chunks (never one of the plaintext).

    instance.run --on_output--> OutputStreamer (64 KiB chunks, or every half second of quiet; the first MiB)
                 --seal_chunk--> instance.output (seq) ... --> instance.exited (exit code, bytes, digest)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from services.node_agent.instance import Instance, InstanceError
from shared.crypto import hpke
from shared.crypto.errors import CryptoError
from shared.crypto.output import SealedDigest, seal_chunk
from shared.events import OUTPUT_CHUNK_BYTES, InstanceExited, InstanceOutput

__all__ = ["OUTPUT_CHUNK", "OUTPUT_FLUSH_S", "OUTPUT_PUBLISHED_MAX", "OutputStreamer", "run_workload"]

OUTPUT_CHUNK = OUTPUT_CHUNK_BYTES
OUTPUT_FLUSH_S = 0.5
OUTPUT_PUBLISHED_MAX = 1 << 20  # beyond this only the digest and byte count are reported


class OutputStreamer:
    """Publishes workload output while it runs: a chunk at 64 KiB, or every half second of quiet. `emit`
    seals each chunk to the client's output key before it reaches the bus (no key: no streamer at all)."""

    def __init__(self, emit: Callable[[int, bytes], Awaitable[None]]) -> None:
        self._emit = emit
        self._buf = bytearray()
        self._seq = 0
        self._published = 0
        self._lock = asyncio.Lock()

    async def add(self, chunk: bytes) -> None:
        room = OUTPUT_PUBLISHED_MAX - self._published - len(self._buf)
        if room > 0:
            self._buf += chunk[:room]
        if len(self._buf) >= OUTPUT_CHUNK:
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            while self._buf:
                chunk = bytes(self._buf[:OUTPUT_CHUNK])
                del self._buf[:OUTPUT_CHUNK]
                await self._emit(self._seq, chunk)
                self._seq += 1
                self._published += len(chunk)

    async def flush_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.flush()

    async def stop(self, flusher: asyncio.Task[None]) -> None:
        """End `flusher` (a `flush_every` task), then publish what is left. The lock is taken first: a flush
        in progress finishes (its chunk is published, counted and digested) before the task is cancelled,
        so a cancellation never leaves a chunk on the bus that the exit report does not count."""
        async with self._lock:
            flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await self.flush()


async def run_workload(instance: Instance, job_id: str, output_key: str | None,
                       publish: Callable[[InstanceOutput], Awaitable[None]]) -> InstanceExited:
    """Run the job's workload in its instance and report how it ended.

    With the client's `output_key` (hex X25519) the output is sealed chunk by chunk while it runs, each
    chunk on its own with `info` binding job, instance and seq (`shared.crypto.output`), and handed to
    `publish`; the plaintext never leaves this function except into the seal. Without one nothing is
    published. The report counts every byte and carries the digest of the sealed chunks as published, never
    one of the plaintext.
    """
    instance_id = instance.spec.instance_id
    client_key = bytes.fromhex(output_key) if output_key else None
    digest = SealedDigest()

    async def emit_chunk(seq: int, chunk: bytes) -> None:
        assert client_key is not None
        try:
            sealed = seal_chunk(chunk, client_key, job_id, instance_id, seq)
        except CryptoError as exc:
            raise InstanceError("output_seal_failed", f"{exc.reason}: {exc.detail}") from None
        await publish(InstanceOutput(instance_id=instance_id, seq=seq, suite=hpke.SUITE_NAME, sealed=sealed.hex()))
        digest.update(sealed)

    if client_key is None:  # no key to seal to: the output is counted, never published
        out = await instance.run()
    else:
        streamer = OutputStreamer(emit_chunk)
        flusher = asyncio.create_task(streamer.flush_every(OUTPUT_FLUSH_S))
        try:
            out = await instance.run(streamer.add)
        finally:
            await streamer.stop(flusher)
    return InstanceExited(instance_id=instance_id, exit_code=out.exit_code, runtime_ms=round(instance.runtime_ms, 1),
                          output_sha256=digest.hexdigest(), output_bytes=out.total_bytes, output_chunks=digest.chunks,
                          output_truncated=client_key is not None and out.truncated)
