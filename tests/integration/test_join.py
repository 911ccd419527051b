"""Joining a node to a running control plane with a token and its TPM (swtpm), against the real NATS
server: the grant takes effect without restarting anything, misuse is refused with a reason, and a
withdrawn node's certificate no longer opens the bus."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from shared.buckets import JOIN_INVITES
from shared.bus import Bus
from shared.codec import Codec
from shared.errors import Unauthorized
from shared.events import Domain, EventType, NodeHeartbeat
from shared.identity import Identity, Role
from shared.join import client
from shared.join.controlplane import JoinService, start_join_service
from shared.join.invites import JoinRefused, create_invite
from shared.join.protocol import JoinChallenge, JoinProof, JoinRequest
from shared.join.token import JoinToken
from shared.pki import Pki, make_csr
from shared.tpm.device import TpmDevice
from shared.tpm.swtpm import Swtpm, SwtpmState
from tests.framework.flow import eventually
from tests.framework.stack import Stack, running_stack
from tests.framework.tpm import start_copy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def control_plane(tmp_path: Path, swtpm: Swtpm) -> AsyncIterator[tuple[Stack, JoinService, Bus]]:
    """A control plane with no node at all, serving joins; the TPM vendor CA is the swtpm's."""
    async with running_stack(tmp_path / "cp", nodes=()) as stack:
        admin = await stack.bus(Role.ADMIN)
        service = await start_join_service(admin, stack.server, ek_ca=swtpm.state.ek_ca)
        try:
            yield stack, service, admin
        finally:
            service.stop()


async def invite(admin: Bus, stack: Stack, node_id: str, ttl_s: float = 600.0) -> str:
    token, _ = await create_invite(await admin.kv(JOIN_INVITES), node_id, stack.pki.ca_der, ttl_s)
    return str(token)


async def join(token: str, url: str, etc: Path, tpm: Swtpm) -> client.JoinResult:
    result, _ = await asyncio.to_thread(client.join, token, url, etc, tpm.tcti)
    return result


async def refused(coro_or_call: object) -> JoinRefused:
    with pytest.raises(JoinRefused) as info:
        if asyncio.iscoroutine(coro_or_call):
            await coro_or_call
    return info.value


async def test_a_node_joins_runs_on_the_bus_and_is_cut_off_when_withdrawn(
        control_plane: tuple[Stack, JoinService, Bus], swtpm: Swtpm, tmp_path: Path) -> None:
    stack, service, admin = control_plane
    # A service that was running before the node existed (its trust bundle has no node in it).
    watcher = Codec(None, stack.pki.load_trust())
    token = await invite(admin, stack, "gpu-host-1")

    result = await join(token, service.url, tmp_path / "etc", swtpm)

    assert result.node_id == "gpu-host-1" and result.nats_url == stack.url
    env = client.read_env(result.env_file)
    assert env["QVM_NODE_ID"] == "gpu-host-1" and env["QVM_NATS_URL"] == stack.url
    node_dir = Pki(result.pki_dir).identity_dir(Identity(Role.NODE_AGENT, "gpu-host-1"))
    assert {p.name for p in node_dir.iterdir()} == {"tls.pem", "tls-key.pem", "sign.pem", "sign-key.pem"}
    assert all((node_dir / k).stat().st_mode & 0o077 == 0 for k in ("tls-key.pem", "sign-key.pem"))
    # The control plane holds the node's certificates, never its keys.
    cp_dir = stack.pki.identity_dir(Identity(Role.NODE_AGENT, "gpu-host-1"))
    assert sorted(p.name for p in cp_dir.iterdir()) == ["sign.pem", "tls.pem"]

    # On the bus at once (NATS reloaded, not restarted), and its events verify for services started before.
    node = await Bus.connect(stack.url, Pki(result.pki_dir), Identity(Role.NODE_AGENT, "gpu-host-1"))
    try:
        await node.publish(NodeHeartbeat(seq=1))
        msgs = [m for batch in [b async for b in admin.read(Domain.NODES, "qvm.nodes.gpu-host-1.heartbeat")]
                for m in batch]
        assert len(msgs) == 1
        ev = watcher.decode(msgs[0].subject, msgs[0].data)
        assert ev.envelope.producer == "node-agent.gpu-host-1" and ev.node_id == "gpu-host-1"
        # ... and only as itself: another node's subjects are refused by the server.
        await node.nc.publish("qvm.nodes.gpu-host-2.heartbeat", b"x")
        await node.nc.flush()
        await eventually(lambda: _violated(node), timeout=5, what="a permissions violation")

        # The same token again: used.
        again = await refused(join(token, service.url, tmp_path / "etc2", swtpm))
        assert again.reason == "token_used"

        # Withdrawn: its connection is closed by the server and its certificate maps to no user any more.
        withdrawn = await asyncio.to_thread(client.revoke, service.url, stack.pki, "gpu-host-1", "operator_revoked",
                                            "test")
        assert withdrawn.was_member
        await eventually(lambda: _closed(node), timeout=10, what="the withdrawn node's connection closed")
        await asyncio.wait_for(node.unauthorized.wait(), 10)  # its reconnect is refused: what the agent acts on
    finally:
        await node.close()
    with pytest.raises(Unauthorized, match="authorization refused"):
        await Bus.connect(stack.url, Pki(result.pki_dir), Identity(Role.NODE_AGENT, "gpu-host-1"), connect_timeout=3)
    revoked = [m async for b in admin.read(Domain.NODES, "qvm.nodes.gpu-host-1.revoked") for m in b]
    assert len(revoked) == 1
    assert watcher.decode(revoked[0].subject, revoked[0].data).spec.type is EventType.NODE_REVOKED
    # A second withdrawal is the same decision: nothing new on the bus.
    again = await asyncio.to_thread(client.revoke, service.url, stack.pki, "gpu-host-1")
    assert again.already
    assert len([m async for b in admin.read(Domain.NODES, "qvm.nodes.gpu-host-1.revoked") for m in b]) == 1


async def _violated(bus: Bus) -> bool:
    return bus.permission_errors > 0


async def _closed(bus: Bus) -> bool:
    return bool(bus.nc.is_closed or not bus.nc.is_connected)


async def test_a_node_leaves_with_its_own_certificate(control_plane: tuple[Stack, JoinService, Bus], swtpm: Swtpm,
                                                      tmp_path: Path) -> None:
    stack, service, admin = control_plane
    result = await join(await invite(admin, stack, "leaver"), service.url, tmp_path / "etc", swtpm)
    # Only the operator revokes: a node's own certificate is refused at /revoke.
    as_node = Pki(result.pki_dir)
    (as_node.identity_dir(Identity(Role.ADMIN))).mkdir(parents=True)
    for name in ("tls.pem", "tls-key.pem"):  # the node's certificate, presented where the operator's would be
        src = as_node.identity_dir(Identity(Role.NODE_AGENT, "leaver")) / name
        (as_node.identity_dir(Identity(Role.ADMIN)) / name).write_bytes(src.read_bytes())
    err = await refused(asyncio.to_thread(client.revoke, service.url, as_node, "leaver"))
    assert err.reason == "not_authorized"
    gone = await asyncio.to_thread(client.leave, tmp_path / "etc")
    assert gone.node_id == "leaver" and gone.was_member
    assert not stack.pki.identity_dir(Identity(Role.NODE_AGENT, "leaver")).exists()
    with pytest.raises(Unauthorized, match="authorization refused"):
        await Bus.connect(stack.url, Pki(result.pki_dir), Identity(Role.NODE_AGENT, "leaver"), connect_timeout=3)


async def test_token_misuse_is_refused_with_a_reason(control_plane: tuple[Stack, JoinService, Bus], swtpm: Swtpm,
                                                     tmp_path: Path) -> None:
    stack, service, admin = control_plane
    url = service.url
    # expired
    expired = await invite(admin, stack, "node-e", ttl_s=0.01)
    await asyncio.sleep(0.05)
    assert (await refused(join(expired, url, tmp_path / "e", swtpm))).reason == "token_expired"
    # forged: the right CA fingerprint, a secret nobody issued
    real = JoinToken.parse(await invite(admin, stack, "node-f"))
    forged = str(JoinToken("node-f", real.ca_fingerprint, JoinToken.new("node-f", b"x").secret))
    assert (await refused(join(forged, url, tmp_path / "f", swtpm))).reason == "token_unknown"
    # issued by another control plane's CA: the node refuses that control plane before sending anything
    foreign = str(JoinToken.new("node-f", b"another CA"))
    assert (await refused(join(foreign, url, tmp_path / "g", swtpm))).reason == "ca_mismatch"
    # garbage
    assert (await refused(join("qvmjoin1.node-f.abc", url, tmp_path / "h", swtpm))).reason == "token_invalid"
    assert not any((tmp_path / d).exists() for d in ("e", "f", "g", "h")), "a refused join writes nothing"

    # Requests made by hand (what a malicious joiner could send), each refused with its reason.
    token = await invite(admin, stack, "node-c")
    ca_pem = await asyncio.to_thread(client.fetch_ca, url, JoinToken.parse(token).ca_fingerprint)
    ctx = client._context(ca_pem)
    tpm = TpmDevice(swtpm.tcti)
    tpm.load_keys()
    try:
        def request(node_id: str = "node-c", csr_for: str = "node-c", **over: str) -> JoinRequest:
            ident = Identity(Role.NODE_AGENT, csr_for)
            fields = dict(token=token, node_id=node_id,
                          tls_csr=make_csr(ec.generate_private_key(ec.SECP256R1()), ident),
                          sign_csr=make_csr(ed25519.Ed25519PrivateKey.generate(), ident),
                          ek_public=tpm.ek_public.hex(), ek_certificate=(tpm.ek_cert or b"").hex(),
                          ak_public=tpm.ak_public.hex())
            return JoinRequest(**{**fields, **over})

        async def post(req: JoinRequest) -> str:
            err = await refused(asyncio.to_thread(client._post, ctx, url, "/join", req, JoinChallenge))
            return err.reason

        assert await post(request(node_id="node-x")) == "token_node_mismatch"
        assert await post(request(csr_for="node-x")) == "csr_wrong_identity"
        p256_as_sign = request(sign_csr=make_csr(ec.generate_private_key(ec.SECP256R1()),
                                                 Identity(Role.NODE_AGENT, "node-c")))
        assert await post(p256_as_sign) == "csr_invalid"
        assert await post(request(ek_certificate="")) == "ek_certificate_missing"
        assert await post(request(ek_certificate="3003020100")) == "ek_certificate_invalid"
        assert await post(request(ak_public=tpm.ek_public.hex())) != ""  # an EK is no AK
        # A proof without the TPM's answer
        challenge = await asyncio.to_thread(client._post, ctx, url, "/join", request(), JoinChallenge)
        wrong = JoinProof(session=challenge.session, secret="00" * 32)
        err = await refused(asyncio.to_thread(client._post, ctx, url, "/join/proof", wrong, JoinChallenge))
        assert err.reason == "activation_failed"
        # ... and the session is gone after one try
        err = await refused(asyncio.to_thread(client._post, ctx, url, "/join/proof", wrong, JoinChallenge))
        assert err.reason == "session_unknown"
    finally:
        tpm.close()
    # None of this consumed the invitation: the real node still joins with it.
    assert (await join(token, url, tmp_path / "c", swtpm)).node_id == "node-c"


async def test_a_tpm_joins_once(control_plane: tuple[Stack, JoinService, Bus], swtpm: Swtpm, tmp_path: Path,
                                tpm_templates: tuple[SwtpmState, SwtpmState]) -> None:
    """The same TPM cannot be two nodes; a TPM whose EK certificate no trusted vendor CA issued cannot join."""
    stack, service, admin = control_plane
    await join(await invite(admin, stack, "first"), service.url, tmp_path / "a", swtpm)
    err = await refused(join(await invite(admin, stack, "second"), service.url, tmp_path / "b", swtpm))
    assert err.reason == "ek_reused"
    stranger = start_copy(tpm_templates[1], tmp_path / "tpm-b")
    try:
        err = await refused(join(await invite(admin, stack, "third"), service.url, tmp_path / "c", stranger))
    finally:
        stranger.stop()
    assert err.reason == "ek_certificate_invalid"
