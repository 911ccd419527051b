"""Idempotent provisioning of streams and KV buckets (run by `qvm up` / the operator as `admin`).

Create when missing, update when the settings changed, leave alone otherwise; safe to run on every
start and from several places at once.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from shared.bus import map_nats_errors
from shared.config import Settings
from shared.events import STREAMS, Domain
from shared.natsconf import KV_BUCKETS

__all__ = ["provision"]


def stream_configs(settings: Settings) -> list[StreamConfig]:
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


async def provision(js: JetStreamContext, settings: Settings) -> list[str]:
    """Ensure every stream and KV bucket exists with current settings; returns what was created/updated."""
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
    for bucket, (_, max_age) in KV_BUCKETS.items():
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
