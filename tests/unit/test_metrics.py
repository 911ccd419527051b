"""shared/metrics.py: which published payloads count where, with which (bounded) labels; the Prometheus endpoint
in-process; when OTLP is on."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from prometheus_client.parser import text_string_to_metric_families

from shared import metrics
from shared.codec import Envelope
from shared.errors import ConfigError, Reason
from shared.events import (
    AttestationFailed,
    AttestationResult,
    AttestPurpose,
    EventRejected,
    InstanceAttestationFailed,
    InstanceAttested,
    JobAccepted,
    JobCancelled,
    JobDone,
    JobFailed,
    JobPending,
    JobPlaced,
    JobRefused,
    JobSubmitted,
    KeyReleased,
    KeyReleaseRefused,
    TeardownRecord,
    TeardownStep,
    spec_of_payload,
)
from shared.ids import derive_event_id, event_id_at, new_event_id
from shared.metrics import Metrics, code, parse_addr
from shared.models import Frozen, ResourceClaim, TrustState
from shared.telemetry import otlp_enabled

JOB = JobSubmitted(owner="alice", image="img")
HEX32 = "ab" * 16
HEX64 = "cd" * 32


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def m(reader: InMemoryMetricReader) -> Metrics:
    return Metrics(MeterProvider(metric_readers=[reader]).get_meter("test"))


def envelope(payload: Frozen, *, event_id: str | None = None, time_ns: int | None = None) -> Envelope:
    return Envelope(id=event_id or new_event_id(), type=spec_of_payload(payload).type.value, v=1,
                    time_ns=time_ns if time_ns is not None else time.time_ns(), producer="scheduler", payload={})


def publish(m: Metrics, *payloads: Frozen) -> None:
    for p in payloads:
        m.published(p, envelope(p))


def points(reader: InMemoryMetricReader) -> dict[str, dict[frozenset[tuple[str, Any]], Any]]:
    """metric name -> {frozenset(attributes): value (counters) or data point (histograms)}."""
    out: dict[str, dict[frozenset[tuple[str, Any]], Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for dp in metric.data.data_points:
                    key = frozenset((dp.attributes or {}).items())
                    out.setdefault(metric.name, {})[key] = dp.value if isinstance(dp, NumberDataPoint) else dp
    return out


def labels(**kv: str) -> frozenset[tuple[str, str]]:
    return frozenset(kv.items())


def attestation_result(cls: type[AttestationResult], purpose: AttestPurpose) -> AttestationResult:
    return cls(purpose=purpose, challenge_id=HEX32, evidence_id=new_event_id(), trust=TrustState.TRUSTED,
               ak_name=HEX32, ek_sha256=HEX64, pcr_sha256=HEX64, reset_count=0, restart_count=0,
               firmware_version="1", verified_ns=1, expires_ns=2)


def test_jobs_by_state_with_reason_codes_only(m: Metrics, reader: InMemoryMetricReader) -> None:
    placed = JobPlaced(node_id="node-a", attempt=0, claim=ResourceClaim(cpu_cores=1, ram_mib=1), job=JOB)
    publish(m, JOB, JobPending(reason="no_capacity"), JobPending(reason="no_capacity"), placed,
            JobAccepted(node_id="node-a", attempt=0), JobRefused(node_id="node-a", attempt=0, reason="gpu_missing"),
            JobFailed(reason="deadline_exceeded"), JobFailed(reason="Free text, with job-123 in it!"),
            JobCancelled(reason="client_request"), JobDone())
    got = points(reader)
    assert got["qvm_jobs"] == {
        labels(state="submitted"): 1, labels(state="pending", reason="no_capacity"): 2, labels(state="placed"): 1,
        labels(state="accepted"): 1, labels(state="refused", reason="gpu_missing"): 1,
        labels(state="failed", reason="deadline_exceeded"): 1, labels(state="failed", reason="other"): 1,
        # a cancellation's reason may be the client's own words: never a label
        labels(state="cancelled"): 1, labels(state="done"): 1,
    }
    assert got["qvm_events_published"][labels(type="job.pending")] == 2
    assert sum(got["qvm_events_published"].values()) == 10


def test_placement_latency_runs_from_the_submission(m: Metrics, reader: InMemoryMetricReader) -> None:
    submitted_ns = time.time_ns() - 1_500_000_000
    submitted_id = event_id_at(submitted_ns, "job-1")
    placed = JobPlaced(node_id="node-a", attempt=0, claim=ResourceClaim(cpu_cores=1, ram_mib=1), job=JOB)
    # as the scheduler does: the placement's id is derived from the submission's
    m.published(placed, envelope(placed, event_id=derive_event_id(submitted_id, "JobPlaced", "0"),
                                 time_ns=submitted_ns + 1_500_000_000))
    dp = points(reader)["qvm_placement_latency"][frozenset()]
    assert isinstance(dp, HistogramDataPoint)
    assert dp.count == 1 and 1.49 <= dp.sum <= 1.51
    assert dp.explicit_bounds[0] == metrics.PLACEMENT_BUCKETS[0]


def test_attestation_results_by_result_purpose_and_reason(m: Metrics, reader: InMemoryMetricReader) -> None:
    publish(m, attestation_result(AttestationResult, AttestPurpose.NODE),
            attestation_result(AttestationResult, AttestPurpose.ENROLL),
            attestation_result(InstanceAttested, AttestPurpose.INSTANCE),
            AttestationFailed(purpose=AttestPurpose.NODE, reason="pcr_digest_mismatch"),
            InstanceAttestationFailed(purpose=AttestPurpose.INSTANCE, reason="nonce_mismatch"),
            InstanceAttestationFailed(purpose=AttestPurpose.INSTANCE, reason="nonce_mismatch"))
    assert points(reader)["qvm_attestation_results"] == {
        labels(result="verified", purpose="node"): 1, labels(result="verified", purpose="enroll"): 1,
        labels(result="verified", purpose="instance"): 1,
        labels(result="failed", purpose="node", reason="pcr_digest_mismatch"): 1,
        labels(result="failed", purpose="instance", reason="nonce_mismatch"): 2,
    }


def test_key_releases_dead_letters_and_teardowns(m: Metrics, reader: InMemoryMetricReader) -> None:
    released = KeyReleased(instance_id="i-1", result_id="r", suite="x", sealed="ab" * 40, kek_version=1,
                           released_ns=1, lease_expires_ns=2)
    teardown = TeardownRecord(outcome="done", complete=True, steps=(TeardownStep(name="guest_ram", status="ok"),),
                              ended_ns=1, recorded_ns=2, duration_ms=2500)
    publish(m, released, released, KeyReleaseRefused(instance_id="i-1", reason="result_expired"),
            EventRejected(consumer="scheduler-jobs", subject="qvm.jobs.j.submitted", stream_seq=3,
                          reason=Reason.JOB_EXISTS, detail="", size=10),
            teardown, teardown.model_copy(update={"outcome": "failed", "complete": False, "duration_ms": 100}))
    got = points(reader)
    assert got["qvm_key_releases"] == {labels(outcome="released"): 2,
                                       labels(outcome="refused", reason="result_expired"): 1}
    assert got["qvm_dead_letters"] == {labels(reason="job_exists", consumer="scheduler-jobs"): 1}
    done = got["qvm_teardown"][labels(outcome="done", complete="true")]
    failed = got["qvm_teardown"][labels(outcome="failed", complete="false")]
    assert (done.count, done.sum, failed.count, failed.sum) == (1, 2.5, 1, 0.1)


def test_handlers(m: Metrics, reader: InMemoryMetricReader) -> None:
    sent_ns = time.time_ns() - 250_000_000
    for _ in range(3):
        m.handled("scheduler-jobs", "job.submitted", 0.002, sent_ns)
    m.handled("scheduler-nodes", "node.heartbeat", 0.001, sent_ns)
    m.handler_failed("scheduler-jobs", "job.submitted")
    got = points(reader)
    run = got["qvm_handler"][labels(consumer="scheduler-jobs", type="job.submitted")]
    assert run.count == 3 and abs(run.sum - 0.006) < 1e-9
    lag = got["qvm_event_lag"][labels(consumer="scheduler-jobs")]
    assert lag.count == 3 and 0.75 <= lag.sum < 5
    assert got["qvm_handler_failures"] == {labels(consumer="scheduler-jobs", type="job.submitted"): 1}


def test_label_sets_are_bounded(m: Metrics, reader: InMemoryMetricReader) -> None:
    for i in range(metrics.MAX_SERIES + 20):
        m.key_releases.add("refused", f"reason_{i}")
    got = points(reader)["qvm_key_releases"]
    assert len(got) == metrics.MAX_SERIES + 1 and got[labels(outcome="other", reason="other")] == 20
    assert code("tpm_rebooted") == "tpm_rebooted" and code("job 7 failed") == "other" and code("") == "other"


def test_parse_addr() -> None:
    assert parse_addr("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_addr("[::1]:0") == ("::1", 0)
    assert parse_addr(":9464") == ("0.0.0.0", 9464)
    for bad in ("9464", "host:", "host:port", "host:70000"):
        with pytest.raises(ConfigError):
            parse_addr(bad)


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("QVM_METRICS_ADDR", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_METRICS_EXPORTER",
                "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(var, raising=False)
    yield
    metrics.shutdown_metrics()


def test_nothing_is_installed_unless_something_reads_it(no_otel_env: None) -> None:
    assert metrics.setup_metrics("scheduler") is None and metrics.active() is None


def test_otlp_is_off_unless_an_endpoint_is_set(no_otel_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not otlp_enabled("traces") and not otlp_enabled("metrics")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://collector:4318/v1/metrics")
    assert otlp_enabled("metrics") and not otlp_enabled("traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert otlp_enabled("traces")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not otlp_enabled("traces") and otlp_enabled("metrics")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not otlp_enabled("metrics")


def test_prometheus_endpoint_in_process(no_otel_env: None) -> None:
    endpoint = metrics.setup_metrics("scheduler", addr="127.0.0.1:0")
    assert endpoint is not None and endpoint.port and endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
    assert metrics.setup_metrics("scheduler") is endpoint  # once per process
    m = metrics.active()
    assert m is not None
    publish(m, JobPending(reason="no_capacity"))
    with urllib.request.urlopen(endpoint.url, timeout=5) as r:
        text = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [sample] = [s for s in families["qvm_jobs"].samples if s.name == "qvm_jobs_total"]
    assert sample.labels == {"state": "pending", "reason": "no_capacity"} and sample.value == 1
    assert families["qvm_events_published"].type == "counter"
    assert families["target_info"].samples[0].labels["service_name"] == "scheduler"
    assert "process_cpu_seconds" in families
    metrics.shutdown_metrics()
    assert metrics.active() is None
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint.url, timeout=2)
