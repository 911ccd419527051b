"""Read streams from their first message (audit, status, demo).

`read_stream` walks a stream with an ephemeral pull consumer from sequence 1 (no acks, deleted when
idle) and yields raw messages in batches (the audit decodes them in worker processes); `fold_jobs`
decodes the job stream into a `JobBook` (status, demo, tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.bus import map_nats_errors
from shared.codec import Codec, Event
from shared.errors import RejectedEvent, TransitionNotAllowed
from shared.events import STREAMS, Domain
from shared.lifecycle import JobBook

__all__ = ["RawMessage", "fold_jobs", "read_stream"]


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


async def fold_jobs(js: JetStreamContext, codec: Codec, subject: str = ">", *, strict: bool = False
                    ) -> tuple[JobBook, list[Event]]:
    """The job stream folded into a book, and the events folded, in stream order.

    Messages that do not verify, and events that would make an illegal transition, are skipped (the
    audit reports them) unless `strict`, where they raise.
    """
    book = JobBook()
    folded: list[Event] = []
    async for batch in read_stream(js, STREAMS[Domain.JOBS].name, subject):
        for m in batch:
            try:
                event = codec.decode(m.subject, m.data)
                book.apply(event)
            except (RejectedEvent, TransitionNotAllowed):
                if strict:
                    raise
                continue
            folded.append(event)
    return book, folded
