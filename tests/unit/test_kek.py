"""Envelope encryption (shared.crypto.kek) and secret buffers (shared.crypto.secret), without a TPM.

Passphrase files use Scrypt n=2^14 here (the floor the file format accepts) so the suite stays fast;
the default (2^17) is exercised once, through the development-default source.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import KekSettings
from shared.crypto import CryptoError
from shared.crypto.kek import (
    KEK_BYTES,
    KekRing,
    KekSource,
    ManagedKekSource,
    PassphraseFileSource,
    TpmSealedSource,
    WrappedKey,
    create_kek_file,
    default_kek_paths,
    load_ring,
    load_source,
    read_passphrase,
    rotate_kek_file,
    source_for,
)
from shared.crypto.secret import SecretBuffer, random_secret, zeroize
from shared.errors import ConfigError

PASS = b"correct horse battery staple"
FAST = 14


def ring_of(*versions: int) -> tuple[KekRing, dict[int, bytearray]]:
    keys = {v: random_secret(KEK_BYTES) for v in versions}
    return KekRing(keys, {v: v * 1000 for v in versions}), keys


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "kek.json"
    create_kek_file(path, bytearray(PASS), scrypt_log2_n=FAST)
    return path


def reason(exc: pytest.ExceptionInfo[CryptoError]) -> str:
    return exc.value.reason


# ====================================================================== secret buffers
def test_zeroize_bytearray_and_views() -> None:
    buf = bytearray(b"secret!!")
    zeroize(buf)
    assert buf == bytearray(8)
    buf.extend(b"x")  # no export left behind: the buffer can still be resized
    other = bytearray(b"abcdef")
    zeroize(memoryview(other)[2:4])
    assert other == bytearray(b"ab\x00\x00ef")
    zeroize(bytearray())


def test_zeroize_refuses_read_only() -> None:
    with pytest.raises(TypeError):
        zeroize(memoryview(b"immutable"))
    with pytest.raises(TypeError):
        zeroize(b"immutable")  # type: ignore[arg-type]


def test_random_secret() -> None:
    a, b = random_secret(32), random_secret(32)
    assert isinstance(a, bytearray) and len(a) == 32 and a != b
    with pytest.raises(ValueError):
        random_secret(0)


def test_secret_buffer_wipes_even_on_error() -> None:
    sb = SecretBuffer.random(16)
    with pytest.raises(RuntimeError), sb as key:
        held = key
        assert any(held)
        raise RuntimeError("boom")
    assert held == bytearray(16)
    assert "wiped" in repr(sb) and "bytes" in repr(sb)
    with pytest.raises(ValueError):
        _ = sb.value


# ====================================================================== wrapped keys
def test_wrapped_key_roundtrip() -> None:
    w = WrappedKey(3, b"n" * 12, b"c" * 48)
    assert WrappedKey.from_bytes(w.to_bytes()) == w


@pytest.mark.parametrize("blob", [
    b"", b"\xc1", msgpack.packb([1, 1, b"n" * 12]), msgpack.packb([2, 1, b"n" * 12, b"c" * 48]),
    msgpack.packb([1, 0, b"n" * 12, b"c" * 48]), msgpack.packb([1, True, b"n" * 12, b"c" * 48]),
    msgpack.packb([1, 1, b"n" * 11, b"c" * 48]), msgpack.packb([1, 1, b"n" * 12, b"c" * 16]),
    msgpack.packb([1, 1, "n" * 12, b"c" * 48]), msgpack.packb({"k": 1}), msgpack.packb([1, 1, b"n" * 12, b"c" * 48]) + b"x",
])
def test_wrapped_key_malformed(blob: bytes) -> None:
    with pytest.raises(CryptoError) as err:
        WrappedKey.from_bytes(blob)
    assert reason(err) == "malformed_wrapped_key"


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_wrapped_key_fuzz_never_raises_foreign(blob: bytes) -> None:
    with contextlib.suppress(CryptoError):
        WrappedKey.from_bytes(blob)


# ====================================================================== the ring
def test_wrap_unwrap() -> None:
    ring, _ = ring_of(1)
    dek = random_secret(32)
    w = ring.wrap(dek, b"job-1")
    assert w.kek_version == 1 and len(w.nonce) == 12 and len(w.ciphertext) == 48
    out = ring.unwrap(WrappedKey.from_bytes(w.to_bytes()), b"job-1")
    assert isinstance(out, bytearray) and out == dek
    assert ring.wrap(dek, b"job-1").nonce != w.nonce  # fresh nonce every time


def test_unwrap_binds_aad_and_version() -> None:
    ring, _ = ring_of(1, 2)
    w = ring.wrap(b"k" * 32, b"job-1")
    assert w.kek_version == 2
    with pytest.raises(CryptoError) as err:
        ring.unwrap(w, b"job-2")
    assert reason(err) == "unwrap_failed"
    with pytest.raises(CryptoError) as err:  # relabelled as another version the ring has
        ring.unwrap(WrappedKey(1, w.nonce, w.ciphertext), b"job-1")
    assert reason(err) == "unwrap_failed"
    with pytest.raises(CryptoError) as err:
        ring.unwrap(WrappedKey(7, w.nonce, w.ciphertext), b"job-1")
    assert reason(err) == "unknown_kek_version"
    for i in range(len(w.ciphertext)):
        ct = bytearray(w.ciphertext)
        ct[i] ^= 0x80
        with pytest.raises(CryptoError):
            ring.unwrap(WrappedKey(2, w.nonce, bytes(ct)), b"job-1")
    with pytest.raises(CryptoError):
        ring.unwrap(WrappedKey(2, bytes(12), w.ciphertext), b"job-1")


def test_unwrap_with_other_ring_fails() -> None:
    a, _ = ring_of(1)
    b, _ = ring_of(1)
    with pytest.raises(CryptoError) as err:
        b.unwrap(a.wrap(b"k" * 32, b"x"), b"x")
    assert reason(err) == "unwrap_failed"


def test_rewrap_moves_to_current() -> None:
    keys = {1: random_secret(32)}
    old = KekRing({1: bytearray(keys[1])})
    w1 = old.wrap(b"D" * 32, b"job")
    new = KekRing({1: bytearray(keys[1]), 2: random_secret(32)})
    w2 = new.rewrap(w1, b"job")
    assert w2.kek_version == 2 and w2.ciphertext != w1.ciphertext
    assert new.unwrap(w2, b"job") == bytearray(b"D" * 32)
    assert new.rewrap(w2, b"job") is w2
    with pytest.raises(CryptoError):
        new.rewrap(w1, b"other-job")


def test_close_zeroizes_and_refuses() -> None:
    ring, keys = ring_of(1, 2)
    w = ring.wrap(b"k" * 32, b"a")
    with ring:
        pass
    assert ring.closed and all(k == bytearray(32) for k in keys.values())
    for op in (lambda: ring.wrap(b"k", b"a"), lambda: ring.unwrap(w, b"a"), lambda: ring.rewrap(w, b"a")):
        with pytest.raises(CryptoError) as err:
            op()
        assert reason(err) == "kek_ring_closed"
    assert "closed=True" in repr(ring)


def test_ring_facts_and_validation() -> None:
    ring, keys = ring_of(3, 1, 2)
    assert ring.versions == (1, 2, 3) and ring.current == 3 and ring.created_ns == {1: 1000, 2: 2000, 3: 3000}
    assert keys[1].hex() not in repr(ring)
    for bad in ({}, {0: random_secret(32)}, {1: bytes(32)}, {1: random_secret(16)}):
        with pytest.raises(CryptoError):
            KekRing(bad)  # type: ignore[arg-type]
    with pytest.raises(CryptoError) as err:
        ring.wrap(b"", b"a")
    assert reason(err) == "wrap_failed"


# ====================================================================== passphrase file
def test_create_load_rotate(kek_file: Path) -> None:
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600
    doc = json.loads(kek_file.read_text())
    assert doc["format"] == "qvm-kek-passphrase-file" and doc["kdf"]["name"] == "scrypt"
    assert doc["kdf"]["log2_n"] == FAST and doc["kdf"]["r"] == 8 and doc["kdf"]["p"] == 1
    source = PassphraseFileSource(kek_file, bytearray(PASS))
    ring = source.load()
    assert ring.versions == (1,) and ring.created_ns[1] > 0
    kek1 = bytes(ring._keys[1])
    assert kek1.hex() not in kek_file.read_text()
    w = ring.wrap(b"D" * 32, b"job")

    assert rotate_kek_file(kek_file, bytearray(PASS)) == 2
    assert source.rotate() == 3
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600
    ring2 = source.load()
    assert ring2.versions == (1, 2, 3) and ring2.current == 3
    assert bytes(ring2._keys[1]) == kek1  # old versions survive rotation unchanged
    assert ring2.unwrap(w, b"job") == bytearray(b"D" * 32)
    assert ring2.rewrap(w, b"job").kek_version == 3
    assert [p.name for p in kek_file.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_refuses_overwrite(kek_file: Path) -> None:
    before = kek_file.read_bytes()
    with pytest.raises(CryptoError) as err:
        create_kek_file(kek_file, bytearray(PASS), scrypt_log2_n=FAST)
    assert reason(err) == "kek_file_exists"
    with pytest.raises(CryptoError):
        PassphraseFileSource(kek_file, PASS).init()
    assert kek_file.read_bytes() == before


def test_wrong_passphrase(kek_file: Path) -> None:
    for bad in (b"correct horse battery stapl3", b"x" * 8):
        with pytest.raises(CryptoError) as err:
            PassphraseFileSource(kek_file, bytearray(bad)).load()
        assert reason(err) == "bad_passphrase"
    with pytest.raises(CryptoError) as err:
        rotate_kek_file(kek_file, b"wrong passphrase")
    assert reason(err) == "bad_passphrase"
    assert len(json.loads(kek_file.read_text())["keys"]) == 1


def test_weak_passphrase(tmp_path: Path) -> None:
    with pytest.raises(CryptoError) as err:
        create_kek_file(tmp_path / "k.json", b"short", scrypt_log2_n=FAST)
    assert reason(err) == "weak_passphrase"
    assert not (tmp_path / "k.json").exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CryptoError) as err:
        PassphraseFileSource(tmp_path / "none.json", PASS).load()
    assert reason(err) == "kek_file_missing"


def _mutate(doc: dict, how: str) -> object:
    if how == "format":
        doc["format"] = "something-else"
    elif how == "huge_n":
        doc["kdf"]["log2_n"] = 30
    elif how == "tiny_n":
        doc["kdf"]["log2_n"] = 1
    elif how == "extra_field":
        doc["extra"] = 1
    elif how == "no_keys":
        doc["keys"] = []
    elif how == "dup_version":
        doc["keys"].append(dict(doc["keys"][0]))
    elif how == "not_hex":
        doc["keys"][0]["nonce"] = "zz" * 12
    elif how == "renumbered":
        doc["keys"][0]["version"] = 5
    elif how == "altered_key":
        ct = bytearray(bytes.fromhex(doc["keys"][0]["ciphertext"]))
        ct[0] ^= 1
        doc["keys"][0]["ciphertext"] = ct.hex()
    elif how == "short_key":
        doc["keys"][0]["ciphertext"] = doc["keys"][0]["ciphertext"][:-2]
    elif how == "list":
        return [doc]
    return doc


@pytest.mark.parametrize("how", ["format", "huge_n", "tiny_n", "extra_field", "no_keys", "dup_version", "not_hex",
                                 "renumbered", "altered_key", "short_key", "list"])
def test_corrupt_file_is_a_clean_error(kek_file: Path, how: str) -> None:
    kek_file.write_text(json.dumps(_mutate(json.loads(kek_file.read_text()), how)))
    with pytest.raises(CryptoError) as err:
        PassphraseFileSource(kek_file, PASS).load()
    assert reason(err) == "kek_file_corrupt", err.value


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"null", b"[]", b"x" * (1 << 20 + 1)])
def test_garbage_file_is_a_clean_error(kek_file: Path, content: bytes) -> None:
    kek_file.write_bytes(content)
    with pytest.raises(CryptoError) as err:
        PassphraseFileSource(kek_file, PASS).load()
    assert reason(err) == "kek_file_corrupt"


def test_altered_check_entry_reads_as_wrong_passphrase(kek_file: Path) -> None:
    doc = json.loads(kek_file.read_text())
    doc["check"]["ciphertext"] = "00" * 16
    kek_file.write_text(json.dumps(doc))
    with pytest.raises(CryptoError) as err:
        PassphraseFileSource(kek_file, PASS).load()
    assert reason(err) == "bad_passphrase"


def test_concurrent_rotations_both_land(kek_file: Path) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def rotate() -> None:
        try:
            results.append(rotate_kek_file(kek_file, PASS))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rotate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [2, 3, 4]
    assert PassphraseFileSource(kek_file, PASS).load().versions == (1, 2, 3, 4)


def test_source_keeps_its_own_passphrase_copy(kek_file: Path) -> None:
    secret = bytearray(PASS)
    source = PassphraseFileSource(kek_file, secret)
    zeroize(secret)
    assert source.load().versions == (1,)
    source.close()
    with pytest.raises(CryptoError):
        source.load()  # its copy is wiped too


# ====================================================================== sources by spec
def test_protocols() -> None:
    assert isinstance(PassphraseFileSource(Path("x"), PASS), ManagedKekSource)
    assert isinstance(TpmSealedSource("swtpm:port=1", Path("x"), (7,)), ManagedKekSource)
    from tests.unit.kek_kms_plugin import factory

    kms = factory()
    assert isinstance(kms, KekSource) and not isinstance(kms, ManagedKekSource)


def test_file_spec_passphrase_from_env(kek_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVM_KEK_PASSPHRASE", PASS.decode())
    source = load_source(f"file:{kek_file}", settings=KekSettings())
    assert isinstance(source, PassphraseFileSource) and str(kek_file) in source.describe()
    assert PASS.decode() not in source.describe() and PASS.decode() not in repr(source)
    assert source.load().versions == (1,)
    monkeypatch.setenv("OTHER_ENV", "nope nope nope")
    with pytest.raises(CryptoError) as err:
        load_source(f"file:{kek_file}", "OTHER_ENV", settings=KekSettings()).load()
    assert reason(err) == "bad_passphrase"


def test_file_spec_passphrase_file_wins(kek_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVM_KEK_PASSPHRASE", "the wrong one entirely")
    pf = tmp_path / "pass"
    pf.write_bytes(PASS + b"\n")
    s = KekSettings(kek_passphrase_file=pf)
    assert read_passphrase(pf) == bytearray(PASS)
    assert load_source(f"file:{kek_file}", settings=s).load().versions == (1,)


def test_file_spec_without_passphrase(kek_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QVM_KEK_PASSPHRASE", raising=False)
    with pytest.raises(ConfigError):
        load_source(f"file:{kek_file}", settings=KekSettings())
    with pytest.raises(ConfigError):
        load_source(f"file:{kek_file}", settings=KekSettings(kek_passphrase_file=kek_file.parent / "absent"))


def test_tpm_spec_parsing() -> None:
    s = KekSettings(tpm="swtpm:host=127.0.0.1,port=2321")
    src = load_source("tpm:/var/lib/qvm/kek.tpm.json?pcrs=7,0", settings=s)
    assert isinstance(src, TpmSealedSource)
    assert (src.tcti, src.path, src.pcrs) == ("swtpm:host=127.0.0.1,port=2321", Path("/var/lib/qvm/kek.tpm.json"), (0, 7))
    src = load_source("tpm:/k.json?pcrs=15&tcti=swtpm:host=127.0.0.1,port=9", settings=KekSettings())
    assert isinstance(src, TpmSealedSource) and src.tcti == "swtpm:host=127.0.0.1,port=9" and src.pcrs == (15,)
    assert isinstance(src, TpmSealedSource) and "sha256:15" in src.describe()
    src = load_source("tpm:/k.json", settings=s)
    assert isinstance(src, TpmSealedSource) and src.pcrs == ()


@pytest.mark.parametrize("spec", ["tpm:/k.json?pcrs=0,x", "tpm:/k.json?pcrs=24", "tpm:/k.json?other=1",
                                  "tpm:?pcrs=0", "tpm:/k.json?pcrs=1&pcrs=2", "tpm:/k.json?pcrs=-1"])
def test_tpm_spec_refused(spec: str) -> None:
    with pytest.raises(ConfigError):
        load_source(spec, settings=KekSettings(tpm="swtpm:port=1"))


def test_tpm_spec_needs_a_tpm() -> None:
    with pytest.raises(ConfigError):
        load_source("tpm:/k.json?pcrs=7", settings=KekSettings(tpm=None))


def test_kms_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVM_TEST_KMS_SEED", "s1")
    monkeypatch.setenv("QVM_TEST_KMS_VERSIONS", "3")
    source = load_source("kms:tests.unit.kek_kms_plugin:factory")
    assert source.describe() == "test KMS (3 versions)"
    ring = source.load()
    assert ring.versions == (1, 2, 3)
    w = ring.wrap(b"k" * 32, b"job")
    again = load_source("kms:tests.unit.kek_kms_plugin:factory").load()
    assert again.unwrap(w, b"job") == bytearray(b"k" * 32)
    monkeypatch.setenv("QVM_KEK_SOURCE", "kms:tests.unit.kek_kms_plugin:factory")
    assert load_ring(KekSettings()).versions == (1, 2, 3)


@pytest.mark.parametrize("spec", [
    "kms:tests.unit.kek_kms_plugin:not_a_source", "kms:tests.unit.kek_kms_plugin:broken",
    "kms:tests.unit.kek_kms_plugin:NOT_CALLABLE", "kms:tests.unit.kek_kms_plugin:absent",
    "kms:tests.unit.no_such_module:factory", "kms:tests.unit.kek_kms_plugin", "kms::factory",
    "nosuch:/x", "file", "", "file:", "/just/a/path",
])
def test_bad_specs_are_config_errors(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVM_KEK_PASSPHRASE", PASS.decode())
    with pytest.raises(ConfigError):
        load_source(spec, settings=KekSettings())


# ====================================================================== development default
def test_development_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QVM_KEK_PASSPHRASE", raising=False)
    monkeypatch.delenv("QVM_KEK_SOURCE", raising=False)
    s = KekSettings(state_dir=tmp_path / "state")
    assert s.kek_source == "" and s.kek_passphrase_file is None
    kek_path, pass_path = default_kek_paths(s.state_dir)
    assert "development" in source_for(s).describe()
    ring = load_ring(s)  # first use: both files are created
    assert ring.versions == (1,)
    for p in (kek_path, pass_path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert json.loads(kek_path.read_text())["kdf"]["log2_n"] == 17  # the production default
    w = ring.wrap(b"k" * 32, b"job")
    again = load_ring(s)  # second use: the same KEKs
    assert again.unwrap(w, b"job") == bytearray(b"k" * 32)
    os.remove(pass_path)  # a lost passphrase makes a new one, which does not open the old file
    with pytest.raises(CryptoError) as err:
        load_ring(s)
    assert reason(err) == "bad_passphrase"
