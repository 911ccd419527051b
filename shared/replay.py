"""Read streams from their first message (audit, status) and verify them in bulk.

`read_stream` walks a stream with an ephemeral pull consumer from sequence 1 (no acks, deleted when
idle). `verify_batch` decodes raw messages in worker processes: Ed25519 verification dominates audit
cost, and on a small machine two processes verify twice as fast as one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.bus import map_nats_errors
from shared.codec import Codec, Event
from shared.errors import RejectedEvent
from shared.pki import TrustBundle

__all__ = ["RawMessage", "Verifier", "read_stream"]


@dataclass(frozen=True, slots=True)
class RawMessage:
    stream: str
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]


async def read_stream(js: JetStreamContext, stream: str, subject: str = ">", batch: int = 2000
                      ) -> AsyncIterator[list[RawMessage]]:
    with map_nats_errors(f"read {stream}"):
        info = await js.stream_info(stream)
        last = info.state.last_seq
        if info.state.messages == 0:
            return
        sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0,
            max_ack_pending=-1))
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=2.0)
            except nats.errors.TimeoutError:
                return
            out = [RawMessage(stream, m.metadata.sequence.stream, m.subject, m.data, dict(m.headers or {}))
                   for m in msgs]
            yield out
            if not out or out[-1].seq >= last or msgs[-1].metadata.num_pending == 0:
                return
    finally:
        with map_nats_errors(f"close reader on {stream}"):
            await sub.unsubscribe()


_worker_codec: Codec | None = None


def _init_worker(bundle_pem: bytes, ca_pem: bytes) -> None:
    global _worker_codec
    _worker_codec = Codec(None, TrustBundle.load(bundle_pem, ca_pem))


def _decode_many(items: list[tuple[str, bytes]]) -> list[Event | RejectedEvent]:
    assert _worker_codec is not None
    out: list[Event | RejectedEvent] = []
    for subject, data in items:
        try:
            out.append(_worker_codec.decode(subject, data))
        except RejectedEvent as exc:
            out.append(exc)
    return out


class Verifier:
    """Decode + verify batches of raw messages, in `workers` processes (0: inline)."""

    def __init__(self, bundle_pem: bytes, ca_pem: bytes, workers: int | None = None) -> None:
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self._codec = Codec(None, TrustBundle.load(bundle_pem, ca_pem))
        self._pool = (ProcessPoolExecutor(self.workers, initializer=_init_worker, initargs=(bundle_pem, ca_pem))
                      if self.workers > 1 else None)

    async def decode(self, msgs: list[RawMessage]) -> list[Event | RejectedEvent]:
        items = [(m.subject, m.data) for m in msgs]
        if self._pool is None:
            return _decode_local(self._codec, items)
        loop = asyncio.get_running_loop()
        size = max(1, -(-len(items) // self.workers))
        parts = await asyncio.gather(*(loop.run_in_executor(self._pool, _decode_many, items[i:i + size])
                                       for i in range(0, len(items), size)))
        return [x for p in parts for x in p]

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(cancel_futures=True)


def _decode_local(codec: Codec, items: list[tuple[str, bytes]]) -> list[Event | RejectedEvent]:
    out: list[Event | RejectedEvent] = []
    for subject, data in items:
        try:
            out.append(codec.decode(subject, data))
        except RejectedEvent as exc:
            out.append(exc)
    return out
