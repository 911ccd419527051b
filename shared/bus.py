"""The bus: a mutual-TLS NATS connection for one identity, signed publishing, and guarded consumers.

`Bus.publish` signs a catalogue payload and publishes it with its event id as `Nats-Msg-Id`, so a
retried publish is stored once. `Bus.consume` runs a consumer spec's durables (one filter each) with
explicit acks: every message is decoded and verified by the codec before the handler sees it; rejected
messages go to the dead-letter subject with the reason and an `event.rejected` report, and are acked so
the consumer keeps going. A handler that raises `RejectedEvent` refuses the event as a whole (a replayed
submission): it is dead-lettered the same way, never retried. A handler that raises anything else is
redelivered with back-off until the consumer's budget is spent, then dead-lettered: nothing is lost,
nothing loops forever.

Signature checks run inline: one Ed25519 verification costs tens of microseconds, less than a thread
hop; bulk work (audit replay) batches it in a process pool instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from shared import metrics, reader
from shared.codec import Codec, Event
from shared.consumers import ConsumerSpec, Durable
from shared.errors import BusError, NotYet, Reason, RejectedEvent, Unauthorized
from shared.events import DEAD_LETTER_SUBJECT, STREAMS, Domain, EventRejected
from shared.identity import Identity
from shared.ids import derive_event_id
from shared.kv import Kv
from shared.models import Frozen
from shared.natsconf import inbox_prefix
from shared.natserrors import map_nats_errors
from shared.pki import Pki
from shared.reader import RawMessage
from shared.telemetry import current_job, extract_context, get_logger, inject_context, tracer

__all__ = ["Bus", "Handler", "consumer_config", "map_nats_errors", "tls_context"]

log = get_logger("qvm.bus")
Handler = Callable[[Event], Awaitable[None]]
PUBLISH_TIMEOUT_S = 10.0
PUBLISH_LEADERLESS_S = 60.0  # how long a publish waits out a stream without a leader (an election takes seconds)


def consumer_config(spec: ConsumerSpec, d: Durable) -> ConsumerConfig:
    """A durable's server-side settings: explicit acks from the first message, the spec's ack wait and
    redelivery budget; one filter in `filter_subject`, several in `filter_subjects`."""
    return ConsumerConfig(
        name=d.name, durable_name=d.name, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        ack_wait=spec.ack_wait_s, max_deliver=spec.max_deliver, max_ack_pending=4096,
        filter_subject=d.filters[0] if len(d.filters) == 1 else None,
        filter_subjects=list(d.filters) if len(d.filters) > 1 else None,
    )


def tls_context(pki: Pki, ident: Identity) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    cert, key = pki.tls_files(ident)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _fetch_now(sub: JetStreamContext.PullSubscription, room: int) -> list[Msg]:
    """Up to `room` messages, handed over as soon as the first is stored.

    One `fetch(room, timeout=1.0)` is a pull request the server holds open for the whole second when fewer than
    `room` messages are there, and nats-py returns only at its end: each hop of a quiet pipeline (evidence to
    verdict, placement to acceptance) then waited up to a second, 0.5 s on average. Here a one-message pull
    waits for the first (the server answers it the moment one is stored); the message says how many more the
    consumer has waiting (`num_pending`), and only those are pulled, which the server hands over at once. A
    quiet pipeline makes no second request; a burst still moves in batches. (A replica of the same durable may
    take some first: the second pull then waits at most 50 ms.)"""
    first = await sub.fetch(1, timeout=1.0)
    meta = first[-1].metadata if first else None
    more = min(room - 1, (meta.num_pending or 0) if meta is not None else 0)
    if more <= 0:
        return first
    try:
        return first + await sub.fetch(more, timeout=0.05)
    except (nats.errors.TimeoutError, TimeoutError):
        return first


@dataclass
class Bus:
    nc: NatsClient
    js: JetStreamContext
    codec: Codec
    identity: Identity
    permission_errors: int = 0
    handler_failures: int = 0  # handler exceptions (each is retried, then dead-lettered)
    # Set when the server refused this identity's credentials (it was withdrawn): reconnecting cannot help.
    unauthorized: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def connect(cls, url: str, pki: Pki, ident: Identity, *, connect_timeout: float = 5.0) -> Bus:
        codec = Codec(pki.signer(ident), pki.load_trust())
        holder: list[Bus] = []
        refused = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            if "authorization violation" in str(exc).lower():
                refused.set()  # our certificate maps to no user (any more): the identity was withdrawn
                log.warning("bus refused this identity", extra={"identity": str(ident)})
            elif "permissions violation" in str(exc).lower():
                if holder:
                    holder[0].permission_errors += 1
                log.warning("bus permission violation", extra={"error": str(exc)[:300]})
            else:
                log.warning("bus error", extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"})

        with map_nats_errors(f"connect {ident} to {url}"):
            servers = [u.strip() for u in url.split(",") if u.strip()]  # a cluster: every server's URL
            connecting = asyncio.ensure_future(nats.connect(
                servers, tls=tls_context(pki, ident), name=str(ident), inbox_prefix=inbox_prefix(ident),
                connect_timeout=connect_timeout, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                allow_reconnect=True, error_cb=on_error,
            ))
            # nats-py retries a refused login forever; a refused identity is an answer, not an outage.
            waiting = asyncio.ensure_future(refused.wait())
            await asyncio.wait({connecting, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                raise Unauthorized(f"connect {ident} to {url}: authorization refused (this identity is not, or "
                                   "no longer, a member of the platform)")
            nc = connecting.result()
        bus = cls(nc, nc.jetstream(timeout=10.0), codec, ident, unauthorized=refused)
        holder.append(bus)
        return bus

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()

    # ------------------------------------------------------------ publish
    async def publish(
        self,
        payload: Frozen,
        *,
        job_id: str | None = None,
        node_id: str | None = None,
        event_id: str | None = None,
        caused_by: Event | None = None,
        discriminator: str = "",
    ) -> bool:
        """Sign and publish; returns False when JetStream already stored this event id (a retry).

        With `caused_by`, the event id is derived from the cause's id (and `discriminator`), which makes
        a redelivered cause produce the same event, stored once.
        """
        if caused_by is not None and event_id is None:
            event_id = derive_event_id(caused_by.id, type(payload).__name__, discriminator)
        with tracer().start_as_current_span(f"publish {type(payload).__name__}", kind=SpanKind.PRODUCER) as span:
            out = self.codec.encode(payload, job_id=job_id, node_id=node_id, event_id=event_id,
                                    trace=inject_context())
            span.set_attribute("qvm.event_id", out.event_id)
            span.set_attribute("messaging.destination.name", out.subject)
            if job_id:
                span.set_attribute("qvm.job_id", job_id)
            headers = {"Nats-Msg-Id": out.event_id, **out.envelope.trace}
            with map_nats_errors(f"publish {out.subject}"):
                ack = await self._publish_stored(out.subject, out.data, headers)
            if ack.duplicate:
                return False
            if (m := metrics.active()) is not None:
                m.published(payload, out.envelope)
            return True

    async def _publish_stored(self, subject: str, data: bytes, headers: dict[str, str]) -> Any:
        """Publish and wait for JetStream's ack. While the stream has no leader (a cluster electing one after a
        server died, a server restarting), the answer is "no responders": the message was certainly not
        stored, so it is sent again with back-off for up to `PUBLISH_LEADERLESS_S`. A timeout is not retried
        here: the message may have been stored, and the caller's redelivery (same event id) settles it."""
        deadline = asyncio.get_running_loop().time() + PUBLISH_LEADERLESS_S
        delay = 0.1
        while True:
            # The async-publish path shares one reply subscription: cheaper than a request per message.
            future = await self.js.publish_async(subject, data, headers=headers)
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):  # no ack: not stored (or not permitted)
                    return await future
            except (NoStreamResponseError, NoRespondersError, ServiceUnavailableError):
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # ------------------------------------------------------------ consume
    async def ensure_consumer(self, spec: ConsumerSpec) -> list[str]:
        """Make sure the spec's durables exist; returns their names. A node-agent creates (or updates) its
        own, each through the one subject that names it and its filter; a service's durables are the
        operator's (`shared/provision.py`), so a missing one is a clear error, not something to create."""
        names = []
        for d in spec.durables(self.identity):
            if d.provisioned:
                with map_nats_errors(f"consumer {d.name}"):
                    try:
                        await self.js.consumer_info(d.stream, d.name)
                    except NotFoundError:
                        raise BusError(f"consumer {d.name} on {d.stream} does not exist: the operator makes "
                                       "the services' consumers (run `qvm provision`)") from None
            else:
                with map_nats_errors(f"provision consumer {d.name}"):
                    await self.js.add_consumer(d.stream, config=consumer_config(spec, d))
            names.append(d.name)
        return names

    async def consume(
        self, spec: ConsumerSpec, handler: Handler, stop: asyncio.Event, *, max_inflight: int = 128
    ) -> None:
        """Pull, verify, dispatch and ack each of the spec's durables until `stop` is set."""
        names = await self.ensure_consumer(spec)
        await asyncio.gather(*(self._pull(spec, name, handler, stop, max_inflight) for name in names))

    async def _pull(self, spec: ConsumerSpec, name: str, handler: Handler, stop: asyncio.Event,
                    max_inflight: int) -> None:
        """One durable's loop. Up to `max_inflight` handlers run at once; the loop fetches again as soon as a
        quarter of the window is free, so one slow message does not hold back the next batch."""
        with map_nats_errors(f"bind consumer {name}"):
            sub = await self.js.pull_subscribe_bind(name, spec.stream)
        inflight: set[asyncio.Task[None]] = set()
        refill = max(1, max_inflight // 4)
        roomy = asyncio.Event()  # set once a quarter of the window is free again

        def finished(task: asyncio.Task[None]) -> None:
            """O(1) per handler: `asyncio.wait` on the window would hook every task in it each time one ends."""
            inflight.discard(task)
            if max_inflight - len(inflight) >= refill:
                roomy.set()

        try:
            while not stop.is_set():
                room = max_inflight - len(inflight)
                if room < refill:
                    roomy.clear()
                    await roomy.wait()
                    continue
                try:
                    msgs = await _fetch_now(sub, room)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                    return
                except nats.errors.Error as exc:
                    log.warning("fetch failed", extra={"consumer": name, "error": str(exc)[:300]})
                    await asyncio.sleep(0.5)
                    continue
                for m in msgs:
                    task = asyncio.create_task(self._process(m, spec, name, handler))
                    inflight.add(task)
                    task.add_done_callback(finished)
        finally:
            if inflight:
                await asyncio.wait(inflight, timeout=10)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _process(self, msg: Msg, spec: ConsumerSpec, consumer: str, handler: Handler) -> None:
        try:
            event = self.codec.decode(msg.subject, msg.data)
        except RejectedEvent as rej:
            await self.dead_letter(msg, consumer, rej.reason, rej.detail)
            return
        if msg.metadata and msg.metadata.sequence:
            event = dataclasses.replace(event, stream_seq=msg.metadata.sequence.stream,
                                        deliveries=msg.metadata.num_delivered or 1)
        token = current_job.set(event.job_id)
        parent = extract_context(event.envelope.trace)
        try:
            with tracer().start_as_current_span(
                f"handle {event.spec.type}", context=parent, kind=SpanKind.CONSUMER,
                attributes={"qvm.event_id": event.id, "qvm.consumer": consumer},
            ) as span:
                try:
                    await _run(handler, event, consumer)
                except RejectedEvent as rej:  # the handler refused the event as a whole: never retried
                    await self.dead_letter(msg, consumer, rej.reason, rej.detail)
                    return
                except NotYet:  # an earlier event of the same job is still being handled elsewhere
                    delay = spec.backoff_s[min(event.deliveries - 1, len(spec.backoff_s) - 1)]
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=delay)
                    return
                except Exception as exc:
                    span.record_exception(exc)
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
                    await self._handler_failed(msg, spec, consumer, event, exc)
                    return
            await msg.ack()
        finally:
            current_job.reset(token)

    async def _handler_failed(
        self, msg: Msg, spec: ConsumerSpec, consumer: str, event: Event, exc: Exception
    ) -> None:
        delivered = msg.metadata.num_delivered
        self.handler_failures += 1
        if (m := metrics.active()) is not None:
            m.handler_failed(consumer, event.envelope.type)
        log.warning("handler failed", exc_info=exc,
                    extra={"consumer": consumer, "event_type": str(event.spec.type), "event_id": event.id,
                           "delivery": delivered})
        if delivered >= spec.max_deliver:
            await self.dead_letter(msg, consumer, Reason.HANDLER_FAILED,
                                   f"{type(exc).__name__}: {str(exc)[:500]} after {delivered} deliveries")
            return
        delay = spec.backoff_s[min(delivered - 1, len(spec.backoff_s) - 1)]
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)

    async def dead_letter(self, msg: Msg, consumer: str, reason: Reason, detail: str) -> None:
        """Store the raw message with the reason, report `event.rejected`, then ack the original."""
        seq = msg.metadata.sequence.stream if msg.metadata else 0
        log.warning("dead-lettered message", extra={"consumer": consumer, "reason": reason.value,
                                                    "detail": detail[:300], "subject": msg.subject[:200],
                                                    "stream_seq": seq})
        headers = {
            "Qvm-Reason": reason.value, "Qvm-Detail": _header_safe(detail[:1000]), "Qvm-Subject": msg.subject[:500],
            "Qvm-Stream-Seq": str(seq), "Qvm-Consumer": consumer,
            "Nats-Msg-Id": f"dead-{consumer}-{seq}",
        }
        dl_subject = DEAD_LETTER_SUBJECT.format(producer=str(self.identity), consumer=consumer)
        try:
            with map_nats_errors("dead-letter"):
                await self.js.publish(dl_subject, msg.data, headers=headers)
                report = EventRejected(consumer=consumer, subject=msg.subject[:500], stream_seq=seq,
                                       reason=reason, detail=detail[:1000], size=len(msg.data))
                await self.publish(report)
        except BusError as exc:
            # Keep the original un-acked: it is redelivered and dead-lettered again later; nothing is lost.
            log.error("dead-letter publish failed", extra={"error": str(exc)[:300]})
            return
        await msg.ack()

    # ------------------------------------------------------------ reading history, KV
    async def kv(self, bucket: str) -> Kv:
        """One of this identity's KV buckets (`shared/buckets.py`), typed."""
        with map_nats_errors(f"open kv {bucket}"):
            return Kv(await self.js.key_value(bucket))

    def read(self, domain: Domain, subject: str = ">", *, seq: int = 1, start_ns: int | None = None
             ) -> AsyncIterator[list[RawMessage]]:
        """Every message stored now on `subject` in the domain's stream, in order (message gets, no consumer)."""
        return reader.read(self.nc, STREAMS[domain].name, subject, seq=seq, start_ns=start_ns)

    async def read_batch(self, domain: Domain, subject: str = ">", *, seq: int = 1, start_ns: int | None = None
                         ) -> reader.Batch:
        return await reader.get_batch(self.nc, STREAMS[domain].name, subject, seq=seq, start_ns=start_ns)

    def follow(self, domain: Domain, subject: str, stop: asyncio.Event, *, seq: int = 1
               ) -> AsyncIterator[reader.Batch]:
        """`read`, then new messages as they are stored, until `stop`."""
        return reader.follow(self.nc, STREAMS[domain].name, subject, seq=seq, stop=stop)

    async def first(self, domain: Domain, subject: str) -> RawMessage | None:
        return await reader.first(self.nc, STREAMS[domain].name, subject)

    async def last(self, domain: Domain, subject: str) -> RawMessage | None:
        return await reader.last(self.nc, STREAMS[domain].name, subject)

    # ------------------------------------------------------------ helpers
    async def stream_info(self, stream: str) -> Any:
        with map_nats_errors(f"stream info {stream}"):
            try:
                return await self.js.stream_info(stream)
            except NotFoundError:
                return None



async def _run(handler: Handler, event: Event, consumer: str) -> None:
    """Run a handler; with metrics on, time it (`shared/metrics.py`)."""
    m = metrics.active()
    if m is None:
        return await handler(event)
    started = time.perf_counter()
    try:
        await handler(event)
    finally:
        m.handled(consumer, event.envelope.type, time.perf_counter() - started, event.envelope.time_ns)


def _header_safe(text: str) -> str:
    """NATS headers are line-based: no CR/LF or other control characters in a value."""
    return "".join(ch if ch.isprintable() else " " for ch in text)
