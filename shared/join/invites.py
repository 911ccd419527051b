"""Join invitations in the operator's KV bucket, keyed by the SHA-256 of their token's secret.

An invitation is for one node id, expires after its TTL, and is redeemed once: redeeming is a
compare-and-set on the stored record, so two joins racing with one token cannot both win.
"""

from __future__ import annotations

import time

from pydantic import Field

from shared.errors import ReasonedError
from shared.identity import NodeId
from shared.join.token import JoinToken
from shared.kv import Kv, Stale
from shared.models import Frozen

__all__ = ["Invite", "JoinRefused", "check_invite", "create_invite", "redeem_invite"]


class JoinRefused(ReasonedError):
    """A join, leave or revocation refused; `reason` is a stable code (token_expired, csr_wrong_identity,
    ek_certificate_invalid, activation_failed, ...) and `detail` a sentence for the person at the terminal."""


class Invite(Frozen):
    node_id: NodeId
    created_ns: int = Field(ge=0)
    expires_ns: int = Field(ge=0)
    redeemed_ns: int = Field(0, ge=0)


async def create_invite(kv: Kv, node_id: str, ca_der: bytes, ttl_s: float) -> tuple[JoinToken, Invite]:
    token = JoinToken.new(node_id, ca_der)
    now = time.time_ns()
    invite = Invite(node_id=node_id, created_ns=now, expires_ns=now + int(ttl_s * 1e9))
    if not await kv.create(token.digest, invite):  # 256 random bits: a collision means a broken RNG
        raise RuntimeError("a fresh join token already exists")
    return token, invite


async def check_invite(kv: Kv, token: JoinToken, now_ns: int | None = None) -> tuple[Invite, int]:
    """The invitation `token` stands for, if it may still be used; else `JoinRefused`."""
    invite, revision, _ = await kv.get(token.digest, Invite)
    if not isinstance(invite, Invite):
        raise JoinRefused("token_unknown", "no invitation has this token (mistyped, forged, or long expired)")
    if invite.node_id != token.node_id:
        raise JoinRefused("token_node_mismatch", "the token was issued for another node")
    if invite.redeemed_ns:
        raise JoinRefused("token_used", "this token was used already: ask the operator for a new one")
    if (now_ns or time.time_ns()) > invite.expires_ns:
        raise JoinRefused("token_expired", "this token has expired: ask the operator for a new one")
    return invite, revision


async def redeem_invite(kv: Kv, token: JoinToken) -> None:
    """Mark the invitation used, once: a concurrent redemption makes this one fail with `token_used`."""
    invite, revision = await check_invite(kv, token)
    try:
        await kv.update(token.digest, invite.model_copy(update={"redeemed_ns": time.time_ns()}), revision)
    except Stale:
        raise JoinRefused("token_used", "this token was used by a concurrent join") from None
