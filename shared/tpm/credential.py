"""TPM2_MakeCredential in pure Python: the verifier's half of credential activation.

The verifier encrypts a fresh secret so that only the TPM holding the EK can recover it, and only for
a key with the AK's Name loaded beside it (TPM 2.0 Part 1, 24 "Credential Protection"):

    seed        random, encrypted to the EK: RSA-OAEP(label "IDENTITY\\0"), or ECDH + KDFe for ECC EKs
    symKey      KDFa(nameAlg, seed, "STORAGE", AK name, "", 128)
    encIdentity AES-128-CFB(symKey, iv=0) over TPM2B_DIGEST(secret)
    hmacKey     KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)
    outerHMAC   HMAC(hmacKey, encIdentity || AK name)

The primitives are `cryptography`'s (OAEP, ECDH, SP 800-108 KBKDF = KDFa, SP 800-56A ConcatKDF = KDFe,
AES-CFB, HMAC); only the TPM's framing is written here. A real TPM's ActivateCredential checks it
(tests/integration/test_tpm.py).
"""

from __future__ import annotations

import os
import struct

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

try:  # cryptography >= 43 keeps CFB (which the TPM mandates here) among its "decrepit" modes
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from shared.tpm.quote import QuoteError
from shared.tpm.structures import Alg, ObjectAttr, PublicArea

__all__ = ["make_credential"]

_LABEL = b"IDENTITY\x00"
_HASH: dict[int, type[hashes.HashAlgorithm]] = {Alg.SHA256: hashes.SHA256, Alg.SHA384: hashes.SHA384}


def _kdfa(h: type[hashes.HashAlgorithm], key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    return KBKDFHMAC(h(), Mode.CounterMode, bits // 8, 4, 4, CounterLocation.BeforeFixed, label, context,
                     None).derive(key)


def _b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _seed(ek: PublicArea, h: type[hashes.HashAlgorithm]) -> tuple[bytes, bytes]:
    key = ek.key()
    size = h().digest_size
    if isinstance(key, rsa.RSAPublicKey):
        seed = os.urandom(size)
        return seed, key.encrypt(seed, padding.OAEP(padding.MGF1(h()), h(), _LABEL))
    eph = ec.generate_private_key(key.curve)
    n = (key.curve.key_size + 7) // 8
    ex = eph.public_key().public_numbers().x.to_bytes(n, "big")
    ey = eph.public_key().public_numbers().y.to_bytes(n, "big")
    z = eph.exchange(ec.ECDH(), key)
    seed = ConcatKDFHash(h(), size, _LABEL + ex + key.public_numbers().x.to_bytes(n, "big")).derive(z)
    return seed, _b(ex) + _b(ey)


def make_credential(ek: PublicArea, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """Returns (TPM2B_ID_OBJECT credentialBlob, TPM2B_ENCRYPTED_SECRET) for ActivateCredential."""
    if not ek.has(ObjectAttr.RESTRICTED | ObjectAttr.DECRYPT | ObjectAttr.FIXEDTPM) or ek.has(ObjectAttr.SIGN_ENCRYPT):
        raise QuoteError("ek_invalid", f"EK attributes 0x{ek.attributes:08x}: not a restricted decryption key")
    if ek.symmetric != Alg.AES or ek.name_alg not in _HASH:
        raise QuoteError("ek_invalid", "EK is not an AES-128-CFB storage key with a SHA-256/384 name")
    if not 1 <= len(secret) <= 32:
        raise ValueError("a credential is 1 to 32 bytes")
    h = _HASH[ek.name_alg]
    seed, encrypted_seed = _seed(ek, h)
    sym = _kdfa(h, seed, b"STORAGE", ak_name, 128)
    enc = Cipher(algorithms.AES(sym), CFB(b"\x00" * 16)).encryptor()
    enc_identity = enc.update(_b(secret)) + enc.finalize()
    mac = hmac.HMAC(_kdfa(h, seed, b"INTEGRITY", b"", h().digest_size * 8), h())
    mac.update(enc_identity + ak_name)
    blob = _b(mac.finalize()) + enc_identity
    return _b(blob), _b(encrypted_seed)
