"""Quote verification against a real TPM (swtpm through tpm2-pytss): the accepted path and each rejection,
with its reason code. The verifier code under test is the one the service and `qvm attest` run."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPML_PCR_SELECTION, TPMS_PCR_SELECTION

from shared.tpm.credential import make_credential
from shared.tpm.device import TpmDevice, TpmError
from shared.tpm.ek import check_ek_certificate, load_ek_cas
from shared.tpm.measurements import AgentMeasurement, InstanceMeasurement, entry_digest
from shared.tpm.policy import AttestationPolicy, Counters, ImageReference, appraise, check_counters
from shared.tpm.quote import QuoteError, binding, verify_quote
from shared.tpm.structures import parse_attest, parse_public
from shared.tpm.swtpm import Swtpm, SwtpmState
from tests.framework.tpm import start_copy

H = "ab" * 32
AGENT = AgentMeasurement(node_id="node-a", agent_version="t", agent_sha256="11" * 32, config_sha256="22" * 32)
INSTANCE = InstanceMeasurement(instance_id="i-1", job_id="job-1", image_manifest_sha256="33" * 32,
                               kernel_sha256="44" * 32, initrd_sha256="55" * 32, rootfs_sha256="66" * 32,
                               cmdline="console=ttyS0", vmm="qemu-microvm", vmm_sha256="77" * 32,
                               security_policy_sha256="88" * 32, public_key="99" * 32)
POLICY = AttestationPolicy(
    agents=("11" * 32,), images={"33" * 32: ImageReference(name="img", kernel_sha256="44" * 32,
                                                           initrd_sha256="55" * 32, rootfs_sha256="66" * 32)},
    vmms={"77" * 32: "qemu-microvm"}, security_policies=("88" * 32,), require_ek_certificate=False)


@pytest.fixture
def tpm(swtpm: Swtpm) -> Iterator[TpmDevice]:
    dev = TpmDevice(swtpm.tcti)
    dev.load_keys()
    for entry in (AGENT, INSTANCE):  # the agent's measured launch: one agent entry, one instance
        dev.extend(15, entry_digest(entry))
    yield dev
    dev.close()


def _quote(dev: TpmDevice, nonce: bytes, key: bytes = b"node-key") -> tuple[bytes, bytes, dict[int, bytes], bytes]:
    extra = binding(nonce, key)
    q = dev.quote([15], extra)
    return q.attest, q.signature, q.pcrs, extra


def _reason(fn: object, *args: object, **kw: object) -> str:
    with pytest.raises(QuoteError) as exc:
        fn(*args, **kw)  # type: ignore[operator]
    return exc.value.reason


def test_enrollment_credential_activation_and_ek_certificate(tpm: TpmDevice, swtpm: Swtpm) -> None:
    ek, ak = parse_public(tpm.ek_public), parse_public(tpm.ak_public)
    secret = os.urandom(32)
    blob, encrypted = make_credential(ek, ak.name, secret)
    assert tpm.activate_credential(blob, encrypted) == secret  # only this TPM, only for this AK
    blob, encrypted = make_credential(ek, ak.name[:-1] + bytes([ak.name[-1] ^ 1]), secret)
    with pytest.raises(TpmError) as exc:
        tpm.activate_credential(blob, encrypted)
    assert exc.value.reason == "activation_failed"
    assert tpm.ek_cert is not None
    chain = check_ek_certificate(tpm.ek_cert, ek, load_ek_cas(swtpm.state.ek_ca))
    assert "swtpm-localca-rootca" in chain
    other = parse_public(tpm.ak_public)  # a certificate for another key than the EK presented
    with pytest.raises(QuoteError, match="another key"):
        check_ek_certificate(tpm.ek_cert, other, load_ek_cas(swtpm.state.ek_ca))


def test_node_and_instance_quotes_verify_and_appraise(tpm: TpmDevice) -> None:
    nonce = os.urandom(32)
    attest, sig, pcrs, extra = _quote(tpm, nonce, bytes.fromhex("99" * 32))
    parsed = verify_quote(tpm.ak_public, attest, sig, extra_data=extra, pcr_values=pcrs, required_pcrs=[15],
                          qualified_signer=tpm.ak_qualified_name)
    appraisal = appraise(POLICY, parsed, pcrs, [AGENT.model_dump(), INSTANCE.model_dump()])
    assert appraisal.agent == AGENT and appraisal.instances["i-1"].public_key == "99" * 32
    enrolled = Counters(parsed.clock.reset_count, parsed.clock.restart_count, 0)
    assert check_counters(POLICY, enrolled, parsed).reset_count == parsed.clock.reset_count


def test_wrong_nonce(tpm: TpmDevice) -> None:
    attest, sig, pcrs, _ = _quote(tpm, os.urandom(32))
    assert _reason(verify_quote, tpm.ak_public, attest, sig, extra_data=binding(os.urandom(32), b"node-key"),
                   pcr_values=pcrs) == "nonce_mismatch"


def test_quote_bound_to_another_key(tpm: TpmDevice) -> None:
    nonce = os.urandom(32)
    attest, sig, pcrs, _ = _quote(tpm, nonce, key=b"instance-x")
    assert _reason(verify_quote, tpm.ak_public, attest, sig, extra_data=binding(nonce, b"instance-y"),
                   pcr_values=pcrs) == "nonce_mismatch"


@pytest.mark.parametrize("where", [0, 10, 40, -40, -1])
def test_one_flipped_byte(tpm: TpmDevice, where: int) -> None:
    attest, sig, pcrs, extra = _quote(tpm, os.urandom(32))
    bad = bytearray(attest)
    bad[where] ^= 0x01
    assert _reason(verify_quote, tpm.ak_public, bytes(bad), sig, extra_data=extra,
                   pcr_values=pcrs) == "signature_invalid"
    bad_sig = bytearray(sig)
    bad_sig[-5] ^= 0x01
    assert _reason(verify_quote, tpm.ak_public, attest, bytes(bad_sig), extra_data=extra,
                   pcr_values=pcrs) == "signature_invalid"


def test_foreign_ak(tpm: TpmDevice, tpm_templates: tuple[SwtpmState, SwtpmState], tmp_path: object) -> None:
    attest, sig, pcrs, extra = _quote(tpm, os.urandom(32))
    other = start_copy(tpm_templates[1], tmp_path / "other")  # type: ignore[operator]
    try:
        dev = TpmDevice(other.tcti)
        dev.load_keys()
        foreign = dev.ak_public
        dev.close()
    finally:
        other.stop()
    assert foreign != tpm.ak_public
    assert _reason(verify_quote, foreign, attest, sig, extra_data=extra, pcr_values=pcrs) == "signature_invalid"


def test_unrestricted_key_is_refused(tpm: TpmDevice) -> None:
    """An unrestricted signing key can sign anything that looks like a quote (TPM2_Sign): never an AK."""
    attrs = (TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)
    key, pub, *_ = tpm.esapi.create_primary(None, TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs),
                                            primary_handle=ESYS_TR.ENDORSEMENT)
    extra = binding(os.urandom(32), b"k")
    quoted, sig = tpm.esapi.quote(key, "sha256:15", extra)
    tpm.esapi.flush_context(key)
    pcrs = tpm.read_pcrs([15])
    assert _reason(verify_quote, bytes(pub.marshal()), bytes(quoted), bytes(sig.marshal()), extra_data=extra,
                   pcr_values=pcrs) == "ak_not_restricted"


def test_pcr_mismatch(tpm: TpmDevice) -> None:
    attest, sig, pcrs, extra = _quote(tpm, os.urandom(32))
    lied = {15: hashlib.sha256(b"what the host wishes PCR 15 were").digest()}
    assert _reason(verify_quote, tpm.ak_public, attest, sig, extra_data=extra, pcr_values=lied) == \
        "pcr_digest_mismatch"
    assert _reason(verify_quote, tpm.ak_public, attest, sig, extra_data=extra, pcr_values=pcrs,
                   required_pcrs=[0, 15]) == "pcr_selection_incomplete"


def test_static_pcr_value_not_allowed(tpm: TpmDevice) -> None:
    attest, sig, pcrs, extra = _quote(tpm, os.urandom(32))
    parsed = verify_quote(tpm.ak_public, attest, sig, extra_data=extra, pcr_values=pcrs)
    strict = POLICY.model_copy(update={"pcr_values": {15: "00" * 32}})
    assert _reason(appraise, strict, parsed, pcrs, [AGENT.model_dump(), INSTANCE.model_dump()]) == \
        "pcr_value_not_allowed"


@pytest.mark.parametrize("tamper, reason", [
    (lambda log: [log[0]], "log_replay_mismatch"),  # truncated
    (lambda log: [log[1], log[0]], "log_replay_mismatch"),  # reordered
    (lambda log: [log[0], {**log[1], "image_manifest_sha256": "aa" * 32}], "log_replay_mismatch"),  # edited
    (lambda log: [log[0], {**log[1], "kind": "guest"}], "malformed_log"),
])
def test_tampered_measurement_log(tpm: TpmDevice, tamper: object, reason: str) -> None:
    attest, sig, pcrs, extra = _quote(tpm, os.urandom(32))
    parsed = verify_quote(tpm.ak_public, attest, sig, extra_data=extra, pcr_values=pcrs)
    log = [AGENT.model_dump(), INSTANCE.model_dump()]
    assert _reason(appraise, POLICY, parsed, pcrs, tamper(log)) == reason  # type: ignore[operator]


def test_unapproved_measurement(tpm: TpmDevice) -> None:
    """The log replays (the host told the truth) but what it ran is not approved."""
    attest, sig, pcrs, extra = _quote(tpm, os.urandom(32))
    parsed = verify_quote(tpm.ak_public, attest, sig, extra_data=extra, pcr_values=pcrs)
    log = [AGENT.model_dump(), INSTANCE.model_dump()]
    for change in ({"agents": ()}, {"images": {}}, {"vmms": {}}, {"security_policies": ()}):
        assert _reason(appraise, POLICY.model_copy(update=change), parsed, pcrs, log) == "measurement_not_allowed"
    firmware = f"{parsed.firmware_version:016x}"
    assert _reason(appraise, POLICY.model_copy(update={"firmware_denylist": (firmware,)}), parsed, pcrs, log) == \
        "firmware_denied"


def test_duplicate_pcr_selection(tpm: TpmDevice) -> None:
    """The same bank selected twice (a quote over "some PCRs" dressed as more: go-attestation CVE-2022-0317)."""
    sel = TPMS_PCR_SELECTION(hash=TPM2_ALG.SHA256, sizeofSelect=3)
    sel.pcrSelect = bytes([0, 0x80, 0])
    extra = binding(os.urandom(32), b"k")
    quoted, sig = tpm.esapi.quote(tpm._ak, TPML_PCR_SELECTION([sel, sel]), extra)
    attest = bytes(quoted)
    assert len(parse_attest(attest).selections) == 2
    pcrs = tpm.read_pcrs([15])
    assert _reason(verify_quote, tpm.ak_public, attest, bytes(sig.marshal()), extra_data=extra,
                   pcr_values=pcrs) == "pcr_selection_duplicate"


def test_reboot_forces_reenrollment(tpm: TpmDevice, swtpm: Swtpm) -> None:
    attest, sig, pcrs, extra = _quote(tpm, os.urandom(32))
    before = verify_quote(tpm.ak_public, attest, sig, extra_data=extra, pcr_values=pcrs)
    enrolled = Counters(before.clock.reset_count, before.clock.restart_count, before.clock.clock)
    tpm.close()
    swtpm.restart()
    dev = TpmDevice(swtpm.tcti)
    dev.load_keys()
    try:
        attest, sig, pcrs, extra = _quote(dev, os.urandom(32))
        after = verify_quote(dev.ak_public, attest, sig, extra_data=extra, pcr_values=pcrs)
        assert after.clock.reset_count == enrolled.reset_count + 1
        assert pcrs[15] == b"\0" * 32  # PCRs start over: the old log can no longer replay
        assert _reason(check_counters, POLICY, enrolled, after) == "tpm_rebooted"
        assert _reason(check_counters, POLICY, Counters(after.clock.reset_count + 5, 0, 0), after) == \
            "counter_regressed"
    finally:
        dev.close()
        tpm.esapi = dev.esapi  # the fixture's close() must not touch the old context again
        tpm._ek = tpm._ak = None
