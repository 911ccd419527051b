"""The TPM-sealed source (`tpm:PATH?pcrs=0,7`): each KEK a TPM2 sealed data object under the host TPM's
storage root key, unsealable only while the sha256 PCRs hold the values it was sealed to.

Only this source needs tpm2-pytss, imported when a TPM is first opened.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from shared.crypto.errors import CryptoError
from shared.crypto.kek.files import HEX, FileModel, dump_json, locked, read_json, replace_file, validate_file, write_new
from shared.crypto.kek.ring import KEK_BYTES, MAX_VERSION, KekRing
from shared.crypto.secret import random_secret, zeroize
from shared.errors import ConfigError, ReasonedError

if TYPE_CHECKING:
    from shared.tpm.device import TpmDevice

__all__ = ["TpmSealedSource", "seal_kek_file_tpm"]

TPM_FORMAT = "qvm-kek-tpm-file"


class _TpmKey(FileModel):
    version: int = Field(ge=1, le=MAX_VERSION)
    created_ns: int = Field(ge=0)
    public: str = Field(pattern=HEX, min_length=2, max_length=4096)
    private: str = Field(pattern=HEX, min_length=2, max_length=4096)
    pcr_values: dict[int, str]  # what the object is sealed to (sha256 bank), for diagnosis only


class _TpmFile(FileModel):
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
    write_new(path, dump_json(doc))


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
        doc = validate_file(_TpmFile, read_json(self.path, "TPM KEK file"), self.path, "TPM KEK file")
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
        with locked(self.path):
            doc = self._read()
            with _tpm(self.tcti) as device:
                ring = self._unseal_all(device, doc)
                version = ring.current + 1
                ring.close()
                if version > MAX_VERSION:
                    raise CryptoError("kek_versions_exhausted", f"{self.path} has reached version {MAX_VERSION}")
                entry = _seal_version(device, doc.pcrs, version)
            replace_file(self.path, dump_json(doc.model_copy(update={"keys": [*doc.keys, entry]})))
        return version

    def __repr__(self) -> str:
        return f"TpmSealedSource({self.path}, pcrs={list(self.pcrs)})"
