"""What every service's `__main__` shares: settings, logs, tracing, connecting, signals, clean stop.

A service is an object with `async run(stop)`; `serve()` builds it with a connected `Bus` and runs it
until SIGINT/SIGTERM. Connecting retries with back-off, so services may start before NATS is ready
(as under docker-compose or `qvm up`) without crash loops.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from shared.bus import Bus
from shared.config import CommonSettings
from shared.errors import EXIT_WITHDRAWN, BusError, QvmError, Unauthorized
from shared.identity import Identity
from shared.metrics import setup_metrics, shutdown_metrics
from shared.pki import Pki
from shared.telemetry import get_logger, setup_logging, setup_tracing

__all__ = ["Service", "connect_with_retry", "run_together", "serve"]

log = get_logger("qvm.runtime")

S = TypeVar("S", bound=CommonSettings)


class Service(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


async def run_together(*coros: Coroutine[Any, Any, None]) -> None:
    """Run a service's loops as tasks until all end; the first failure cancels the rest and is raised."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def connect_with_retry(settings: CommonSettings, ident: Identity, stop: asyncio.Event | None = None,
                             attempts: int = 60) -> Bus:
    pki = Pki(settings.pki_path)
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return await Bus.connect(settings.resolve_nats_url(), pki, ident)
        except Unauthorized:
            raise  # an answer, not an outage
        except (BusError, QvmError) as exc:
            if attempt == attempts or (stop and stop.is_set()):
                raise
            log.warning("connect failed, retrying", extra={"error": str(exc)[:300], "attempt": attempt})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise BusError("unreachable")


def serve(name: str, settings_type: type[S], ident_of: Callable[[S], Identity],
          build: Callable[[Bus, S], Awaitable[Service]]) -> None:
    """Entry point body for `python -m services.<name>`: `settings_type` is the service's own settings class,
    loaded from the environment. Metrics are served on `QVM_METRICS_ADDR` and exported over OTLP when
    configured (`shared/metrics.py`)."""
    setup_logging(name)
    setup_tracing(name)
    try:
        setup_metrics(name)
        settings = settings_type()
        asyncio.run(_main(settings, ident_of(settings), build))
    except Unauthorized as exc:
        log.error("this identity was withdrawn from the platform", extra={"error": str(exc)[:1000]})
        sys.exit(EXIT_WITHDRAWN)
    except QvmError as exc:
        log.error("service stopped", extra={"error": str(exc)[:1000]})
        sys.exit(2)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # a bug: one JSON line for the supervisor's log, exit non-zero to be restarted
        log.error("service crashed", exc_info=exc)
        sys.exit(1)
    finally:
        shutdown_metrics()  # the last OTLP export; the endpoint closes


async def _main(settings: S, ident: Identity, build: Callable[[Bus, S], Awaitable[Service]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bus = await connect_with_retry(settings, ident, stop)
    try:
        service = await build(bus, settings)
        log.info("service started", extra={"identity": str(ident)})
        await service.run(stop)
    finally:
        await bus.close()
        log.info("service stopped", extra={"identity": str(ident)})
