"""HPKE key release (shared.crypto.hpke): RFC 9180's published vectors, then qvm's own API.

The vectors are RFC 9180 Appendix A.1.1 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode)
and A.2.1 (the same KEM and KDF with ChaCha20Poly1305, qvm's suite), transcribed from the RFC's text as
kept in the CFRG's repository: github.com/cfrg/draft-irtf-cfrg-hpke, file auth48/draft-irtf-cfrg-hpke.txt
(commit 8fc0f527186afec23fe2f79992066bff9a8ccfec, the AUTH48 text that became RFC 9180), where they are
numbered B.1.1 and B.2.1 (the draft puts its acknowledgements in appendix A). The A.2.1 values agree with
the copies in BoringSSL-derived and hpke-rs test files.

`cryptography`'s HPKE is single-shot: it opens the message of sequence number 0 (nonce = base_nonce). The
sequence-0 ciphertexts are opened through it (with the vector's aad, via the binding's private
`_decrypt_with_aad`); the sequence-1 ciphertexts, which use base_nonce XOR 1, are opened with the
vector's key and that nonce through the plain AEAD, and the single-shot API is shown to refuse them.
"""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives import hpke as crypto_hpke
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from shared.crypto import CryptoError
from shared.crypto.hpke import (
    ENC_BYTES,
    SUITE,
    SUITE_NAME,
    TAG_BYTES,
    open_sealed,
    release_info,
    seal,
)

INFO = "4f6465206f6e2061204772656369616e2055726e"  # "Ode on a Grecian Urn"
PT = "4265617574792069732074727574682c20747275746820626561757479"  # "Beauty is truth, truth beauty"

VECTORS = {
    # RFC 9180 A.1.1 (draft B.1.1): mode 0, kem_id 32, kdf_id 1, aead_id 1
    "A.1.1": {
        "aead": crypto_hpke.AEAD.AES_128_GCM,
        "cipher": AESGCM,
        "pkEm": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
        "skEm": "52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736",
        "pkRm": "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
        "skRm": "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8",
        "enc": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
        "key": "4531685d41d65f03dc48f6b8302c05b0",
        "base_nonce": "56d890e5accaaf011cff4b7d",
        "encryptions": [
            (0, "436f756e742d30", "56d890e5accaaf011cff4b7d",
             "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"),
            (1, "436f756e742d31", "56d890e5accaaf011cff4b7c",
             "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab251c03d0c22a56b8ca42c2063b84"),
        ],
    },
    # RFC 9180 A.2.1 (draft B.2.1): mode 0, kem_id 32, kdf_id 1, aead_id 3
    "A.2.1": {
        "aead": crypto_hpke.AEAD.CHACHA20_POLY1305,
        "cipher": ChaCha20Poly1305,
        "pkEm": "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
        "skEm": "f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600",
        "pkRm": "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a",
        "skRm": "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb",
        "enc": "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
        "key": "ad2744de8e17f4ebba575b3f5f5a8fa1f69c2a07f6e7500bc60ca6e3e3ec1c91",
        "base_nonce": "5c4d98150661b848853b547f",
        "encryptions": [
            (0, "436f756e742d30", "5c4d98150661b848853b547f",
             "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28"),
            (1, "436f756e742d31", "5c4d98150661b848853b547e",
             "6b53c051e4199c518de79594e1c4ab18b96f081549d45ce015be002090bb119e85285337cc95ba5f59992dc98c"),
        ],
    },
}


def raw_public(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def suite_of(v: dict) -> crypto_hpke.Suite:
    return crypto_hpke.Suite(crypto_hpke.KEM.X25519, crypto_hpke.KDF.HKDF_SHA256, v["aead"])


# ---------------------------------------------------------------- RFC 9180 vectors
@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_keys(name: str) -> None:
    v = VECTORS[name]
    recipient = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(v["skRm"]))
    assert raw_public(recipient).hex() == v["pkRm"]
    ephemeral = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(v["skEm"]))
    assert raw_public(ephemeral).hex() == v["pkEm"]
    assert v["enc"] == v["pkEm"]  # DHKEM's enc is the serialized ephemeral public key


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_sequence_0_opens_with_cryptography_hpke(name: str) -> None:
    v = VECTORS[name]
    seq, aad, nonce, ct = v["encryptions"][0]
    assert seq == 0 and nonce == v["base_nonce"]
    recipient = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(v["skRm"]))
    sealed = bytes.fromhex(v["enc"] + ct)
    pt = rust_openssl.hpke._decrypt_with_aad(suite_of(v), sealed, recipient, info=bytes.fromhex(INFO), aad=bytes.fromhex(aad))
    assert pt.hex() == PT
    # The vector's key schedule outputs open the same ciphertext: they are what the library derived.
    assert v["cipher"](bytes.fromhex(v["key"])).decrypt(bytes.fromhex(nonce), bytes.fromhex(ct),
                                                        bytes.fromhex(aad)).hex() == PT
    # Every input is bound: another info or aad does not open it.
    with pytest.raises(InvalidTag):
        rust_openssl.hpke._decrypt_with_aad(suite_of(v), sealed, recipient, info=b"other", aad=bytes.fromhex(aad))
    with pytest.raises(InvalidTag):
        rust_openssl.hpke._decrypt_with_aad(suite_of(v), sealed, recipient, info=bytes.fromhex(INFO), aad=b"Count-9")


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_sequence_1(name: str) -> None:
    v = VECTORS[name]
    seq, aad, nonce, ct = v["encryptions"][1]
    base = int(v["base_nonce"], 16)
    assert seq == 1 and int(nonce, 16) == base ^ seq  # RFC 9180 5.2: nonce = base_nonce XOR I2OSP(seq, Nn)
    assert v["cipher"](bytes.fromhex(v["key"])).decrypt(bytes.fromhex(nonce), bytes.fromhex(ct),
                                                        bytes.fromhex(aad)).hex() == PT
    # The single-shot API only ever uses sequence 0, so it must refuse the sequence-1 message.
    recipient = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(v["skRm"]))
    with pytest.raises(InvalidTag):
        rust_openssl.hpke._decrypt_with_aad(suite_of(v), bytes.fromhex(v["enc"] + ct), recipient,
                                    info=bytes.fromhex(INFO), aad=bytes.fromhex(aad))


def test_private_aad_api_roundtrip_and_qvm_suite_is_a21() -> None:
    """qvm's SUITE is the A.2.1 suite: it opens the A.2.1 vector (empty aad is what `seal` uses)."""
    v = VECTORS["A.2.1"]
    recipient = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(v["skRm"]))
    _, aad, _, ct = v["encryptions"][0]
    assert rust_openssl.hpke._decrypt_with_aad(SUITE, bytes.fromhex(v["enc"] + ct), recipient, info=bytes.fromhex(INFO),
                                       aad=bytes.fromhex(aad)).hex() == PT
    sealed = rust_openssl.hpke._encrypt_with_aad(SUITE, b"x", recipient.public_key(), info=b"i", aad=b"a")
    assert rust_openssl.hpke._decrypt_with_aad(SUITE, sealed, recipient, info=b"i", aad=b"a") == b"x"
    assert SUITE.decrypt(SUITE.encrypt(b"y", recipient.public_key(), info=b"i"), recipient, info=b"i") == b"y"
    assert SUITE_NAME == "X25519-HKDF-SHA256-ChaCha20Poly1305"


# ---------------------------------------------------------------- seal / open_sealed
@pytest.fixture
def recipient() -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.generate()


INFO_DEK = release_info("dek", "job-1", "inst-1")


@pytest.mark.parametrize("plaintext", [b"k" * 32, bytearray(b"secret bytes"), memoryview(bytearray(b"\x00" * 64))])
def test_roundtrip(recipient: x25519.X25519PrivateKey, plaintext: bytes | bytearray | memoryview) -> None:
    sealed = seal(plaintext, raw_public(recipient), INFO_DEK)
    assert len(sealed) == ENC_BYTES + len(plaintext) + TAG_BYTES
    assert open_sealed(sealed, recipient, INFO_DEK) == bytes(plaintext)
    # interoperable with a plain RFC 9180 implementation of the same suite (empty aad, sequence 0)
    assert SUITE.decrypt(sealed, recipient, info=INFO_DEK) == bytes(plaintext)


def test_fresh_ephemeral_each_time(recipient: x25519.X25519PrivateKey) -> None:
    a = seal(b"same", raw_public(recipient), INFO_DEK)
    b = seal(b"same", raw_public(recipient), INFO_DEK)
    assert a[:ENC_BYTES] != b[:ENC_BYTES] and a != b


@pytest.mark.parametrize("other", [
    release_info("dek", "job-2", "inst-1"),
    release_info("dek", "job-1", "inst-2"),
    release_info("client-secrets", "job-1", "inst-1"),
    b"",
])
def test_wrong_info_fails(recipient: x25519.X25519PrivateKey, other: bytes) -> None:
    sealed = seal(b"k" * 32, raw_public(recipient), INFO_DEK)
    with pytest.raises(CryptoError) as err:
        open_sealed(sealed, recipient, other)
    assert err.value.reason == "unwrap_failed"


def test_wrong_key_fails(recipient: x25519.X25519PrivateKey) -> None:
    sealed = seal(b"k" * 32, raw_public(recipient), INFO_DEK)
    with pytest.raises(CryptoError) as err:
        open_sealed(sealed, x25519.X25519PrivateKey.generate(), INFO_DEK)
    assert err.value.reason == "unwrap_failed"


def test_every_tampered_byte_fails(recipient: x25519.X25519PrivateKey) -> None:
    sealed = seal(b"k" * 8, raw_public(recipient), INFO_DEK)
    for i in range(len(sealed)):  # enc, ciphertext and tag alike
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        with pytest.raises(CryptoError) as err:
            open_sealed(bytes(tampered), recipient, INFO_DEK)
        assert err.value.reason == "unwrap_failed"


@pytest.mark.parametrize("cut", [0, 1, ENC_BYTES, ENC_BYTES + TAG_BYTES - 1])
def test_truncated_fails(recipient: x25519.X25519PrivateKey, cut: int) -> None:
    sealed = seal(b"k" * 32, raw_public(recipient), INFO_DEK)
    with pytest.raises(CryptoError) as err:
        open_sealed(sealed[:cut], recipient, INFO_DEK)
    assert err.value.reason == "unwrap_failed"
    with pytest.raises(CryptoError):
        open_sealed(sealed + b"\x00", recipient, INFO_DEK)


def test_not_an_x25519_private_key(recipient: x25519.X25519PrivateKey) -> None:
    sealed = seal(b"k", raw_public(recipient), INFO_DEK)
    with pytest.raises(CryptoError) as err:
        open_sealed(sealed, ec.generate_private_key(ec.SECP256R1()), INFO_DEK)  # type: ignore[arg-type]
    assert err.value.reason == "unwrap_failed"


@pytest.mark.parametrize("key", [b"", b"\x01" * 31, b"\x01" * 33, b"\x01" * 64])
def test_bad_key_length(key: bytes) -> None:
    with pytest.raises(CryptoError) as err:
        seal(b"k", key, INFO_DEK)
    assert err.value.reason == "bad_recipient_key"


def test_low_order_recipient_refused() -> None:
    """An all-zero X25519 public key makes an all-zero shared secret, which RFC 9180 7.1.4 rejects."""
    with pytest.raises(CryptoError) as err:
        seal(b"k", bytes(32), INFO_DEK)
    assert err.value.reason == "bad_recipient_key"


def test_hex_string_is_not_a_key() -> None:
    with pytest.raises(CryptoError):
        seal(b"k", "ab" * 16, INFO_DEK)  # type: ignore[arg-type]


# ---------------------------------------------------------------- release_info
def test_release_info_layout() -> None:
    assert release_info("dek", "j", "i") == b"qvm-key-release-v1\x00\x03dek\x01j\x01i"
    assert release_info("client-secrets", "job", "ü") == b"qvm-key-release-v1\x00\x0eclient-secrets\x03job\x02\xc3\xbc"


@pytest.mark.parametrize("args", [("volume", "j", "i"), ("dek", "", "i"), ("dek", "j", ""), ("dek", "j" * 256, "i"),
                                  ("DEK", "j", "i")])
def test_release_info_refuses(args: tuple[str, str, str]) -> None:
    with pytest.raises(CryptoError) as err:
        release_info(*args)
    assert err.value.reason == "bad_release_info"


ids = st.text(min_size=1, max_size=40)


@given(st.sampled_from(["dek", "client-secrets"]), ids, ids, st.sampled_from(["dek", "client-secrets"]), ids, ids)
def test_release_info_is_injective(p1: str, j1: str, i1: str, p2: str, j2: str, i2: str) -> None:
    """Different (purpose, job, instance) never encode alike, whatever the ids contain (separators too)."""
    if (p1, j1, i1) != (p2, j2, i2):
        assert release_info(p1, j1, i1) != release_info(p2, j2, i2)
    else:
        assert release_info(p1, j1, i1) == release_info(p2, j2, i2)


def test_release_info_boundary_shift() -> None:
    assert release_info("dek", "ab", "c") != release_info("dek", "a", "bc")
