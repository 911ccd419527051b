"""One error boundary for everything that talks to NATS: nats-py, socket and TLS errors become `BusError`."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator

import nats

from shared.errors import BusError

__all__ = ["map_nats_errors"]


@contextlib.contextmanager
def map_nats_errors(what: str) -> Iterator[None]:
    """Translate nats-py and socket errors into `BusError` at the boundary."""
    try:
        yield
    except BusError:
        raise
    except (TimeoutError, nats.errors.Error, OSError, ssl.SSLError) as exc:
        raise BusError(f"{what}: {type(exc).__name__}: {exc}") from exc
