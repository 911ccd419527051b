"""Observability out of a real service process: its Prometheus endpoint scraped and parsed (counters derived
from the events it published, the placement latency, handler timings, a dead letter), and its traces and
metrics received over OTLP/HTTP by a local receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from shared.consumers import consumer_spec
from shared.events import JobPending, JobSubmitted, NodeRegistered
from shared.identity import Identity, Role
from shared.ids import event_id_at
from shared.models import GpuRequest, HardwareProfile
from tests.framework.flow import events_of, gpu_inventory
from tests.framework.stack import Stack

pytestmark = pytest.mark.nats

SCHEDULER = Identity(Role.SCHEDULER)
JOBS_DURABLE = consumer_spec(Role.SCHEDULER, "jobs").durables(SCHEDULER)[0].name
NODES_DURABLE = consumer_spec(Role.SCHEDULER, "nodes").durables(SCHEDULER)[0].name
ONE_GPU = JobSubmitted(owner="alice", image="img", profile=HardwareProfile(
    cpu_cores=8, ram_mib=65536, gpus=GpuRequest(count=1, model="H100", min_vram_mib=80000)))
TOO_BIG = JobSubmitted(owner="alice", image="img", profile=HardwareProfile(gpus=GpuRequest(count=16)))

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _start(stack: Stack, tmp_path: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    full = {**os.environ, "QVM_NATS_URL": stack.url, "QVM_PKI_DIR": str(stack.pki.root),
            "QVM_STATE_DIR": str(tmp_path), "QVM_MIN_TRUST": "unverified", "QVM_OFFLINE_AFTER_S": "3600", **env}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "services.scheduler"], env=full, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@contextlib.asynccontextmanager
async def scheduler(stack: Stack, tmp_path: Path, **env: str) -> AsyncIterator[Path]:
    """`python -m services.scheduler` as deployed, against the test's NATS; yields its log once it is ready."""
    log = tmp_path / "scheduler.log"
    proc = _start(stack, tmp_path, log, env)
    try:
        deadline = time.monotonic() + 60
        while b"registry loaded" not in log.read_bytes():
            assert proc.poll() is None, f"scheduler exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"scheduler not ready: {log.read_text()[-2000:]}"
            await asyncio.sleep(0.05)
        yield log
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def metrics_url(log: Path) -> str:
    """The endpoint's address as the service logged it (QVM_METRICS_ADDR with port 0: a free port)."""
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("msg") == "metrics endpoint listening":
            return str(rec["metrics_url"])
    raise AssertionError(f"no metrics endpoint logged: {log.read_text()[-2000:]}")


def scrape(url: str) -> tuple[Samples, dict[str, Any]]:
    """GET /metrics and parse the Prometheus text format: {(sample name, labels): value}, and the families. An
    empty label is no label (Prometheus semantics; the exporter fills the labels other series of a family have)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, frozenset((k, v) for k, v in s.labels.items() if v)): s.value
               for f in families.values() for s in f.samples}
    return samples, families


def by_labels(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {k: v for (n, k), v in samples.items() if n == name}


def L(**kv: str) -> frozenset[tuple[str, str]]:
    return frozenset(kv.items())


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def place_jobs(stack: Stack, wait_registered: Callable[[], bool]) -> None:
    """A node registers; then one job that fits (submitted 2 s before it is published), one that cannot fit,
    and a replayed copy of the first under a new event id (dead-lettered as job_exists)."""
    node = await stack.bus(Role.NODE_AGENT, "node-a")
    await node.publish(NodeRegistered(inventory=gpu_inventory("node-a"), agent_version="test"), node_id="node-a")
    await until(wait_registered, "the scheduler to register node-a")
    market = await stack.bus(Role.MARKETPLACE)
    assert await market.publish(ONE_GPU, job_id="job-fits",
                                event_id=event_id_at(time.time_ns() - 2_000_000_000, "job-fits"))
    assert await market.publish(TOO_BIG, job_id="job-too-big")
    assert await market.publish(ONE_GPU, job_id="job-fits")  # the replay


async def test_metrics_endpoint_is_scraped(stack: Stack, tmp_path: Path) -> None:
    async with scheduler(stack, tmp_path, QVM_METRICS_ADDR="127.0.0.1:0") as log:
        url = metrics_url(log)
        handled = "qvm_handler_seconds_count"

        def registered() -> bool:
            return by_labels(scrape(url)[0], handled).get(L(consumer=NODES_DURABLE, type="node.registered"), 0) >= 1

        await place_jobs(stack, registered)

        def settled() -> bool:
            return by_labels(scrape(url)[0], handled).get(L(consumer=JOBS_DURABLE, type="job.submitted"), 0) >= 3

        await until(settled, "the scheduler to handle the three submissions")
        samples, families = scrape(url)

    admin = await stack.bus(Role.ADMIN)
    [pending] = [e.payload for e in await events_of(admin) if isinstance(e.payload, JobPending)]
    assert by_labels(samples, "qvm_events_published_total") == {
        L(type="job.placed"): 1, L(type="job.pending"): 1, L(type="event.rejected"): 1}
    assert by_labels(samples, "qvm_jobs_total") == {L(state="placed"): 1, L(state="pending", reason=pending.reason): 1}
    assert by_labels(samples, "qvm_dead_letters_total") == {L(reason="job_exists", consumer=JOBS_DURABLE): 1}
    assert families["qvm_events_published"].type == "counter"
    # submitted 2 s before it was published: the latency runs from the submission's own time
    assert families["qvm_placement_latency_seconds"].type == "histogram"
    assert samples[("qvm_placement_latency_seconds_count", frozenset())] == 1
    assert 2.0 <= samples[("qvm_placement_latency_seconds_sum", frozenset())] < 30
    assert samples[("qvm_placement_latency_seconds_bucket", L(le="+Inf"))] == 1
    assert samples[("qvm_placement_latency_seconds_bucket", L(le="1.0"))] == 0
    handler = by_labels(samples, "qvm_handler_seconds_count")
    assert handler[L(consumer=JOBS_DURABLE, type="job.submitted")] == 3
    assert handler[L(consumer=NODES_DURABLE, type="node.registered")] == 1
    assert by_labels(samples, "qvm_event_lag_seconds_count")[L(consumer=JOBS_DURABLE)] == 3
    assert not by_labels(samples, "qvm_handler_failures_total")
    assert families["target_info"].samples[0].labels["service_name"] == "scheduler"


class OtlpReceiver:
    """A local OTLP/HTTP receiver: decodes what arrives on /v1/traces and /v1/metrics."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                assert self.headers.get("Content-Type") == "application/x-protobuf"
                if self.headers.get("Content-Encoding") == "gzip":
                    import gzip
                    body = gzip.decompress(body)
                with receiver.lock:
                    if self.path == "/v1/traces":
                        receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                    elif self.path == "/v1/metrics":
                        receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                self.send_response(200 if self.path in ("/v1/traces", "/v1/metrics") else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[tuple[dict[str, str], str]]:
        """(resource attributes, span name) for every span received."""
        with self.lock:
            return [({a.key: a.value.string_value for a in rs.resource.attributes}, span.name)
                    for req in self.traces for rs in req.resource_spans for ss in rs.scope_spans for span in ss.spans]

    def counter(self, name: str) -> tuple[dict[str, str], dict[frozenset[tuple[str, str]], float]]:
        """The latest values of a cumulative counter received, by attributes, with its resource."""
        resource: dict[str, str] = {}
        values: dict[frozenset[tuple[str, str]], float] = {}
        with self.lock:
            for req in self.metrics:
                for rm in req.resource_metrics:
                    for sm in rm.scope_metrics:
                        for metric in sm.metrics:
                            if metric.name == name:
                                resource = {a.key: a.value.string_value for a in rm.resource.attributes}
                                for dp in metric.sum.data_points:
                                    key = frozenset((a.key, a.value.string_value) for a in dp.attributes)
                                    values[key] = dp.as_int or dp.as_double
        return resource, values

    @contextlib.contextmanager
    def running(self) -> Iterator[OtlpReceiver]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


async def test_otlp_export_reaches_a_receiver(stack: Stack, tmp_path: Path) -> None:
    with OtlpReceiver().running() as rx:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.url, "OTEL_METRIC_EXPORT_INTERVAL": "300",
               "OTEL_BSP_SCHEDULE_DELAY": "100"}
        async with scheduler(stack, tmp_path, **env):
            def registered() -> bool:
                return any(name == "handle node.registered" for _, name in rx.spans())

            await place_jobs(stack, registered)

            def exported() -> bool:
                _, published = rx.counter("qvm_events_published")
                return published.get(L(type="job.placed")) == 1 and published.get(L(type="event.rejected")) == 1

            await until(exported, "the scheduler's metrics over OTLP")
            await until(lambda: any(n == "publish JobPlaced" for _, n in rx.spans()), "the placement's span")
        resource, published = rx.counter("qvm_events_published")
        assert resource["service.name"] == "scheduler"
        assert published == {L(type="job.placed"): 1, L(type="job.pending"): 1, L(type="event.rejected"): 1}
        _, jobs = rx.counter("qvm_jobs")
        assert jobs[L(state="placed")] == 1
        names = {(r.get("service.name"), n) for r, n in rx.spans()}
        assert {("scheduler", "handle job.submitted"), ("scheduler", "publish JobPlaced"),
                ("scheduler", "publish JobPending"), ("scheduler", "handle node.registered")} <= names
        with rx.lock:
            metric_names = {m.name for req in rx.metrics for rm in req.resource_metrics for sm in rm.scope_metrics
                            for m in sm.metrics}
        assert {"qvm_events_published", "qvm_jobs", "qvm_placement_latency", "qvm_handler",
                "qvm_dead_letters"} <= metric_names
