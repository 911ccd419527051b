"""Read streams from their first message (audit, status, demo).

`read_stream` walks a stream from sequence 1 with batched message gets (`shared/reader.py`: no consumer is
created) and yields raw messages in batches (the audit decodes them in worker processes); `fold_jobs`
decodes the job stream into a `JobBook` (status, demo, tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from nats.js import JetStreamContext

from shared import reader
from shared.codec import Codec, Event
from shared.errors import RejectedEvent, TransitionNotAllowed
from shared.events import STREAMS, Domain
from shared.lifecycle import JobBook
from shared.reader import RawMessage

__all__ = ["RawMessage", "fold_jobs", "read_stream"]


async def read_stream(js: JetStreamContext, stream: str, subject: str = ">", batch: int = 2000
                      ) -> AsyncIterator[list[RawMessage]]:
    """Every message stored now on `subject`, in stream order (the identity needs read access: READERS)."""
    async for msgs in reader.read(js._nc, stream, subject, batch=batch):
        yield msgs


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
