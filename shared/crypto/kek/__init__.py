"""Envelope encryption: data-encryption keys (DEKs) stored only wrapped under key-encryption keys (KEKs).

A job's DEK is random and used once; what is stored is `WrappedKey` (AES-256-GCM of the DEK under one KEK
version). The KEKs form a `KekRing` held in the key-broker's memory: every version ever made (so old
wrapped keys still open), the highest one current (new keys are wrapped under it). Rotation adds a
version; `KekRing.rewrap` moves a wrapped key to the current one, so an old version can be retired once
nothing refers to it any more.

Where a ring comes from is a `KekSource` (`load() -> KekRing`, `describe() -> str`):

    file:/path              PassphraseFileSource: each KEK AES-256-GCM-encrypted under a key that Scrypt
                            derives from a passphrase (QVM_KEK_PASSPHRASE or QVM_KEK_PASSPHRASE_FILE)
    tpm:/path?pcrs=0,7      TpmSealedSource: each KEK a TPM2 sealed data object under the host TPM's storage
                            root key, unsealable only while the sha256 PCRs hold the values it was sealed to
                            (QVM_TPM, or `&tcti=...` in the spec, names the TPM)
    kms:pkg.module:factory  an external KMS: `factory()` returns any object with `load` and `describe`
    (empty)                 development default: a passphrase file under the state dir, created on first
                            use with a random passphrase stored beside it (protects nothing at rest; for
                            `qvm up` and tests only)

Wrapping binds the KEK version and the caller's `aad` (for a DEK: its job id) as AES-GCM associated data,
so a wrapped key copied to another job's record, or relabelled with another version, does not unwrap.

Secrets stay in bytearrays this package owns and overwrites (`shared.crypto.secret`): KEKs are decrypted
or unsealed into fresh bytearrays (`decrypt_into`), the passphrase-derived key is derived into one
(`derive_into`), `KekRing.close()` zeroes every KEK. Copies inside OpenSSL (the AESGCM context) and the
TSS are outside Python's reach; see `shared.crypto.secret` for what that means.

Nothing here logs or prints key material; `describe()` and errors name files, versions and PCRs only.

The package, by concern:

    ring        KekRing, WrappedKey (the wrap format), the KekSource protocols
    files       bounded reads and atomic writes of KEK files
    passphrase  PassphraseFileSource, create_kek_file / rotate_kek_file, read_passphrase
    tpm_sealed  TpmSealedSource, seal_kek_file_tpm
    kms         kms: plug-ins
    spec        load_source (a spec string), source_for (the configured source), load_ring
"""

from shared.crypto.kek.passphrase import PassphraseFileSource, create_kek_file, read_passphrase, rotate_kek_file
from shared.crypto.kek.ring import KEK_BYTES, KekRing, KekSource, ManagedKekSource, WrappedKey
from shared.crypto.kek.spec import default_kek_paths, load_ring, load_source, source_for
from shared.crypto.kek.tpm_sealed import TpmSealedSource, seal_kek_file_tpm

__all__ = [
    "KEK_BYTES",
    "KekRing",
    "KekSource",
    "ManagedKekSource",
    "PassphraseFileSource",
    "TpmSealedSource",
    "WrappedKey",
    "create_kek_file",
    "default_kek_paths",
    "load_ring",
    "load_source",
    "read_passphrase",
    "rotate_kek_file",
    "seal_kek_file_tpm",
    "source_for",
]
