"""Metrics: what a platform team scrapes or receives from every service.

The OpenTelemetry metrics SDK is the one instrumentation API; its readers are a Prometheus-format endpoint
(`QVM_METRICS_ADDR`, e.g. `127.0.0.1:9464`; port 0 picks a free one, logged and returned) and OTLP over
HTTP/protobuf (on when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` is set). With
neither, nothing is installed and the bus's hooks cost one global read.

Everything is measured centrally, where every event passes: the bus reports each event it stored
(`published`), each message a handler finished (`handled`) and each handler failure; the figures below are
derived from those payloads, so no service carries metric code. Labels are event types, reason codes and
durable names: bounded sets, never job or node ids (a reason that is not a short code is counted as `other`).

Counters are plain dictionaries read by observable counters at collection time (a publish adds to one entry:
well under a microsecond); histograms are the SDK's.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.errors import ConfigError
from shared.events import (
    AttestationFailed,
    AttestationResult,
    EventRejected,
    JobFailed,
    JobPending,
    JobPlaced,
    JobRefused,
    KeyReleased,
    KeyReleaseRefused,
    TeardownRecord,
)
from shared.ids import uuid7_time_ms
from shared.models import Frozen
from shared.telemetry import get_logger, otlp_enabled, resource_for

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader

    from shared.codec import Envelope

__all__ = [
    "METRICS_ADDR_ENV",
    "Metrics",
    "MetricsEndpoint",
    "active",
    "parse_addr",
    "setup_metrics",
    "shutdown_metrics",
]

log = get_logger("qvm.metrics")

METRICS_ADDR_ENV = "QVM_METRICS_ADDR"
MAX_SERIES = 500
"""Distinct label sets one counter keeps; further ones are counted under `other` (a guard, not a budget)."""

_CODE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
_OTHER = "other"

# Histogram buckets (seconds).
PLACEMENT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TEARDOWN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

# job.* events that move a job into a state (cancel_requested is a request, not a state), and those whose
# payload's reason is a short code worth a label.
_JOB_STATES = frozenset({"job.submitted", "job.pending", "job.placed", "job.accepted", "job.refused",
                         "job.cancelled", "job.failed", "job.done"})
_JOB_REASONS = (JobPending, JobRefused, JobFailed)


def code(value: str) -> str:
    """A label value from a reason field: the short code itself, or `other` for anything else (free text)."""
    return value if _CODE.match(value) else _OTHER


class _Counts:
    """Counts by label values, read by an observable counter's callback at each collection."""

    def __init__(self, *keys: str) -> None:
        self.keys = keys
        self.values: dict[tuple[str, ...], int] = {}

    def add(self, *labels: str) -> None:
        values = self.values
        if labels not in values and len(values) >= MAX_SERIES:
            labels = (_OTHER,) * len(labels)
        values[labels] = values.get(labels, 0) + 1

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        # dict.copy is one C call: atomic under the GIL while the event loop's thread adds entries.
        return [Observation(n, {k: v for k, v in zip(self.keys, labels, strict=True) if v})
                for labels, n in self.values.copy().items()]


class Metrics:
    """qvm's instruments on one meter, and the mapping from events to them."""

    def __init__(self, meter: Meter) -> None:
        self.events_published = _Counts("type")
        self.jobs = _Counts("state", "reason")
        self.attestations = _Counts("result", "purpose", "reason")
        self.key_releases = _Counts("outcome", "reason")
        self.dead_letters = _Counts("reason", "consumer")
        self.handler_failures = _Counts("consumer", "type")
        for name, counts, description in (
            ("qvm_events_published", self.events_published, "Events this process published and JetStream "
             "stored (a retried publish of a stored event id is not counted)."),
            ("qvm_jobs", self.jobs, "Job state changes this process published, by state (the job.* event); "
             "reason: the pending, refused or failed event's reason code."),
            ("qvm_attestation_results", self.attestations, "Attestation results this process published: "
             "verified or failed (with its reason code), by purpose (enroll, node, instance)."),
            ("qvm_key_releases", self.key_releases, "Volume keys released to an attested instance, or refused "
             "(with the reason code)."),
            ("qvm_dead_letters", self.dead_letters, "Messages this process dead-lettered, by reason and durable."),
            ("qvm_handler_failures", self.handler_failures, "Handler exceptions (each is retried, then "
             "dead-lettered), by durable and event type."),
        ):
            meter.create_observable_counter(name, callbacks=[counts.observe], unit="1", description=description)
        self.placement_latency = meter.create_histogram(
            "qvm_placement_latency", unit="s", explicit_bucket_boundaries_advisory=PLACEMENT_BUCKETS,
            description="A job's submission (the job.submitted event's time) to its job.placed, per placement.")
        self.teardown = meter.create_histogram(
            "qvm_teardown", unit="s", explicit_bucket_boundaries_advisory=TEARDOWN_BUCKETS,
            description="Teardown duration from the teardown record: job end (or instance exit) to instance "
                        "destroyed; outcome: the job's end state, complete: every wipe step verified.")
        self.handler = meter.create_histogram(
            "qvm_handler", unit="s", explicit_bucket_boundaries_advisory=HANDLER_BUCKETS,
            description="Handler run time per message, by durable and event type (failed runs included).")
        self.event_lag = meter.create_histogram(
            "qvm_event_lag", unit="s", explicit_bucket_boundaries_advisory=PLACEMENT_BUCKETS,
            description="An event's publish (its signed envelope time) to its handler's completion, by durable.")
        self._handler_attrs: dict[tuple[str, str], tuple[dict[str, str], dict[str, str]]] = {}

    # ------------------------------------------------------------ hooks (the bus calls these)
    def published(self, payload: Frozen, envelope: Envelope) -> None:
        """An event was stored: count it and whatever its payload says."""
        etype = envelope.type
        self.events_published.add(etype)
        if etype in _JOB_STATES:
            self.jobs.add(etype[4:], code(payload.reason) if isinstance(payload, _JOB_REASONS) else "")
            if isinstance(payload, JobPlaced):
                # The scheduler derives the placement's event id from the submission's (`derive_event_id`), so
                # its UUIDv7 timestamp is the submission's time.
                latency = envelope.time_ns / 1e9 - uuid7_time_ms(envelope.id) / 1e3
                self.placement_latency.record(max(latency, 0.0))
        elif isinstance(payload, AttestationResult):
            self.attestations.add("verified", payload.purpose.value, "")
        elif isinstance(payload, AttestationFailed):
            self.attestations.add("failed", payload.purpose.value, code(payload.reason))
        elif isinstance(payload, KeyReleased):
            self.key_releases.add("released", "")
        elif isinstance(payload, KeyReleaseRefused):
            self.key_releases.add("refused", code(payload.reason))
        elif isinstance(payload, EventRejected):
            self.dead_letters.add(payload.reason.value, code(payload.consumer))
        elif isinstance(payload, TeardownRecord):
            self.teardown.record(payload.duration_ms / 1000, {"outcome": code(payload.outcome),
                                                               "complete": str(payload.complete).lower()})

    def handled(self, consumer: str, event_type: str, seconds: float, event_time_ns: int) -> None:
        """A handler finished with a message (acked, dead-lettered or to be redelivered)."""
        attrs = self._handler_attrs.get((consumer, event_type))
        if attrs is None:
            attrs = self._handler_attrs.setdefault(
                (consumer, event_type), ({"consumer": consumer, "type": event_type}, {"consumer": consumer}))
        self.handler.record(seconds, attrs[0])
        self.event_lag.record(max(time.time_ns() - event_time_ns, 0) / 1e9, attrs[1])

    def handler_failed(self, consumer: str, event_type: str) -> None:
        self.handler_failures.add(consumer, event_type)


# ---------------------------------------------------------------- the process's metrics

_active: Metrics | None = None
_lock = threading.Lock()


def active() -> Metrics | None:
    """The process's metrics, or None when nothing reads them (the hooks then do nothing)."""
    return _active


@dataclass
class MetricsEndpoint:
    """What `setup_metrics` started: the provider, and the Prometheus endpoint's bound address if any."""

    provider: MeterProvider
    metrics: Metrics
    host: str | None = None
    port: int | None = None
    _server: WSGIServer | None = None

    @property
    def url(self) -> str | None:
        if self.port is None or self.host is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


_endpoint: MetricsEndpoint | None = None


def parse_addr(addr: str) -> tuple[str, int]:
    """`host:port` (`[::1]:9464` for IPv6; `:9464` for every interface) -> (host, port)."""
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{METRICS_ADDR_ENV}={addr!r}: expected host:port, e.g. 127.0.0.1:9464")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    return host, int(port)


def setup_metrics(service: str, *, addr: str | None = None, readers: Sequence[MetricReader] = ()
                  ) -> MetricsEndpoint | None:
    """Install the process's metrics once: a Prometheus endpoint on `addr` (default: `QVM_METRICS_ADDR`),
    OTLP when configured, and any extra `readers` (tests). Returns None (and installs nothing) when nothing
    would read them."""
    global _active, _endpoint
    with _lock:
        if _endpoint is not None:
            return _endpoint
        addr = addr if addr is not None else os.environ.get(METRICS_ADDR_ENV, "").strip()
        all_readers: list[MetricReader] = list(readers)
        registry = None
        if addr:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry, ProcessCollector

            host, port = parse_addr(addr)  # before anything starts: a bad value is a clear error
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)  # process_cpu_seconds_total, resident memory, open fds
            all_readers.append(PrometheusMetricReader(registry=registry, scope_info_enabled=False))
        if otlp_enabled("metrics"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            # Endpoint, headers, interval and timeout come from the standard OTEL_* variables.
            all_readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        if not all_readers:
            return None
        from opentelemetry.sdk.metrics import MeterProvider

        provider = MeterProvider(metric_readers=all_readers, resource=resource_for(service))
        metrics = Metrics(provider.get_meter("qvm"))
        endpoint = MetricsEndpoint(provider, metrics)
        if registry is not None:
            from prometheus_client import start_http_server

            try:
                server, _ = start_http_server(port, addr=host, registry=registry)
            except OSError as exc:
                provider.shutdown()
                raise ConfigError(f"{METRICS_ADDR_ENV}={addr!r}: cannot listen: {exc}") from exc
            endpoint.host, endpoint.port, endpoint._server = host, int(server.server_port), server
            log.info("metrics endpoint listening", extra={"metrics_url": endpoint.url})
        _active, _endpoint = metrics, endpoint
        return endpoint


def shutdown_metrics() -> None:
    """Stop the endpoint, export what OTLP has not sent yet, and uninstall (the hooks do nothing again)."""
    global _active, _endpoint
    with _lock:
        endpoint, _active, _endpoint = _endpoint, None, None
    if endpoint is None:
        return
    server = endpoint._server
    if server is not None:
        server.shutdown()
        server.server_close()
    endpoint.provider.shutdown()
