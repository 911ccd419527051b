"""KEK files on disk: bounded JSON reads into strict models, and atomic writes (mode 0600, fsync, a
lock for read-modify-write). Shared by the passphrase-file and TPM-sealed sources; errors are
`CryptoError` with a `kek_file_*` reason that names the file, never its content.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.crypto.errors import CryptoError

__all__ = ["HEX", "MAX_FILE_BYTES", "FileModel", "dump_json", "locked", "read_json", "replace_file",
           "validate_file", "write_new"]

MAX_FILE_BYTES = 1 << 20


class FileModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


HEX = r"^([0-9a-f]{2})*$"
_M = TypeVar("_M", bound=BaseModel)


def read_json(path: Path, what: str) -> Any:
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


def validate_file(model: type[_M], data: Any, path: Path, what: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise CryptoError("kek_file_corrupt", f"{what} {path}: {where or 'document'}: {first.get('msg', '')}"
                          ) from None


def write_new(path: Path, data: bytes) -> None:
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


def replace_file(path: Path, data: bytes) -> None:
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
def locked(path: Path) -> Iterator[None]:
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


def dump_json(model: BaseModel) -> bytes:
    return (json.dumps(model.model_dump(mode="json"), indent=2) + "\n").encode()
