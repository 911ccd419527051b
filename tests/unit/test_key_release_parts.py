"""Pure parts of key release: the secret bundle's strict format, the agent's key inbox, and the broker's
decision table (every refusal has its reason code)."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest

from services.key_broker.release_policy import decide_release
from services.key_broker.store import JobKeys, NodeRevocation
from services.node_agent.keys import KeyError_, KeyInbox
from shared.client.bundle import MAX_FILE_BYTES, BundleError, pack_bundle, unpack_bundle
from shared.codec import Event
from shared.events import (
    AttestPurpose,
    CvmKind,
    InstanceAttested,
    KeyReleased,
    KeyReleasePolicy,
    KeyReleaseRefused,
)
from shared.models import SecurityLevel, TrustState

KEY = "aa" * 32


def test_bundle_round_trip() -> None:
    files = {"api-token": b"t0ken", "cert.pem": b"\x00\x01" * 100}
    assert unpack_bundle(pack_bundle(files)) == files


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "bundle_malformed"),
    (b"\xc1", "bundle_malformed"),
    (msgpack.packb([1, 2]), "bundle_malformed"),
    (msgpack.packb({}), "bundle_empty"),
    (msgpack.packb({"../etc/passwd": b"x"}), "bundle_bad_name"),
    (msgpack.packb({".hidden": b"x"}), "bundle_bad_name"),
    (msgpack.packb({"a": "text, not bytes"}), "bundle_malformed"),
    (msgpack.packb({"a": b"x" * (MAX_FILE_BYTES + 1)}, use_bin_type=True), "bundle_malformed"),
    (msgpack.packb({f"f{i}": b"x" for i in range(40)}, use_bin_type=True), "bundle_malformed"),
])
def test_bundle_refuses_bad_input(raw: bytes, reason: str) -> None:
    with pytest.raises(BundleError) as err:
        unpack_bundle(raw)
    assert err.value.reason == reason


def test_bundle_pack_refuses_what_the_agent_would() -> None:
    with pytest.raises(BundleError, match="bundle_too_large"):
        pack_bundle({"a": b"x" * (MAX_FILE_BYTES + 1)})
    with pytest.raises(BundleError, match="bundle_bad_name"):
        pack_bundle({"a/b": b"x"})


def _event(payload: object) -> Event:
    class Fake:
        pass
    e = Fake()
    e.payload = payload  # type: ignore[attr-defined]
    return e  # type: ignore[return-value]


async def test_inbox_keeps_a_release_that_arrives_before_the_wait() -> None:
    inbox = KeyInbox()
    release = KeyReleased(instance_id="i-1", result_id="r", suite="s", sealed="ab" * 40, kek_version=1,
                          released_ns=1, lease_expires_ns=2)
    inbox.resolve(_event(release))
    assert await inbox.wait_key("i-1", 1.0) == release
    inbox.resolve(_event(KeyReleaseRefused(instance_id="i-2", reason="second_instance")))
    with pytest.raises(KeyError_) as err:
        await inbox.wait_key("i-2", 1.0)
    assert err.value.reason == "key_second_instance"
    with pytest.raises(KeyError_, match="key_timeout"):
        await inbox.wait_key("i-3", 0.05)
    inbox.forget("i-1")
    inbox.forget("i-2")
    inbox.forget("i-3")
    await asyncio.sleep(0)


def _record(**over: object) -> JobKeys:
    fields: dict[str, object] = dict(job_id="j", submitted_id="s", policy=KeyReleasePolicy(),
                                     security=SecurityLevel.BASIC, wrapped="00", kek_version=1, node_id="n",
                                     instance_keys={"i-1": KEY})
    fields.update(over)
    return JobKeys(**fields)  # type: ignore[arg-type]


def _result(**over: object) -> InstanceAttested:
    now = time.time_ns()
    fields: dict[str, object] = dict(
        purpose=AttestPurpose.INSTANCE, challenge_id="c" * 32, evidence_id="e", instance_id="i-1", job_id="j",
        trust=TrustState.TRUSTED, ak_name="00", ek_sha256="cd" * 32, image_manifest_sha256="ab" * 32,
        public_key=KEY, pcr_sha256="ef" * 32, reset_count=0, restart_count=0, firmware_version="0",
        verified_ns=now, expires_ns=now + 10**11)
    fields.update(over)
    return InstanceAttested(**fields)  # type: ignore[arg-type]


def _decide(record: JobKeys, result: InstanceAttested, seq: int = 7, revocation: NodeRevocation | None = None
            ) -> str:
    d = decide_release(record, result, job_id="j", node_id="n", result_id="r-1", stream_seq=seq,
                       now_ns=time.time_ns(), revocation=revocation)
    return "release" if d.release else d.reason


def test_decision_table() -> None:
    now = time.time_ns()
    assert _decide(_record(), _result()) == "release"
    assert _decide(_record(spent_results={"r-1": 7}, holder="i-1"), _result()) == "release"  # redelivery
    assert _decide(_record(spent_results={"r-1": 7}, holder="i-1"), _result(), seq=9) == "replayed_release"
    assert _decide(_record(spent_challenges=("c" * 32,)), _result()) == "replayed_release"
    assert _decide(_record(destroyed=True), _result()) == "keys_destroyed"
    assert _decide(_record(), _result(job_id="other")) == "result_invalid"
    assert _decide(_record(), _result(expires_ns=now - 1)) == "result_expired"
    assert _decide(_record(), _result(verified_ns=now - 10**12)) == "result_stale"
    assert _decide(_record(), _result(), revocation=NodeRevocation(node_id="n", revoked_ns=now + 10**9)) \
        == "node_revoked"
    assert _decide(_record(), _result(), revocation=NodeRevocation(node_id="n", revoked_ns=now - 10**10)) \
        == "release"  # revoked before, verified again since
    assert _decide(_record(node_id="m"), _result()) == "wrong_node"
    assert _decide(_record(), _result(instance_id="i-9")) == "instance_unknown"
    assert _decide(_record(), _result(public_key="bb" * 32)) == "wrong_instance_key"
    assert _decide(_record(), _result(trust=TrustState.UNVERIFIED)) == "trust_too_low"
    assert _decide(_record(policy=KeyReleasePolicy(allowed_images=("11" * 32,))), _result()) == "image_not_allowed"
    assert _decide(_record(security=SecurityLevel.CONFIDENTIAL), _result()) == "security_level_not_met"
    # only a result that carries a verified CVM report earns a confidential job its key
    assert _decide(_record(security=SecurityLevel.CONFIDENTIAL),
                   _result(cvm=CvmKind.SEV_SNP, cvm_measurement="ab" * 48)) == "release"
    assert _decide(_record(security=SecurityLevel.CONFIDENTIAL), _result(cvm=CvmKind.TDX)) == "security_level_not_met"
    assert _decide(_record(holder="i-0"), _result()) == "second_instance"
