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

Secrets stay in bytearrays this module owns and overwrites (`shared.crypto.secret`): KEKs are decrypted
or unsealed into fresh bytearrays (`decrypt_into`), the passphrase-derived key is derived into one
(`derive_into`), `KekRing.close()` zeroes every KEK. Copies inside OpenSSL (the AESGCM context) and the
TSS are outside Python's reach; see `shared.crypto.secret` for what that means.

Nothing here logs or prints key material; `describe()` and errors name files, versions and PCRs only.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.config import Settings
from shared.crypto.errors import CryptoError
from shared.crypto.secret import random_secret, zeroize
from shared.errors import ConfigError, ReasonedError
from shared.telemetry import get_logger

if TYPE_CHECKING:
    from shared.tpm.device import TpmDevice

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

log = get_logger("qvm.crypto.kek")

KEK_BYTES = 32  # AES-256
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce, random per wrap (2^32 wraps per KEK stay far below the bound)
TAG_BYTES = 16
MAX_WRAPPED_PLAINTEXT = 4096  # keys, not data
MAX_VERSION = 2**31 - 1
MAX_FILE_BYTES = 1 << 20
WRAP_FORMAT = 1
_WRAP_LABEL = b"qvm-kek-wrap-v1\x00"
_FILE_KEY_LABEL = b"qvm-kek-file-v1\x00key\x00"
_FILE_CHECK_LABEL = b"qvm-kek-file-v1\x00check\x00"
PASSPHRASE_FORMAT = "qvm-kek-passphrase-file"
TPM_FORMAT = "qvm-kek-tpm-file"
SCRYPT_LOG2_N = 17  # n = 2^17, r = 8, p = 1: 128 MiB and about 0.3 s per derivation (OWASP's scrypt floor)
SCRYPT_R = 8
SCRYPT_P = 1
MIN_PASSPHRASE_BYTES = 8


# ====================================================================== wrapped keys
def _wrap_aad(version: int, aad: bytes) -> bytes:
    """Associated data of one wrap: a label, the KEK version (fixed width, so the split is unambiguous)
    and the caller's binding."""
    return _WRAP_LABEL + version.to_bytes(4, "big") + bytes(aad)


@dataclass(frozen=True)
class WrappedKey:
    """A DEK encrypted under one KEK version: safe to store anywhere (it opens only inside the broker)."""

    kek_version: int
    nonce: bytes
    ciphertext: bytes  # AES-256-GCM ciphertext with its 16-byte tag

    def to_bytes(self) -> bytes:
        """msgpack `[format, kek_version, nonce, ciphertext]`: compact, and versioned for later formats."""
        return bytes(msgpack.packb([WRAP_FORMAT, self.kek_version, self.nonce, self.ciphertext],
                                   use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes) -> WrappedKey:
        """Parse what `to_bytes` wrote; anything else is `CryptoError("malformed_wrapped_key")`."""
        try:
            fields = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_WRAPPED_PLAINTEXT + 64,
                                     max_array_len=8, max_map_len=0, max_str_len=0)
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise CryptoError("malformed_wrapped_key", f"not a wrapped key: {type(exc).__name__}") from None
        if (not isinstance(fields, list) or len(fields) != 4 or fields[0] != WRAP_FORMAT
                or type(fields[1]) is not int or not 1 <= fields[1] <= MAX_VERSION
                or not isinstance(fields[2], bytes) or len(fields[2]) != NONCE_BYTES
                or not isinstance(fields[3], bytes)
                or not TAG_BYTES < len(fields[3]) <= MAX_WRAPPED_PLAINTEXT + TAG_BYTES):
            raise CryptoError("malformed_wrapped_key", "not a format-1 wrapped key")
        return cls(fields[1], fields[2], fields[3])


# ====================================================================== the ring
class KekRing:
    """KEK versions in memory; wraps under the current (highest) version, unwraps under any.

    The ring owns the bytearrays it is given (it overwrites them on `close()`); callers hand them over
    and keep no other reference. Usable from several threads at once (each call builds its own cipher);
    `close()` only once nothing else uses the ring.
    """

    def __init__(self, keys: Mapping[int, bytearray], created_ns: Mapping[int, int] | None = None,
                 source: str = "") -> None:
        if not keys:
            raise CryptoError("no_kek", "a KEK ring needs at least one version")
        for version, key in keys.items():
            if type(version) is not int or not 1 <= version <= MAX_VERSION:
                raise CryptoError("bad_kek", f"KEK version {version!r} (1..{MAX_VERSION})")
            if not isinstance(key, bytearray) or len(key) != KEK_BYTES:
                raise CryptoError("bad_kek", f"KEK version {version} must be a {KEK_BYTES}-byte bytearray")
        self._keys: dict[int, bytearray] = dict(keys)
        self._created = {v: int((created_ns or {}).get(v, 0)) for v in self._keys}
        self._closed = False
        self.source = source

    # ---------------------------------------------------------- facts (no secrets)
    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._keys))

    @property
    def current(self) -> int:
        return max(self._keys)

    @property
    def created_ns(self) -> dict[int, int]:
        """When each version was made (ns since the epoch; 0 where the source does not record it)."""
        return dict(self._created)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"KekRing(versions={list(self.versions)}, current={self.current}, closed={self._closed})"

    def _key(self, version: int) -> bytearray:
        if self._closed:
            raise CryptoError("kek_ring_closed", "the KEK ring was closed")
        key = self._keys.get(version)
        if key is None:
            raise CryptoError("unknown_kek_version", f"no KEK version {version} (have {list(self.versions)})")
        return key

    # ---------------------------------------------------------- operations
    def wrap(self, dek: bytes | bytearray | memoryview, aad: bytes) -> WrappedKey:
        """Encrypt `dek` under the current KEK with a fresh random nonce, bound to `aad` and the version."""
        if not 0 < len(dek) <= MAX_WRAPPED_PLAINTEXT:
            raise CryptoError("wrap_failed", f"a key to wrap is 1..{MAX_WRAPPED_PLAINTEXT} bytes, got {len(dek)}")
        version = self.current
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(self._key(version)).encrypt(nonce, dek, _wrap_aad(version, aad))
        return WrappedKey(version, nonce, ciphertext)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytearray:
        """The DEK, in a new bytearray the caller zeroizes. `unknown_kek_version` when the ring lacks the
        version, `unwrap_failed` when the tag does not verify (other aad, altered bytes, another KEK)."""
        key = self._key(wrapped.kek_version)
        if len(wrapped.nonce) != NONCE_BYTES or len(wrapped.ciphertext) <= TAG_BYTES:
            raise CryptoError("unwrap_failed", "malformed wrapped key")
        out = bytearray(len(wrapped.ciphertext) - TAG_BYTES)
        try:
            AESGCM(key).decrypt_into(wrapped.nonce, wrapped.ciphertext, _wrap_aad(wrapped.kek_version, aad), out)
        except (InvalidTag, ValueError):
            zeroize(out)
            raise CryptoError("unwrap_failed", f"wrapped key does not open under KEK version "
                                               f"{wrapped.kek_version} with this binding") from None
        return out

    def rewrap(self, wrapped: WrappedKey, aad: bytes) -> WrappedKey:
        """The same DEK wrapped under the current KEK (rotation); already current: returned unchanged."""
        if wrapped.kek_version == self.current:
            self._key(wrapped.kek_version)  # a closed ring still refuses
            return wrapped
        dek = self.unwrap(wrapped, aad)
        try:
            return self.wrap(dek, aad)
        finally:
            zeroize(dek)

    def close(self) -> None:
        """Overwrite every KEK; the ring refuses all operations afterwards."""
        for key in self._keys.values():
            zeroize(key)
        self._closed = True

    def __enter__(self) -> KekRing:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ====================================================================== sources
@runtime_checkable
class KekSource(Protocol):
    """Where a KEK ring comes from. `describe()` is for logs and `qvm keys show`: never secret."""

    def load(self) -> KekRing: ...

    def describe(self) -> str: ...


@runtime_checkable
class ManagedKekSource(KekSource, Protocol):
    """A source qvm itself can create and rotate (`qvm keys init / rotate`); a KMS manages its own keys."""

    def init(self) -> int: ...

    def rotate(self) -> int: ...


# ---------------------------------------------------------------- file plumbing
class _FileModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


_HEX = r"^([0-9a-f]{2})*$"
_M = TypeVar("_M", bound=BaseModel)


def _read_json(path: Path, what: str) -> Any:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise CryptoError("kek_file_missing", f"{what} {path} does not exist (`qvm keys init` creates it)") from None
    except OSError as exc:
        raise CryptoError("kek_file_unreadable", f"{what} {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise CryptoError("kek_file_corrupt", f"{what} {path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CryptoError("kek_file_corrupt", f"{what} {path} is not JSON") from None


def _validate(model: type[_M], data: Any, path: Path, what: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise CryptoError("kek_file_corrupt", f"{what} {path}: {where or 'document'}: {first.get('msg', '')}"
                          ) from None


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` with `data`, mode 0600, atomically, refusing to replace an existing file: the content
    goes to a private temporary file first and is hard-linked into place (link fails if the name exists)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise CryptoError("kek_file_exists", f"{path} exists already: refusing to overwrite KEKs") from None
    except OSError as exc:
        raise CryptoError("kek_file_unwritable", f"{path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _replace(path: Path, data: bytes) -> None:
    """Replace `path` atomically (temporary file, fsync, rename, fsync of the directory), mode 0600."""
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CryptoError("kek_file_unwritable", f"{path}: {exc.strerror or exc}") from None
    _fsync_dir(path.parent)


def _write_temp(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CryptoError("kek_file_unwritable", f"{path.parent}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CryptoError("kek_file_unwritable", f"{tmp}: {exc.strerror or exc}") from None
    return tmp


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-modify-write of a KEK file between processes (two `qvm keys rotate` at once would
    otherwise both make version N+1, and one of them would be lost)."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CryptoError("kek_file_unwritable", f"{lock}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- passphrase file
class _ScryptParams(_FileModel):
    name: str = Field(pattern="^scrypt$")
    log2_n: int = Field(ge=14, le=20)  # bounded: a file must not make loading cost gigabytes
    r: int = Field(ge=1, le=32)
    p: int = Field(ge=1, le=16)
    salt: str = Field(pattern=_HEX, min_length=32, max_length=128)


class _Sealed(_FileModel):
    nonce: str = Field(pattern=_HEX, min_length=2 * NONCE_BYTES, max_length=2 * NONCE_BYTES)
    ciphertext: str = Field(pattern=_HEX, min_length=2 * TAG_BYTES, max_length=2 * (KEK_BYTES + TAG_BYTES))


class _FileKey(_FileModel):
    version: int = Field(ge=1, le=MAX_VERSION)
    created_ns: int = Field(ge=0)
    nonce: str = Field(pattern=_HEX, min_length=2 * NONCE_BYTES, max_length=2 * NONCE_BYTES)
    ciphertext: str = Field(pattern=_HEX, min_length=2 * TAG_BYTES, max_length=2 * (KEK_BYTES + TAG_BYTES))


class _PassphraseFile(_FileModel):
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


def _dump(model: BaseModel) -> bytes:
    return (json.dumps(model.model_dump(mode="json"), indent=2) + "\n").encode()


def _open_passphrase_file(path: Path, passphrase: bytearray | bytes) -> tuple[_PassphraseFile, bytearray, KekRing]:
    """Parse and decrypt a passphrase file: (its model, the derived file key, the ring). The caller owns
    and zeroizes the file key and closes the ring."""
    doc = _validate(_PassphraseFile, _read_json(path, "KEK file"), path, "KEK file")
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
    _write_new(path, _dump(doc))


def rotate_kek_file(path: Path, passphrase: bytearray | bytes) -> int:
    """Add KEK version N+1 to a passphrase file (every existing version must decrypt first); returns N+1.

    The file is replaced atomically under an exclusive lock, so a crash leaves the old or the new file,
    and two rotations at once make two versions. Running key-brokers pick the new version up on restart.
    """
    path = Path(path)
    with _locked(path):
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
        _replace(path, _dump(doc.model_copy(update={"keys": [*doc.keys, entry]})))
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


# ---------------------------------------------------------------- TPM-sealed file
class _TpmKey(_FileModel):
    version: int = Field(ge=1, le=MAX_VERSION)
    created_ns: int = Field(ge=0)
    public: str = Field(pattern=_HEX, min_length=2, max_length=4096)
    private: str = Field(pattern=_HEX, min_length=2, max_length=4096)
    pcr_values: dict[int, str]  # what the object is sealed to (sha256 bank), for diagnosis only


class _TpmFile(_FileModel):
    format: str = Field(pattern=f"^{TPM_FORMAT}$")
    version: int = Field(ge=1, le=1)
    pcr_bank: str = Field(pattern="^sha256$")
    pcrs: list[int] = Field(min_length=1, max_length=24)
    keys: list[_TpmKey] = Field(min_length=1, max_length=1024)


def _tpm_pcrs(pcrs: tuple[int, ...] | list[int]) -> list[int]:
    wanted = sorted(set(pcrs))
    if not wanted or any(not 0 <= i <= 23 for i in wanted):
        raise ConfigError(f"TPM PCR selection {list(pcrs)}: one or more of 0..23")
    return wanted


@contextlib.contextmanager
def _tpm(tcti: str) -> Iterator[TpmDevice]:
    """A TpmDevice for one operation, its errors as CryptoError with the same reason code."""
    from shared.tpm.device import TpmDevice, TpmError  # only TPM sources need tpm2-pytss

    try:
        device = TpmDevice(tcti)
    except TpmError as exc:
        raise CryptoError(exc.reason, exc.detail) from None
    try:
        yield device
    except TpmError as exc:
        raise CryptoError(exc.reason, exc.detail) from None
    finally:
        with contextlib.suppress(Exception):
            device.close()


def _seal_version(device: TpmDevice, pcrs: list[int], version: int) -> _TpmKey:
    kek = random_secret(KEK_BYTES)
    try:
        values = device.read_pcrs(pcrs)
        public, private = device.seal(kek, pcrs, values)
    finally:
        zeroize(kek)
    return _TpmKey(version=version, created_ns=time.time_ns(), public=public.hex(), private=private.hex(),
                   pcr_values={i: v.hex() for i, v in values.items()})


def seal_kek_file_tpm(tcti: str, path: Path, pcrs: tuple[int, ...]) -> None:
    """Create a TPM-sealed KEK file with version 1 (mode 0600; an existing file is refused).

    The KEK is made here (kernel CSPRNG), sealed by the TPM under its SRK (TCG ECC P-256 template,
    re-derived on every use: the file holds only the sealed object's public and private parts) with an
    authPolicy of TPM2_PolicyPCR over the sha256 `pcrs` at their current values. The TPM's private part
    is encrypted with the SRK, so the file is useless on any other TPM, and on this one once those PCRs
    change (another firmware, boot loader or kernel, if they are measured there).

    Integrity: someone able to write the file could add a version whose KEK they chose (anyone with TPM
    access can seal data); they can never read an existing KEK. Keep the file writable by the key-broker's
    user only (it is created 0600).
    """
    path = Path(path)
    wanted = _tpm_pcrs(pcrs)
    if path.exists():
        raise CryptoError("kek_file_exists", f"{path} exists already: refusing to overwrite KEKs")
    with _tpm(tcti) as device:
        entry = _seal_version(device, wanted, 1)
    doc = _TpmFile(format=TPM_FORMAT, version=1, pcr_bank="sha256", pcrs=wanted, keys=[entry])
    _write_new(path, _dump(doc))


class TpmSealedSource:
    """KEKs sealed to this host's TPM and its PCR state (see `seal_kek_file_tpm`).

    `load()` unseals every version through a policy session running TPM2_PolicyPCR over the file's PCRs;
    if any of them changed since sealing the TPM refuses and the reason is `tpm_policy_mismatch`, with
    the PCRs that differ from the recorded values in the detail. `pcrs` given here must equal the file's
    (an empty tuple accepts the file's selection). TPM calls block: run `load` off the event loop.
    """

    def __init__(self, tcti: str, path: Path, pcrs: tuple[int, ...] = ()) -> None:
        self.tcti = tcti
        self.path = Path(path)
        self.pcrs = tuple(_tpm_pcrs(pcrs)) if pcrs else ()

    def describe(self) -> str:
        pcrs = ",".join(map(str, self.pcrs)) if self.pcrs else "as sealed"
        return f"TPM-sealed file {self.path} (PCRs sha256:{pcrs}, TPM {self.tcti})"

    def _read(self) -> _TpmFile:
        doc = _validate(_TpmFile, _read_json(self.path, "TPM KEK file"), self.path, "TPM KEK file")
        versions = [k.version for k in doc.keys]
        if len(set(versions)) != len(versions):
            raise CryptoError("kek_file_corrupt", f"TPM KEK file {self.path} lists a version twice")
        if self.pcrs and tuple(doc.pcrs) != self.pcrs:
            raise CryptoError("tpm_pcr_selection_mismatch", f"{self.path} is sealed to PCRs {doc.pcrs}, "
                                                            f"configured {list(self.pcrs)}")
        return doc

    def _unseal_all(self, device: TpmDevice, doc: _TpmFile) -> KekRing:
        keys: dict[int, bytearray] = {}
        try:
            for entry in doc.keys:
                try:
                    kek = device.unseal(bytes.fromhex(entry.public), bytes.fromhex(entry.private), doc.pcrs)
                except ReasonedError as exc:
                    if exc.reason == "tpm_policy_mismatch":
                        raise CryptoError(exc.reason, self._changed(device, doc, entry)) from None
                    raise
                if len(kek) != KEK_BYTES:
                    zeroize(kek)
                    raise CryptoError("kek_file_corrupt", f"{self.path}: version {entry.version} unseals to "
                                                          f"{len(kek)} bytes")
                keys[entry.version] = kek
        except BaseException:
            for kek in keys.values():
                zeroize(kek)
            raise
        return KekRing(keys, {k.version: k.created_ns for k in doc.keys}, source=f"tpm:{self.path}")

    def _changed(self, device: TpmDevice, doc: _TpmFile, entry: _TpmKey) -> str:
        try:
            now = device.read_pcrs(doc.pcrs)
        except ReasonedError:
            now = {}
        changed = [i for i in doc.pcrs if entry.pcr_values.get(i) != (now[i].hex() if i in now else None)]
        return (f"KEK version {entry.version} in {self.path} is sealed to PCR values that no longer hold "
                f"(changed: {changed or 'unknown'}); re-seal from a trusted state")

    def load(self) -> KekRing:
        doc = self._read()
        with _tpm(self.tcti) as device:
            return self._unseal_all(device, doc)

    def init(self) -> int:
        if not self.pcrs:
            raise ConfigError("sealing needs a PCR selection (tpm:/path?pcrs=0,7)")
        seal_kek_file_tpm(self.tcti, self.path, self.pcrs)
        return 1

    def rotate(self) -> int:
        """Seal version N+1 to the same PCRs, after proving every existing version still unseals (so the
        host is in the state the ring was sealed in); the file is replaced atomically under a lock."""
        with _locked(self.path):
            doc = self._read()
            with _tpm(self.tcti) as device:
                ring = self._unseal_all(device, doc)
                version = ring.current + 1
                ring.close()
                if version > MAX_VERSION:
                    raise CryptoError("kek_versions_exhausted", f"{self.path} has reached version {MAX_VERSION}")
                entry = _seal_version(device, doc.pcrs, version)
            _replace(self.path, _dump(doc.model_copy(update={"keys": [*doc.keys, entry]})))
        return version

    def __repr__(self) -> str:
        return f"TpmSealedSource({self.path}, pcrs={list(self.pcrs)})"


# ---------------------------------------------------------------- choosing a source
def default_kek_paths(state_dir: Path) -> tuple[Path, Path]:
    """(KEK file, passphrase file) of the development default, under the state directory."""
    return state_dir / "keys" / "kek.json", state_dir / "keys" / "kek.passphrase"


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


def _dev_passphrase(path: Path) -> bytearray:
    """The development default's passphrase file, made on first use (random, 0600)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = bytearray(secrets.token_urlsafe(32).encode())
        try:
            _write_new(path, bytes(token) + b"\n")
        except CryptoError as exc:
            if exc.reason != "kek_file_exists":  # another process made it first: use theirs
                raise ConfigError(f"development KEK passphrase file: {exc.detail}") from None
        finally:
            zeroize(token)
    return _read_secret_file(path)


def _import_factory(target: str) -> Callable[[], Any]:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"KEK source kms:{target}: expected kms:package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the plug-in raised while importing
        raise ConfigError(f"KEK source kms:{target}: cannot import {module_name}: {type(exc).__name__}: "
                          f"{str(exc)[:200]}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"KEK source kms:{target}: {module_name} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def load_source(spec: str, passphrase_env: str = "QVM_KEK_PASSPHRASE", *, settings: Settings | None = None,
                passphrase: bytearray | None = None) -> KekSource:
    """A `KekSource` from its spec string (module docstring); configuration problems are `ConfigError`.

    `settings` (a `shared.config.Settings`; default: read from the environment) supplies the passphrase
    file (QVM_KEK_PASSPHRASE_FILE) and the TPM (QVM_TPM); `passphrase`, when given, wins over both (the
    CLI's prompt). A `kms:` factory is called without arguments and must return an object with `load()`
    and `describe()`.
    """
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ConfigError(f"KEK source {spec[:200]!r}: expected file:PATH, tpm:PATH?pcrs=..., kms:module:factory")
    if scheme == "file":
        secret = passphrase if passphrase is not None else read_passphrase(
            _settings(settings).kek_passphrase_file, passphrase_env)
        if secret is None:
            raise ConfigError(f"KEK source {spec}: no passphrase (set {passphrase_env} or QVM_KEK_PASSPHRASE_FILE)")
        try:
            return PassphraseFileSource(Path(rest), secret)
        finally:
            if passphrase is None:
                zeroize(secret)  # the source holds its own copy
    if scheme == "tpm":
        return _tpm_source(spec, rest, settings)
    if scheme == "kms":
        factory = _import_factory(rest)
        try:
            source = factory()
        except (ConfigError, ReasonedError):
            raise
        except Exception as exc:
            raise ConfigError(f"KEK source {spec}: the factory failed: {type(exc).__name__}: {str(exc)[:200]}"
                              ) from None
        if not isinstance(source, KekSource):
            raise ConfigError(f"KEK source {spec}: the factory returned {type(source).__name__}, which lacks "
                              "load() / describe()")
        return source
    raise ConfigError(f"KEK source {spec[:200]!r}: unknown scheme {scheme!r} (file, tpm, kms)")


def _tpm_source(spec: str, rest: str, settings: Settings | None) -> TpmSealedSource:
    from urllib.parse import parse_qs

    path, _, query = rest.partition("?")
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=8)
    except ValueError:
        raise ConfigError(f"KEK source {spec}: malformed query") from None
    unknown = set(params) - {"pcrs", "tcti"}
    if unknown or any(len(v) != 1 for v in params.values()) or not path:
        raise ConfigError(f"KEK source {spec}: expected tpm:PATH?pcrs=0,7[&tcti=...]")
    try:
        pcrs = tuple(int(i) for i in params["pcrs"][0].split(",") if i.strip()) if "pcrs" in params else ()
    except ValueError:
        raise ConfigError(f"KEK source {spec}: pcrs must be numbers") from None
    tcti = params["tcti"][0] if "tcti" in params else _settings(settings).tpm
    if not tcti:
        raise ConfigError(f"KEK source {spec}: no TPM (set QVM_TPM or add &tcti=... to the spec)")
    return TpmSealedSource(tcti, Path(path), pcrs)


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else Settings()


def source_for(settings: Settings | None = None, *, passphrase: bytearray | None = None) -> KekSource:
    """The configured source (QVM_KEK_SOURCE), or the development default when it is empty: a passphrase
    file under `<state_dir>/keys/` whose passphrase sits beside it (QVM_KEK_PASSPHRASE_FILE or
    QVM_KEK_PASSPHRASE override that), both created on first load."""
    s = _settings(settings)
    if s.kek_source:
        return load_source(s.kek_source, settings=s, passphrase=passphrase)
    kek_file, pass_file = default_kek_paths(s.state_dir)
    secret = passphrase if passphrase is not None else read_passphrase(s.kek_passphrase_file)
    note = "development default"
    if secret is None:
        secret = _dev_passphrase(pass_file)
        note = f"development default, passphrase in {pass_file}: no protection at rest"
    try:
        return PassphraseFileSource(kek_file, secret, create_missing=True, note=note)
    finally:
        if passphrase is None:
            zeroize(secret)


def load_ring(settings: Settings | None = None) -> KekRing:
    """Load the configured ring (blocking: Scrypt or TPM work; the key-broker runs it in a thread)."""
    source = source_for(settings)
    try:
        ring = source.load()
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()
    if not isinstance(ring, KekRing):
        raise ConfigError(f"KEK source {source.describe()} returned {type(ring).__name__}, not a KekRing")
    log.info("KEK ring loaded", extra={"source": source.describe(), "kek_versions": len(ring.versions),
                                       "kek_current": ring.current})
    return ring
