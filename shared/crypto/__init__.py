"""qvm's key-handling building blocks: HPKE key release, envelope encryption under KEKs, secret buffers.

    hpke     seal a key to an attested instance's X25519 key (RFC 9180 base mode, via `cryptography`)
    output   seal each chunk of a workload's output to the client's X25519 key; the digest of the sealed chunks
    kek      KEK rings and the sources they load from (passphrase file, TPM-sealed file, KMS plug-in);
             wrap / unwrap / rewrap of data-encryption keys
    secret   bytearrays that are overwritten after use

Every failure is a `CryptoError` (a `ReasonedError`: a stable reason code and a detail that is never
secret), so callers catch qvm errors only and the key-broker can report the reason on the bus.
"""

from shared.crypto.errors import CryptoError

__all__ = ["CryptoError"]
