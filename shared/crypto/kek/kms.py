"""KMS plug-ins (`kms:package.module:factory`): an external KMS is any object with `load()` and
`describe()`, made by a factory that qvm imports and calls without arguments."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from shared.crypto.kek.ring import KekSource
from shared.errors import ConfigError, ReasonedError

__all__ = ["kms_source"]


def kms_source(spec: str, target: str) -> KekSource:
    """The source `target` (`package.module:factory`) makes; `spec` is the whole spec, for messages."""
    factory = _import_factory(target)
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
