"""Idempotent provisioning of streams, the services' durable consumers and KV buckets (run by `qvm up` /
the operator as `admin`: no service may create or re-point a consumer itself, see `shared/consumers.py`).

Create when missing, update when the settings changed, leave alone otherwise; safe to run on every
start and from several places at once.

Erasable buckets (`ERASABLE_BUCKETS`: those holding key material) are made here rather than by nats-py's
`create_key_value`, which sets `deny_delete` on every bucket: that refuses the message-delete API, the
only way to make the server overwrite a stored value (`shared.kv`), and no update can ever clear it. They
keep 64 revisions per key (the most a KV allows) so that the server never drops a superseded revision on
its own (without erasing it): their owner erases each one itself.

An erasable bucket found with `deny_delete` (made before) is moved, inside the server (the operator may
manage streams but not write a bucket, and its values never pass through here): the stream is sealed (no
writer changes it from here on), copied into a holding stream (a stream source), deleted (its block files
go, with every copy its earlier removals left in them), made again erasable and without subjects (no
writer reaches it yet), filled from the holding stream, given its subjects back, and the holding stream's
copies are erased before it is deleted. A run that stops midway is finished by the next one. Writers of the
bucket get errors meanwhile (their messages are redelivered): run it while they are stopped, as `qvm up`
and the compose file do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    StreamSource,
)
from nats.js.errors import BadRequestError, NotFoundError

from shared.buckets import BUCKETS
from shared.bus import consumer_config, map_nats_errors
from shared.config import CommonSettings
from shared.consumers import CONSUMERS
from shared.errors import BusError
from shared.events import STREAMS, Domain
from shared.identity import Identity
from shared.kv import erase_msg

__all__ = ["ERASABLE_BUCKETS", "ERASABLE_HISTORY", "erasable_kv_config", "jetstream_ready", "provision"]

ERASABLE_BUCKETS = frozenset({"qvm_keys"})
"""KV buckets whose owner erases the revisions it supersedes (they hold wrapped keys)."""
ERASABLE_HISTORY = 64  # the KV maximum: superseded revisions wait for their owner's erase, never for the limit
COPY_WAIT_S = 60.0  # the most a move waits for one stream-to-stream copy


async def jetstream_ready(js: JetStreamContext, within_s: float = 60.0, replicas: int = 1) -> None:
    """Wait until JetStream answers and, for `replicas` > 1, can place a stream on that many servers: a cluster
    that just started elects its meta leader first (every request refused as unavailable until then), and its
    peers join one by one (a replicated stream is refused as `no suitable peers` until enough have)."""
    deadline = asyncio.get_running_loop().time() + within_s
    probe = StreamConfig(name="QVM_PROVISION_PROBE", subjects=["qvm.provision.probe"], num_replicas=replicas,
                         storage=StorageType.MEMORY, max_msgs=1)
    while True:
        try:
            await js.account_info()
            if replicas > 1:
                await js.add_stream(probe)
                await js.delete_stream("QVM_PROVISION_PROBE")
            return
        except Exception as exc:  # ServiceUnavailable, no suitable peers, a timeout while routes form
            if asyncio.get_running_loop().time() > deadline:
                raise BusError(f"JetStream could not place {replicas} replica(s) within {within_s:.0f}s: {exc}"
                               ) from exc
            await asyncio.sleep(0.2)


def stream_configs(settings: CommonSettings) -> list[StreamConfig]:
    out = []
    for domain, spec in STREAMS.items():
        dead = domain is Domain.DEAD
        out.append(StreamConfig(
            name=spec.name, subjects=list(spec.subjects), description=spec.description,
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, num_replicas=settings.stream_replicas,
            max_age=settings.dead_letter_max_age_s if dead else settings.stream_max_age_s,
            duplicate_window=settings.duplicate_window_s, discard=DiscardPolicy.OLD,
            max_msg_size=1 << 20, allow_direct=True,
        ))
    return out


async def provision(js: JetStreamContext, settings: CommonSettings) -> list[str]:
    """Ensure every stream and KV bucket exists with current settings; returns what was created/updated."""
    await jetstream_ready(js, replicas=settings.stream_replicas)
    changed: list[str] = []
    for cfg in stream_configs(settings):
        assert cfg.name
        with map_nats_errors(f"provision stream {cfg.name}"):
            try:
                info = await js.stream_info(cfg.name)
            except NotFoundError:
                await js.add_stream(cfg)
                changed.append(f"created {cfg.name}")
                continue
            cur = info.config
            if (cur.max_age, cur.duplicate_window, cur.num_replicas, list(cur.subjects or [])) != (
                cfg.max_age, cfg.duplicate_window, cfg.num_replicas, cfg.subjects
            ):
                try:
                    await js.update_stream(cfg)
                    changed.append(f"updated {cfg.name}")
                except BadRequestError as exc:  # e.g. replicas cannot change on a single server
                    changed.append(f"kept {cfg.name} ({exc.description})")
    for spec in CONSUMERS:
        if not spec.provisioned:
            continue  # node-agents make their own (one filter each, named in the permitted subject)
        for d in spec.durables(Identity(spec.role)):
            with map_nats_errors(f"provision consumer {d.name}"):
                try:
                    await js.consumer_info(d.stream, d.name)
                    current = True
                except NotFoundError:
                    current = False
                await js.add_consumer(d.stream, config=consumer_config(spec, d))  # creates, or updates in place
            if not current:
                changed.append(f"created consumer {d.name}")
    for bucket, held in BUCKETS.items():
        max_age = held.max_age_s
        if bucket in ERASABLE_BUCKETS:
            with map_nats_errors(f"provision kv {bucket}"):
                done = await _erasable_bucket(js, erasable_kv_config(bucket, max_age, settings.stream_replicas))
            changed += [done] if done else []
            continue
        with map_nats_errors(f"provision kv {bucket}"):
            try:
                await js.key_value(bucket)
            except (NotFoundError, BadRequestError):
                await js.create_key_value(KeyValueConfig(
                    bucket=bucket, history=1, storage=StorageType.FILE, replicas=settings.stream_replicas,
                    direct=True, ttl=max_age or None,
                ))
                changed.append(f"created kv {bucket}")
    return changed


def erasable_kv_config(bucket: str, max_age: float, replicas: int) -> StreamConfig:
    """The stream nats-py's `create_key_value` makes for a bucket, but with message deletes allowed and
    `ERASABLE_HISTORY` revisions per key."""
    return StreamConfig(
        name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], storage=StorageType.FILE, num_replicas=replicas,
        allow_direct=True, allow_rollup_hdrs=True, deny_delete=False, discard=DiscardPolicy.NEW,
        duplicate_window=min(120.0, max_age) if max_age else 120.0, max_age=max_age or None,
        max_msgs_per_subject=ERASABLE_HISTORY, max_msgs=-1, max_consumers=-1,
    )


async def _erasable_bucket(js: JetStreamContext, cfg: StreamConfig) -> str:
    """Create, update or move one erasable bucket; what was done ("" when it was current)."""
    assert cfg.name
    name, bucket = cfg.name, cfg.name.removeprefix("KV_")
    hold = f"QVM_MOVING_{name}"
    info = await _info(js, name)
    holding = await _info(js, hold) is not None  # a move that stopped midway left its holding stream
    if info is not None and not (info.config.deny_delete or info.config.sources or holding):
        if info.config.max_msgs_per_subject == cfg.max_msgs_per_subject:
            return ""
        cur = info.config
        cur.max_msgs_per_subject = cfg.max_msgs_per_subject
        await js.update_stream(cur)
        return f"updated kv {bucket} (history {cfg.max_msgs_per_subject})"
    if info is None and not holding:
        with contextlib.suppress(BadRequestError):  # made meanwhile by another run
            await js.add_stream(cfg)
        return f"created kv {bucket} (erasable)"
    # A move: from a stream made with deny_delete, or the rest of one that stopped midway.
    if info is not None and info.config.deny_delete:
        await _copy_out(js, info, hold)
        await js.delete_stream(name)
        info = None
    held = await js.stream_info(hold)
    if info is None:
        with contextlib.suppress(BadRequestError):  # made meanwhile by another run: the same source
            await js.add_stream(dataclasses.replace(cfg, subjects=[], sources=[StreamSource(name=hold)]))
        info = await js.stream_info(name)
    if info.config.sources:
        await _copied(js, name, held.state.messages)
        await js.update_stream(cfg)  # its subjects back, no source: writers reach it from here on
    await _erase_stream(js, hold)
    return f"moved kv {bucket} to an erasable stream ({held.state.messages} messages)"


async def _copy_out(js: JetStreamContext, info: StreamInfo, hold: str) -> None:
    """Seal the old stream and copy it, inside the server, into the holding stream (detached once done)."""
    old = info.config
    assert old.name
    if not old.sealed:
        old.sealed = True
        await js.update_stream(old)
        info = await js.stream_info(old.name)
    held = await _info(js, hold)
    if held is None:
        with contextlib.suppress(BadRequestError):  # made meanwhile by another run: the same source
            await js.add_stream(StreamConfig(
                name=hold, subjects=[], storage=StorageType.FILE, num_replicas=old.num_replicas,
                allow_rollup_hdrs=True, deny_delete=False, max_msgs=-1,
                description=f"{old.name} on its way to an erasable stream", sources=[StreamSource(name=old.name)]))
        held = await js.stream_info(hold)
    if held.config.sources:  # detached only once complete: a detached one is a finished copy
        await _copied(js, hold, info.state.messages)
        # Detached: a source naming the old stream would make a cycle once the new one (same name) reads it.
        await js.update_stream(dataclasses.replace(held.config, sources=None))


async def _copied(js: JetStreamContext, name: str, messages: int) -> None:
    """Wait until the stream's sources have copied `messages` messages into it."""
    deadline = asyncio.get_running_loop().time() + COPY_WAIT_S
    while True:
        info = await js.stream_info(name)
        if info.state.messages >= messages and all(not s.lag for s in info.sources or []):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise BusError(f"{name}: copied {info.state.messages} of {messages} messages in {COPY_WAIT_S:.0f}s")
        await asyncio.sleep(0.05)


async def _erase_stream(js: JetStreamContext, name: str) -> None:
    """Erase every message of a (holding) stream, then delete it: its copies go the way the owner's do."""
    info = await js.stream_info(name)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        await erase_msg(js, name, seq)
    await js.delete_stream(name)


async def _info(js: JetStreamContext, name: str) -> StreamInfo | None:
    try:
        return await js.stream_info(name)
    except NotFoundError:
        return None
