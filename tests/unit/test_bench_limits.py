"""The bench's figures beside the machine's limits: ratio and target semantics, the JSON document, and the
limit measurements themselves on small inputs (the real sizes run in `make bench`)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bench.common import Figure
from bench.limits import (
    CpuMeter,
    best_seconds,
    ed25519_verify_rate_all_cores,
    ed25519_verify_s,
    memset_memcmp_gbs,
    release_crypto_s,
)
from bench.report import summary_json


def test_a_rate_is_held_against_its_limit() -> None:
    f = Figure("releases/s", 600.0, "/s", 0.5, higher_is_better=True, limit=2000.0, limit_of="crypto alone")
    assert f.ratio == pytest.approx(0.3) and f.met is False
    assert Figure("x", 1100.0, "/s", 0.5, higher_is_better=True, limit=2000.0).met is True
    assert f.target_text() == ">= 0.50x" and f.limit_text() == "2,000 /s"


def test_a_cost_is_held_against_its_limit_from_below() -> None:
    f = Figure("launch", 1900.0, "ms", 1.1, limit=1800.0, limit_of="bare QEMU")
    assert f.ratio == pytest.approx(1900 / 1800) and f.met is True
    assert Figure("launch", 2100.0, "ms", 1.1, limit=1800.0).met is False
    assert f.target_text() == "<= 1.10x"


def test_absolute_targets_and_checks_keep_their_meaning() -> None:
    assert Figure("p99", 30.0, "ms", 50.0).met is True and Figure("p99", 60.0, "ms", 50.0).met is False
    assert Figure("double-booked", 0, "", check=True, check_target="0").met is True
    assert Figure("no target", 5.0, "ms").met is None and Figure("failed", None, "ms", 1.0, limit=2.0).ratio is None


def test_json_lists_limited_figures_first() -> None:
    figs = [Figure("p99", 30.0, "ms", 50.0), Figure("scrub", 4.0, "GB/s", 0.9, higher_is_better=True, limit=5.0,
                                                    limit_of="memset + memcmp")]
    out = io.StringIO()
    summary_json(figs, {"cores": 2}, out)
    doc = json.loads(out.getvalue())
    assert doc["cores"] == 2
    first, second = doc["figures"]
    assert first["name"] == "scrub" and first["ratio"] == pytest.approx(0.8) and first["target_ratio"] == 0.9
    assert first["met"] is False and first["limit_of"] == "memset + memcmp"
    assert second["ratio"] is None and second["target"] == 50.0 and second["met"] is True


def test_limits_measure_real_work() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    assert 0 < ed25519_verify_s(key, b"event", n=20) < 0.1
    assert 0 < release_crypto_s(b"result", b"released", key, n=5) < 0.5
    assert memset_memcmp_gbs(8 << 20) > 0
    calls = []
    assert best_seconds(lambda: calls.append(1), 10, rounds=2) >= 0 and len(calls) == 20
    assert ed25519_verify_rate_all_cores(key, b"event", seconds=0.2) > 0  # every core, one process each


def test_cpu_meter_counts_a_child_by_its_module() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "qvm_fake_service"])
    try:
        pids = []
        for _ in range(100):
            pids = CpuMeter.children("qvm_fake_service")
            if pids:
                break
        assert pids == [child.pid]
        meter = CpuMeter({"me": os.getpid(), "child": child.pid})
        meter.start()
        sum(i * i for i in range(200_000))
        spent = meter.stop()
        assert spent["me"] >= 0 and spent["child"] >= 0
        assert meter.per(10, "event").startswith("CPU per event: me ")
    finally:
        child.kill()
        child.wait()
