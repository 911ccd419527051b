"""Choosing a source from its spec (QVM_KEK_SOURCE, `qvm keys --source`) and loading the ring:

    file:/path              PassphraseFileSource
    tpm:/path?pcrs=0,7      TpmSealedSource (`&tcti=...`, or QVM_TPM, names the TPM)
    kms:pkg.module:factory  whatever the plug-in's factory returns
    (empty)                 the development default: a passphrase file under the state dir
"""

from __future__ import annotations

from pathlib import Path

from shared.config import KekSettings
from shared.crypto.kek.kms import kms_source
from shared.crypto.kek.passphrase import PassphraseFileSource, dev_passphrase, read_passphrase
from shared.crypto.kek.ring import KekRing, KekSource
from shared.crypto.kek.tpm_sealed import TpmSealedSource
from shared.crypto.secret import zeroize
from shared.errors import ConfigError
from shared.telemetry import get_logger

__all__ = ["default_kek_paths", "load_ring", "load_source", "source_for"]

log = get_logger("qvm.crypto.kek")


def default_kek_paths(state_dir: Path) -> tuple[Path, Path]:
    """(KEK file, passphrase file) of the development default, under the state directory."""
    return state_dir / "keys" / "kek.json", state_dir / "keys" / "kek.passphrase"


def load_source(spec: str, passphrase_env: str = "QVM_KEK_PASSPHRASE", *, settings: KekSettings | None = None,
                passphrase: bytearray | None = None) -> KekSource:
    """A `KekSource` from its spec string (module docstring); configuration problems are `ConfigError`.

    `settings` (a `shared.config.KekSettings`; default: read from the environment) supplies the passphrase
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
        return kms_source(spec, rest)
    raise ConfigError(f"KEK source {spec[:200]!r}: unknown scheme {scheme!r} (file, tpm, kms)")


def _tpm_source(spec: str, rest: str, settings: KekSettings | None) -> TpmSealedSource:
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


def _settings(settings: KekSettings | None) -> KekSettings:
    return settings if settings is not None else KekSettings()


def source_for(settings: KekSettings | None = None, *, passphrase: bytearray | None = None) -> KekSource:
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
        secret = dev_passphrase(pass_file)
        note = f"development default, passphrase in {pass_file}: no protection at rest"
    try:
        return PassphraseFileSource(kek_file, secret, create_missing=True, note=note)
    finally:
        if passphrase is None:
            zeroize(secret)


def load_ring(settings: KekSettings | None = None) -> KekRing:
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
