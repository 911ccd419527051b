"""Reading a stream's history without a consumer: batched JetStream message gets.

`$JS.API.DIRECT.GET.<stream>` with `{"seq": N, "next_by_subj": F, "batch": K}` answers with up to K stored
messages matching F from sequence N on, each with its sequence, subject and time in headers, then an
end-of-batch status (204; 404 when nothing matched). A reader keeps its own position, so it needs no
server-side state: no ephemeral or ordered consumer, whose unnamed create request could name (and so
update) any durable in its body. That is what lets the permission generator grant readers one subject per
stream (`shared/consumers.py` READERS) and nothing that touches a consumer.

`read` walks what is stored now; `follow` keeps going and waits for new messages (polling, with a short
sleep when it has caught up). `first` and `last` answer "where does this subject begin / end".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from shared.errors import BusError
from shared.natserrors import map_nats_errors
from shared.telemetry import get_logger

__all__ = ["RawMessage", "first", "follow", "get_batch", "last", "read"]

BATCH = 1000
REPLY_TIMEOUT_S = 10.0
IDLE_POLL_S = 0.1
RETRY_S = 0.5
log = get_logger("qvm.reader")


@dataclass(frozen=True, slots=True)
class RawMessage:
    stream: str
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Batch:
    messages: list[RawMessage]
    pending: int  # matching messages left after this batch


async def get_batch(nc: NatsClient, stream: str, subject: str = ">", *, seq: int = 1, batch: int = BATCH,
                    start_ns: int | None = None) -> Batch:
    """Up to `batch` messages on `subject` from `seq` (or from `start_ns`, a time) on."""
    request: dict[str, object] = {"next_by_subj": subject, "batch": batch}
    if start_ns is not None:
        request["start_time"] = datetime.fromtimestamp(max(0, start_ns) / 1e9, UTC).isoformat()
    else:
        request["seq"] = max(1, seq)
    out, pending = await _direct_get_batch(nc, stream, request)
    out.sort(key=lambda m: m.seq)
    return Batch(out, pending)


async def _direct_get_one(nc: NatsClient, stream: str, request: dict[str, object]) -> RawMessage | None:
    """One `$JS.API.DIRECT.GET` with one answer, through the connection's shared reply inbox (no subscription of
    its own): the stored message, or None when nothing matches (a 404); any other status is an error, never
    read as "nothing there"."""
    with map_nats_errors(f"read {stream}"):
        msg = await nc.request(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), timeout=REPLY_TIMEOUT_S)
        headers = dict(msg.headers or {})
        status = headers.get("Status")
        if status is None:
            return _stored(stream, msg, headers)
        if status == "404":
            return None
        raise ConnectionError(f"direct get {stream}: {status} {msg.data[:200]!r}")


async def _direct_get_batch(nc: NatsClient, stream: str, request: dict[str, object]) -> tuple[list[RawMessage], int]:
    """A batched `$JS.API.DIRECT.GET`, on an inbox of its own: the stored messages it answers with, then the
    end-of-batch status, which says how many matching messages are left. Nothing stored is a 404 (no
    messages); any other status is an error, never read as "nothing there"."""
    out: list[RawMessage] = []
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_reply(msg: Msg) -> None:
        if done.done():
            return
        headers = dict(msg.headers or {})
        status = headers.get("Status")
        if status is None:
            out.append(_stored(stream, msg, headers))
        elif status in ("204", "404"):
            done.set_result(int(headers.get("Nats-Num-Pending", "0") or 0))
        else:
            done.set_exception(ConnectionError(f"direct get {stream}: {status} {msg.data[:200]!r}"))

    with map_nats_errors(f"read {stream}"):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_reply)
        try:
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
            pending = await asyncio.wait_for(done, REPLY_TIMEOUT_S)
        finally:
            await sub.unsubscribe()
    return out, pending


async def read(nc: NatsClient, stream: str, subject: str = ">", *, seq: int = 1, start_ns: int | None = None,
               batch: int = BATCH) -> AsyncIterator[list[RawMessage]]:
    """Every stored message on `subject`, in stream order, in batches; ends at what is stored now."""
    first_call = True
    while True:
        b = await get_batch(nc, stream, subject, seq=seq, batch=batch, start_ns=start_ns if first_call else None)
        first_call = False
        if b.messages:
            yield b.messages
            seq = b.messages[-1].seq + 1
        if not b.messages or b.pending == 0:
            return


async def follow(nc: NatsClient, stream: str, subject: str = ">", *, seq: int = 1, stop: asyncio.Event,
                 batch: int = BATCH, idle_s: float = IDLE_POLL_S) -> AsyncIterator[Batch]:
    """Every message on `subject` from `seq` on, then new ones as they are stored, until `stop` is set.
    Each batch says how much was pending after it (0: caught up with what was stored when it was read)."""
    while not stop.is_set():
        try:
            b = await get_batch(nc, stream, subject, seq=seq, batch=batch)
        except (BusError, ConnectionError, TimeoutError) as exc:  # a reconnect, a leader change: read again
            log.warning("stream read failed; retrying", extra={"stream": stream, "error": str(exc)[:300]})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)
            continue
        if b.messages:
            seq = b.messages[-1].seq + 1
        yield b
        if not b.messages or b.pending == 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), idle_s)


async def first(nc: NatsClient, stream: str, subject: str) -> RawMessage | None:
    """The earliest stored message on `subject` (None when nothing matches): one request, one answer (the
    scheduler asks this of every submission, so it takes no subscription of its own)."""
    return await _direct_get_one(nc, stream, {"seq": 1, "next_by_subj": subject})


async def last(nc: NatsClient, stream: str, subject: str) -> RawMessage | None:
    """The latest stored message on `subject` (a literal subject: read by subject, not by scanning)."""
    return await _direct_get_one(nc, stream, {"last_by_subj": subject})


def _stored(stream: str, msg: Msg, headers: dict[str, str]) -> RawMessage:
    """A message-get answer: the stored message, its sequence and subject from the headers."""
    return RawMessage(stream, int(headers.get("Nats-Sequence", "0")), headers.get("Nats-Subject", ""), msg.data,
                      headers)
