"""Read streams from their first message (audit, status, demo).

`read_stream` walks a stream with an ephemeral pull consumer from sequence 1 (no acks, deleted when
idle) and yields raw messages in batches; decoding is the caller's choice (see `shared.audit`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.bus import map_nats_errors

__all__ = ["RawMessage", "read_stream"]


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
