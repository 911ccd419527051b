"""KEKs sealed to a real (software) TPM: `TpmDevice.seal / unseal` and `TpmSealedSource`, against swtpm.

PCR 16 is the debug PCR (resettable, extendable by anyone), so tests can change the sealed-to state
without touching the PCRs other tests read; PCR 0 and 7 come along to show a multi-PCR policy.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE

from shared.config import KekSettings
from shared.crypto import CryptoError
from shared.crypto.kek import TpmSealedSource, load_source, seal_kek_file_tpm
from shared.crypto.secret import random_secret
from shared.tpm.device import TpmDevice, TpmError, _selection, pcr_policy_digest
from shared.tpm.swtpm import Swtpm, SwtpmState
from tests.framework.tpm import start_copy

PCRS = (0, 7, 16)


def extend(tcti: str, pcr: int, what: bytes = b"something else booted") -> None:
    device = TpmDevice(tcti)
    try:
        device.extend(pcr, hashlib.sha256(what).digest())
    finally:
        device.close()


@pytest.fixture
def device(swtpm: Swtpm) -> Iterator[TpmDevice]:
    d = TpmDevice(swtpm.tcti)
    yield d
    d.close()


# ---------------------------------------------------------------- TpmDevice.seal / unseal
def test_policy_digest_matches_the_tpm(device: TpmDevice) -> None:
    """`pcr_policy_digest` (pure Python) equals what a TPM trial session computes for TPM2_PolicyPCR."""
    device.extend(16, b"\x05" * 32)
    trial = device.esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, None, TPM2_ALG.SHA256)
    try:
        device.esapi.policy_pcr(trial, None, _selection(PCRS))
        assert bytes(device.esapi.policy_get_digest(trial)) == pcr_policy_digest(device.read_pcrs(PCRS))
    finally:
        device.esapi.flush_context(trial)


def test_seal_unseal(device: TpmDevice) -> None:
    data = random_secret(32)
    public, private = device.seal(data, PCRS)
    assert data.hex() not in (public + private).hex()
    for _ in range(4):  # handles are flushed: swtpm holds only three transient objects
        out = device.unseal(public, private, PCRS)
        assert isinstance(out, bytearray) and out == data
    device.extend(16, b"\x01" * 32)
    with pytest.raises(TpmError) as err:
        device.unseal(public, private, PCRS)
    assert err.value.reason == "tpm_policy_mismatch"


def test_unseal_refuses_other_selection_and_bad_blobs(device: TpmDevice) -> None:
    public, private = device.seal(b"x" * 32, PCRS)
    with pytest.raises(TpmError) as err:
        device.unseal(public, private, (0, 7))
    assert err.value.reason == "tpm_policy_mismatch"
    for pub, priv in ((public[:-1] + bytes([public[-1] ^ 1]), private), (public, private[:-1] + bytes([private[-1] ^ 1])),
                      (b"junk", private), (public, b""), (public + b"\x00", private)):
        with pytest.raises(TpmError) as err:
            device.unseal(pub, priv, PCRS)
        assert err.value.reason == "tpm_blob_invalid"


def test_seal_to_given_values(device: TpmDevice) -> None:
    """Sealing to predicted values: unsealable exactly when the PCR reaches them."""
    now = device.read_pcrs([16])[16]
    future = hashlib.sha256(now + b"\x07" * 32).digest()  # PCR 16 after extending 0x07..07
    public, private = device.seal(b"y" * 32, [16], {16: future})
    with pytest.raises(TpmError):
        device.unseal(public, private, [16])
    device.extend(16, b"\x07" * 32)
    assert device.unseal(public, private, [16]) == bytearray(b"y" * 32)


@pytest.mark.parametrize(("data", "pcrs"), [(b"", PCRS), (b"x" * 129, PCRS), (b"x", ()), (b"x", (24,))])
def test_seal_refuses(device: TpmDevice, data: bytes, pcrs: tuple[int, ...]) -> None:
    with pytest.raises(TpmError) as err:
        device.seal(data, pcrs)
    assert err.value.reason == "tpm_config"


# ---------------------------------------------------------------- TpmSealedSource
def test_sealed_ring_lifecycle(swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "kek.tpm.json"
    seal_kek_file_tpm(swtpm.tcti, path, PCRS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["pcrs"] == list(PCRS) and len(doc["keys"]) == 1 and set(doc["keys"][0]) == {
        "version", "created_ns", "public", "private", "pcr_values"}

    source = TpmSealedSource(swtpm.tcti, path, PCRS)
    ring = source.load()
    assert ring.versions == (1,)
    assert ring._keys[1].hex() not in path.read_text()
    w = ring.wrap(b"D" * 32, b"job")
    assert source.load().unwrap(w, b"job") == bytearray(b"D" * 32)  # same KEK every load

    assert source.rotate() == 2
    ring2 = source.load()
    assert ring2.versions == (1, 2) and ring2.current == 2
    assert ring2.unwrap(w, b"job") == bytearray(b"D" * 32)
    assert ring2.rewrap(w, b"job").kek_version == 2

    with pytest.raises(CryptoError) as err:
        seal_kek_file_tpm(swtpm.tcti, path, PCRS)
    assert err.value.reason == "kek_file_exists"

    # The spec form the key-broker is configured with.
    spec_source = load_source(f"tpm:{path}?pcrs=0,7,16", settings=KekSettings(tpm=swtpm.tcti))
    assert spec_source.load().unwrap(w, b"job") == bytearray(b"D" * 32)


def test_changed_pcr_refuses_then_reboot_restores(swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "kek.tpm.json"
    seal_kek_file_tpm(swtpm.tcti, path, PCRS)
    source = TpmSealedSource(swtpm.tcti, path, PCRS)
    w = source.load().wrap(b"D" * 32, b"job")

    extend(swtpm.tcti, 16)
    with pytest.raises(CryptoError) as err:
        source.load()
    assert err.value.reason == "tpm_policy_mismatch"
    assert "[16]" in err.value.detail
    with pytest.raises(CryptoError) as err:
        source.rotate()  # no new version while the host is not in the sealed state
    assert err.value.reason == "tpm_policy_mismatch"
    assert len(json.loads(path.read_text())["keys"]) == 1

    swtpm.restart()  # a reboot: PCRs start over from the same (measured) values
    assert TpmSealedSource(swtpm.tcti, path, PCRS).load().unwrap(w, b"job") == bytearray(b"D" * 32)


def test_another_tpm_cannot_unseal(swtpm: Swtpm, tpm_templates: tuple[SwtpmState, SwtpmState],
                                   tmp_path: Path) -> None:
    path = tmp_path / "kek.tpm.json"
    seal_kek_file_tpm(swtpm.tcti, path, PCRS)
    other = start_copy(tpm_templates[1], tmp_path / "other-tpm")
    try:
        with pytest.raises(CryptoError) as err:
            TpmSealedSource(other.tcti, path, PCRS).load()
        assert err.value.reason == "tpm_blob_invalid"
    finally:
        other.stop()


def test_selection_and_file_checks(swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "kek.tpm.json"
    seal_kek_file_tpm(swtpm.tcti, path, PCRS)
    with pytest.raises(CryptoError) as err:
        TpmSealedSource(swtpm.tcti, path, (0, 7)).load()
    assert err.value.reason == "tpm_pcr_selection_mismatch"
    assert TpmSealedSource(swtpm.tcti, path).load().versions == (1,)  # no selection: the file's

    doc = json.loads(path.read_text())
    doc["keys"][0]["private"] = "zz"
    path.write_text(json.dumps(doc))
    with pytest.raises(CryptoError) as err:
        TpmSealedSource(swtpm.tcti, path, PCRS).load()
    assert err.value.reason == "kek_file_corrupt"
    with pytest.raises(CryptoError) as err:
        TpmSealedSource(swtpm.tcti, tmp_path / "absent.json", PCRS).load()
    assert err.value.reason == "kek_file_missing"


def test_unreachable_tpm(tmp_path: Path) -> None:
    with pytest.raises(CryptoError) as err:
        seal_kek_file_tpm("swtpm:host=127.0.0.1,port=1", tmp_path / "k.json", PCRS)
    assert err.value.reason == "tpm_unavailable"
    assert not (tmp_path / "k.json").exists()
