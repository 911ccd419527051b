"""Key release: seal a secret to one attested instance's X25519 key, with HPKE (RFC 9180).

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305 (kem 0x0020, kdf 0x0001, aead 0x0003),
base mode (no PSK, no sender authentication: the key-broker's authenticity comes from its signed event,
the recipient's from its attestation). All the cryptography is `cryptography`'s HPKE one-shot API; qvm only
chooses the suite, encodes `info` and maps failures to `CryptoError`.

Wire format: `sealed = enc || ct`, enc the 32-byte ephemeral public key, ct the AEAD ciphertext of the
plaintext with its 16-byte tag (the single message of an HPKE context, sequence number 0, empty aad).

Binding. `cryptography`'s public API takes no per-message aad, so everything a sealed key is bound to
goes into `info` (`release_info`): purpose, job id and instance id (`output_info` adds a chunk's sequence
number, for workload output sealed to the client's key). `info` enters the HPKE key schedule
(`key_schedule_context = mode || H(psk_id) || H(info)`, RFC 9180 section 5.1), so a sealed DEK for job A /
instance X cannot be opened as job B's, as another instance's, or as client secrets: the derived key differs
and the AEAD tag fails. The recipient key already limits who can open it; `info` limits what it opens as.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from shared.crypto.errors import CryptoError

__all__ = [
    "ENC_BYTES",
    "INFO_LABEL",
    "OUTPUT_PURPOSE",
    "PUBLIC_KEY_BYTES",
    "PURPOSES",
    "SUITE",
    "SUITE_NAME",
    "TAG_BYTES",
    "check_public_key",
    "open_sealed",
    "output_info",
    "release_info",
    "seal",
]

SUITE_NAME = "X25519-HKDF-SHA256-ChaCha20Poly1305"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
PUBLIC_KEY_BYTES = 32  # Npk of DHKEM(X25519)
ENC_BYTES = 32  # Nenc of DHKEM(X25519)
TAG_BYTES = 16  # ChaCha20-Poly1305
INFO_LABEL = b"qvm-key-release-v1"
PURPOSES = frozenset({"dek", "client-secrets"})
OUTPUT_PURPOSE = "output"  # workload output sealed to the client (`output_info`); never a `release_info` purpose
MAX_SEQ = 2**63 - 1
MAX_FIELD_BYTES = 255  # ids are short; a length byte per field keeps `info` unambiguous and small
MAX_PLAINTEXT = 1 << 24  # a DEK is 32 bytes, a client's secret bundle a few MiB at most


def release_info(purpose: str, job_id: str, instance_id: str) -> bytes:
    """The HPKE `info` of one release: what the sealed secret is, for which job, for which instance.

    Encoding: `INFO_LABEL || 0x00 || len(purpose) || purpose || len(job) || job || len(instance) || instance`,
    each length one byte and each field UTF-8. Length prefixes make it injective (no two different triples
    encode alike, whatever characters the ids hold), the label separates it from any other use of the same
    key pair. `info` is bound into the HPKE key schedule (see the module docstring), which is why it carries
    the binding rather than an aad.
    """
    if purpose not in PURPOSES:
        raise CryptoError("bad_release_info", f"purpose {purpose[:40]!r} (one of {', '.join(sorted(PURPOSES))})")
    return _info(purpose, job_id, instance_id)


def output_info(job_id: str, instance_id: str, seq: int) -> bytes:
    """The HPKE `info` of one chunk of a workload's output, sealed to the client's output key.

    `release_info`'s layout with the purpose `OUTPUT_PURPOSE` (which `release_info` refuses, so no release
    encodes alike), followed by the chunk's sequence number as 8 bytes big-endian: a chunk opens only as
    that chunk of that instance of that job, so chunks cannot be swapped between jobs or instances, or
    reordered, without the AEAD tag failing.
    """
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise CryptoError("bad_release_info", f"chunk sequence number {str(seq)[:24]} (0..{MAX_SEQ})")
    return _info(OUTPUT_PURPOSE, job_id, instance_id) + seq.to_bytes(8, "big")


def _info(purpose: str, job_id: str, instance_id: str) -> bytes:
    out = bytearray(INFO_LABEL + b"\x00")
    for name, value in (("purpose", purpose), ("job id", job_id), ("instance id", instance_id)):
        raw = value.encode("utf-8")
        if not raw:
            raise CryptoError("bad_release_info", f"empty {name}")
        if len(raw) > MAX_FIELD_BYTES:
            raise CryptoError("bad_release_info", f"{name} is {len(raw)} bytes (at most {MAX_FIELD_BYTES})")
        out.append(len(raw))
        out += raw
    return bytes(out)


def _recipient(recipient_public: bytes) -> x25519.X25519PublicKey:
    if not isinstance(recipient_public, bytes | bytearray) or len(recipient_public) != PUBLIC_KEY_BYTES:
        size = len(recipient_public) if isinstance(recipient_public, bytes | bytearray) else "?"
        raise CryptoError("bad_recipient_key", f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes, got {size}")
    try:
        return x25519.X25519PublicKey.from_public_bytes(bytes(recipient_public))
    except ValueError as exc:
        raise CryptoError("bad_recipient_key", f"not an X25519 public key: {exc}") from None


def check_public_key(recipient_public: bytes) -> None:
    """Refuse what `seal` would refuse as a recipient: not 32 bytes, or a low-order X25519 point (an all-zero
    shared secret, RFC 9180 section 7.1.4), found by one key agreement with a throwaway key inside
    `cryptography`. For keys checked long before anything is sealed to them (a job's output key)."""
    public = _recipient(recipient_public)
    try:
        x25519.X25519PrivateKey.generate().exchange(public)
    except ValueError as exc:  # OpenSSL refuses the DH (low-order point)
        raise CryptoError("bad_recipient_key", f"key agreement failed: {exc}") from None


def seal(plaintext: bytes | bytearray | memoryview, recipient_public: bytes, info: bytes) -> bytes:
    """Encrypt `plaintext` to the holder of `recipient_public` (raw 32-byte X25519); returns enc || ct.

    A fresh ephemeral key per call (inside `cryptography`), so sealing the same secret twice gives unrelated
    outputs. `plaintext` may be the caller's bytearray: it is read, not copied into Python objects, and the
    caller zeroizes it afterwards. A low-order recipient key (an all-zero shared secret, which RFC 9180
    section 7.1.4 requires to be rejected) fails as `bad_recipient_key`.
    """
    public = _recipient(recipient_public)
    if len(plaintext) > MAX_PLAINTEXT:
        raise CryptoError("seal_failed", f"plaintext of {len(plaintext)} bytes (at most {MAX_PLAINTEXT})")
    try:
        return SUITE.encrypt(plaintext, public, info=info)
    except ValueError as exc:  # OpenSSL refuses the DH (low-order point)
        raise CryptoError("bad_recipient_key", f"key agreement failed: {exc}") from None


def open_sealed(sealed: bytes, private_key: x25519.X25519PrivateKey, info: bytes) -> bytes:
    """Decrypt `enc || ct` with the recipient's private key and the same `info` it was sealed with.

    Every failure (too short, wrong key, wrong info, altered byte) is `CryptoError("unwrap_failed")`: the
    reasons are deliberately not told apart, an AEAD failure says nothing about which input was wrong.
    """
    if not isinstance(private_key, x25519.X25519PrivateKey):
        raise CryptoError("unwrap_failed", "the private key is not an X25519 key")
    if len(sealed) < ENC_BYTES + TAG_BYTES:
        raise CryptoError("unwrap_failed", f"sealed data of {len(sealed)} bytes is shorter than enc + tag")
    try:
        return SUITE.decrypt(sealed, private_key, info=info)
    except (InvalidTag, ValueError):
        raise CryptoError("unwrap_failed", "the sealed key does not open with this key and binding") from None
