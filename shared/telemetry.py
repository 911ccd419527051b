"""Tracing and structured logs (metrics: `shared/metrics.py`).

Every publish and every handler is an OpenTelemetry span. The W3C trace context is injected into the
NATS headers and into the (signed) envelope, and a handler's span continues the trace of the event it
handles, so one job is one trace across all services. Logs are JSON lines carrying the service, job id
and trace id; callers pass ids and reason codes, never key material or payload contents.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

__all__ = [
    "JsonFormatter",
    "current_job",
    "extract_context",
    "get_logger",
    "inject_context",
    "otlp_enabled",
    "resource_for",
    "setup_logging",
    "setup_tracing",
    "tracer",
]

current_job: ContextVar[str | None] = ContextVar("qvm_job", default=None)
_service: ContextVar[str] = ContextVar("qvm_service", default="qvm")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message, job and trace ids, extras."""

    _skip = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        span = trace.get_current_span().get_span_context()
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "service": _service.get(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job = current_job.get()
        if job:
            out["job_id"] = job
        if span.is_valid:
            out["trace_id"] = format(span.trace_id, "032x")
        for k, v in record.__dict__.items():
            if k not in self._skip and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(out, separators=(",", ":"))


def setup_logging(service: str, level: str | None = None) -> None:
    _service.set(service)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("QVM_LOG_LEVEL", "INFO")).upper())
    logging.getLogger("nats").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # ssl eof_received chatter on close


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


class JsonlSpanExporter(SpanExporter):
    """Appends finished spans as JSON lines to a file (QVM_TRACE_FILE); enough to follow one job's trace
    without running a collector. Production deployments export over OTLP instead (`otlp_enabled`)."""

    def __init__(self, path: str) -> None:
        self._path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self._path, "a", encoding="utf-8") as f:
            for s in spans:
                ctx = s.get_span_context()
                parent = s.parent.span_id if s.parent else None
                f.write(json.dumps({
                    "name": s.name, "trace_id": format(ctx.trace_id, "032x") if ctx else None,
                    "span_id": format(ctx.span_id, "016x") if ctx else None,
                    "parent_id": format(parent, "016x") if parent else None,
                    "service": _service.get(), "start_ns": s.start_time, "end_ns": s.end_time,
                    "attributes": dict(s.attributes or {}),
                }) + "\n")
        return SpanExportResult.SUCCESS


_configured = False


def otlp_enabled(signal: str) -> bool:
    """Whether to export `signal` ("traces" or "metrics") over OTLP: the standard variables configure it, an
    endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`, or `OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT`) turns it on, and
    `OTEL_SDK_DISABLED=true` or `OTEL_<SIGNAL>_EXPORTER=none` keeps it off. Off by default."""
    env = os.environ
    sig = signal.upper()
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get(f"OTEL_{sig}_EXPORTER", "").strip().lower() == "none":
        return False
    on = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
              or env.get(f"OTEL_EXPORTER_OTLP_{sig}_ENDPOINT", "").strip())
    protocol = (env.get(f"OTEL_EXPORTER_OTLP_{sig}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "").strip()
    if on and protocol not in ("", "http/protobuf"):
        logging.getLogger("qvm.telemetry").warning(
            "only OTLP over HTTP/protobuf is supported; exporting with it", extra={"protocol": protocol[:32]})
    return on


def resource_for(service: str) -> Resource:
    """The process's OpenTelemetry resource: `service.name` is the service (`OTEL_RESOURCE_ATTRIBUTES` adds more)."""
    return Resource.create({"service.name": service, "service.namespace": "qvm"})


def setup_tracing(service: str) -> None:
    """Install a tracer provider once per process; export to QVM_TRACE_FILE when it is set, and over OTLP
    (HTTP/protobuf, batched) when `otlp_enabled("traces")`."""
    global _configured
    if _configured:
        return
    path = os.environ.get("QVM_TRACE_FILE")
    otlp = otlp_enabled("traces")
    # Without an exporter nothing would read recorded spans: sample none. Span contexts (trace ids) are
    # still created and propagated, so the trace context in headers and envelopes stays intact. With one,
    # every span (or what OTEL_TRACES_SAMPLER says).
    sampler = (None if os.environ.get("OTEL_TRACES_SAMPLER") else ALWAYS_ON) if path or otlp else ALWAYS_OFF
    provider = TracerProvider(sampler=sampler, resource=resource_for(service))
    if path:
        provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(path)))
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Endpoint, headers, timeout and the batch settings (OTEL_BSP_*) come from the standard variables.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _service.set(service)
    _configured = True
    global _tracer
    _tracer = None


_tracer: trace.Tracer | None = None


def tracer() -> trace.Tracer:
    """qvm's tracer, created once (after `setup_tracing`, or the no-op default)."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer("qvm")
    return _tracer


def inject_context() -> dict[str, str]:
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> otel_context.Context:
    return extract(dict(carrier))
