"""The passphrase-file source (`file:PATH`): each KEK AES-256-GCM-encrypted under a key that Scrypt derives
from a passphrase (QVM_KEK_PASSPHRASE or QVM_KEK_PASSPHRASE_FILE), and reading that passphrase.

The passphrase and the derived key live in bytearrays that are overwritten after use (`derive_into`).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import Field

from shared.crypto.errors import CryptoError
from shared.crypto.kek.files import HEX, FileModel, dump_json, locked, read_json, replace_file, validate_file, write_new
from shared.crypto.kek.ring import KEK_BYTES, MAX_VERSION, NONCE_BYTES, TAG_BYTES, KekRing
from shared.crypto.secret import random_secret, zeroize
from shared.errors import ConfigError
from shared.telemetry import get_logger

__all__ = ["PassphraseFileSource", "create_kek_file", "dev_passphrase", "read_passphrase", "rotate_kek_file"]

log = get_logger("qvm.crypto.kek")

_FILE_KEY_LABEL = b"qvm-kek-file-v1\x00key\x00"
_FILE_CHECK_LABEL = b"qvm-kek-file-v1\x00check\x00"
PASSPHRASE_FORMAT = "qvm-kek-passphrase-file"
SCRYPT_LOG2_N = 17  # n = 2^17, r = 8, p = 1: 128 MiB and about 0.3 s per derivation (OWASP's scrypt floor)
SCRYPT_R = 8
SCRYPT_P = 1
MIN_PASSPHRASE_BYTES = 8


class _ScryptParams(FileModel):
    name: str = Field(pattern="^scrypt$")
    log2_n: int = Field(ge=14, le=20)  # bounded: a file must not make loading cost gigabytes
    r: int = Field(ge=1, le=32)
    p: int = Field(ge=1, le=16)
    salt: str = Field(pattern=HEX, min_length=32, max_length=128)


class _Sealed(FileModel):
    nonce: str = Field(pattern=HEX, min_length=2 * NONCE_BYTES, max_length=2 * NONCE_BYTES)
    ciphertext: str = Field(pattern=HEX, min_length=2 * TAG_BYTES, max_length=2 * (KEK_BYTES + TAG_BYTES))


class _FileKey(FileModel):
    version: int = Field(ge=1, le=MAX_VERSION)
    created_ns: int = Field(ge=0)
    nonce: str = Field(pattern=HEX, min_length=2 * NONCE_BYTES, max_length=2 * NONCE_BYTES)
    ciphertext: str = Field(pattern=HEX, min_length=2 * TAG_BYTES, max_length=2 * (KEK_BYTES + TAG_BYTES))


class _PassphraseFile(FileModel):
    format: str = Field(pattern=f"^{PASSPHRASE_FORMAT}$")
    version: int = Field(ge=1, le=1)
    kdf: _ScryptParams
    check: _Sealed
    keys: list[_FileKey] = Field(min_length=1, max_length=4096)


def _key_aad(version: int, created_ns: int) -> bytes:
    return _FILE_KEY_LABEL + version.to_bytes(4, "big") + created_ns.to_bytes(8, "big")


def _derive(passphrase: bytearray | bytes, kdf: _ScryptParams) -> bytearray:
    out = bytearray(KEK_BYTES)
    try:
        Scrypt(salt=bytes.fromhex(kdf.salt), length=KEK_BYTES, n=1 << kdf.log2_n, r=kdf.r, p=kdf.p
               ).derive_into(passphrase, out)
    except (ValueError, MemoryError) as exc:
        zeroize(out)
        raise CryptoError("kek_file_corrupt", f"scrypt parameters refused: {exc}") from None
    return out


def _check_passphrase(passphrase: bytearray | bytes) -> None:
    if len(passphrase) < MIN_PASSPHRASE_BYTES:
        raise CryptoError("weak_passphrase", f"a KEK passphrase has at least {MIN_PASSPHRASE_BYTES} bytes")


def _seal_entry(file_key: bytearray, kek: bytearray, version: int, created_ns: int) -> _FileKey:
    nonce = os.urandom(NONCE_BYTES)
    ct = AESGCM(file_key).encrypt(nonce, kek, _key_aad(version, created_ns))
    return _FileKey(version=version, created_ns=created_ns, nonce=nonce.hex(), ciphertext=ct.hex())


def _open_passphrase_file(path: Path, passphrase: bytearray | bytes) -> tuple[_PassphraseFile, bytearray, KekRing]:
    """Parse and decrypt a passphrase file: (its model, the derived file key, the ring). The caller owns
    and zeroizes the file key and closes the ring."""
    doc = validate_file(_PassphraseFile, read_json(path, "KEK file"), path, "KEK file")
    versions = [k.version for k in doc.keys]
    if len(set(versions)) != len(versions):
        raise CryptoError("kek_file_corrupt", f"KEK file {path} lists a version twice")
    file_key = _derive(passphrase, doc.kdf)
    keys: dict[int, bytearray] = {}
    try:
        cipher = AESGCM(file_key)
        try:
            check = doc.check
            cipher.decrypt(bytes.fromhex(check.nonce), bytes.fromhex(check.ciphertext), _FILE_CHECK_LABEL)
        except InvalidTag:
            raise CryptoError("bad_passphrase", f"the passphrase does not open {path}") from None
        for entry in doc.keys:
            ct = bytes.fromhex(entry.ciphertext)
            if len(ct) != KEK_BYTES + TAG_BYTES:
                raise CryptoError("kek_file_corrupt", f"KEK file {path}: version {entry.version} has a bad length")
            kek = bytearray(KEK_BYTES)
            keys[entry.version] = kek
            try:
                cipher.decrypt_into(bytes.fromhex(entry.nonce), ct, _key_aad(entry.version, entry.created_ns), kek)
            except InvalidTag:
                raise CryptoError("kek_file_corrupt", f"KEK file {path}: version {entry.version} does not "
                                                      "decrypt (altered)") from None
    except BaseException:
        zeroize(file_key)
        for kek in keys.values():
            zeroize(kek)
        raise
    ring = KekRing(keys, {k.version: k.created_ns for k in doc.keys}, source=f"file:{path}")
    return doc, file_key, ring


def create_kek_file(path: Path, passphrase: bytearray | bytes, *, scrypt_log2_n: int = SCRYPT_LOG2_N) -> None:
    """Create a passphrase-protected KEK file holding version 1 (mode 0600; an existing file is refused).

    Layout (JSON, nothing secret in clear): the Scrypt parameters and salt, a `check` entry (AES-GCM of
    nothing: tells a wrong passphrase apart from an altered key entry), and per version
    `{version, created_ns, nonce, ciphertext}`, the KEK AES-256-GCM-encrypted under the derived key with
    the version and creation time as associated data (an entry cannot be renumbered).
    """
    path = Path(path)
    _check_passphrase(passphrase)
    if path.exists():
        raise CryptoError("kek_file_exists", f"{path} exists already: refusing to overwrite KEKs")
    kdf = _ScryptParams(name="scrypt", log2_n=scrypt_log2_n, r=SCRYPT_R, p=SCRYPT_P, salt=os.urandom(16).hex())
    file_key = _derive(passphrase, kdf)
    kek = random_secret(KEK_BYTES)
    try:
        nonce = os.urandom(NONCE_BYTES)
        check = _Sealed(nonce=nonce.hex(), ciphertext=AESGCM(file_key).encrypt(nonce, b"", _FILE_CHECK_LABEL).hex())
        doc = _PassphraseFile(format=PASSPHRASE_FORMAT, version=1, kdf=kdf, check=check,
                              keys=[_seal_entry(file_key, kek, 1, time.time_ns())])
    finally:
        zeroize(file_key)
        zeroize(kek)
    write_new(path, dump_json(doc))


def rotate_kek_file(path: Path, passphrase: bytearray | bytes) -> int:
    """Add KEK version N+1 to a passphrase file (every existing version must decrypt first); returns N+1.

    The file is replaced atomically under an exclusive lock, so a crash leaves the old or the new file,
    and two rotations at once make two versions. Running key-brokers pick the new version up on restart.
    """
    path = Path(path)
    with locked(path):
        doc, file_key, ring = _open_passphrase_file(path, passphrase)
        kek = random_secret(KEK_BYTES)
        try:
            version = ring.current + 1
            if version > MAX_VERSION:
                raise CryptoError("kek_versions_exhausted", f"{path} has reached version {MAX_VERSION}")
            entry = _seal_entry(file_key, kek, version, time.time_ns())
        finally:
            zeroize(file_key)
            zeroize(kek)
            ring.close()
        replace_file(path, dump_json(doc.model_copy(update={"keys": [*doc.keys, entry]})))
    return version


class PassphraseFileSource:
    """KEKs in a file, encrypted under a key derived (Scrypt) from a passphrase the operator supplies.

    The source keeps its own copy of the passphrase (a bytearray it zeroizes on `close()`), so the caller
    may wipe the one it passed in. With `create_missing`, `load()` first creates the file (the development
    default); otherwise a missing file is `kek_file_missing`.
    """

    def __init__(self, path: Path, passphrase: bytearray | bytes, *, create_missing: bool = False,
                 scrypt_log2_n: int = SCRYPT_LOG2_N, note: str = "") -> None:
        self.path = Path(path)
        self._passphrase = bytearray(passphrase)
        self.create_missing = create_missing
        self.scrypt_log2_n = scrypt_log2_n
        self.note = note

    def describe(self) -> str:
        return f"passphrase file {self.path}" + (f" ({self.note})" if self.note else "")

    def load(self) -> KekRing:
        if self.create_missing and not self.path.exists():
            try:
                create_kek_file(self.path, self._passphrase, scrypt_log2_n=self.scrypt_log2_n)
                log.warning("created a new KEK file", extra={"path": str(self.path)})
            except CryptoError as exc:
                if exc.reason != "kek_file_exists":  # lost a race with another process: load what it made
                    raise
        _, file_key, ring = _open_passphrase_file(self.path, self._passphrase)
        zeroize(file_key)
        return ring

    def init(self) -> int:
        create_kek_file(self.path, self._passphrase, scrypt_log2_n=self.scrypt_log2_n)
        return 1

    def rotate(self) -> int:
        return rotate_kek_file(self.path, self._passphrase)

    def close(self) -> None:
        zeroize(self._passphrase)

    def __repr__(self) -> str:
        return f"PassphraseFileSource({self.path})"


def _read_secret_file(path: Path) -> bytearray:
    """A passphrase from a file, into a bytearray (trailing newline dropped); bounded, never echoed."""
    try:
        with path.open("rb", buffering=0) as f:
            buf = bytearray(4097)
            n = f.readinto(buf) or 0
    except OSError as exc:
        raise ConfigError(f"KEK passphrase file {path}: {exc.strerror or exc}") from None
    if n > 4096:
        zeroize(buf)
        raise ConfigError(f"KEK passphrase file {path} is longer than 4096 bytes")
    while n and buf[n - 1] in b"\r\n":
        n -= 1
    out = bytearray(buf[:n])
    zeroize(buf)
    return out


def read_passphrase(passphrase_file: Path | None = None, env: str = "QVM_KEK_PASSPHRASE") -> bytearray | None:
    """The KEK passphrase: from `passphrase_file` when given, else the environment variable `env`, else None.

    A file is the better choice: the environment's copy is an immutable string (in this process and in
    /proc/PID/environ) that nothing can wipe.
    """
    if passphrase_file is not None:
        return _read_secret_file(passphrase_file)
    value = os.environb.get(env.encode())
    return bytearray(value) if value is not None else None


def dev_passphrase(path: Path) -> bytearray:
    """The development default's passphrase file, made on first use (random, 0600)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = bytearray(secrets.token_urlsafe(32).encode())
        try:
            write_new(path, bytes(token) + b"\n")
        except CryptoError as exc:
            if exc.reason != "kek_file_exists":  # another process made it first: use theirs
                raise ConfigError(f"development KEK passphrase file: {exc.detail}") from None
        finally:
            zeroize(token)
    return _read_secret_file(path)
