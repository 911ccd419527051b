"""One job is one trace across processes: the demo with QVM_TRACE_FILE set exports every service's spans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.nats


def test_demo_job_is_one_trace_across_services(tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    env = {**os.environ, "QVM_TRACE_FILE": str(spans_file), "QVM_NODE_ID": "trace-node"}
    proc = subprocess.run([sys.executable, "-m", "shared.cli.main", "demo", "--state-dir", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    by_trace: dict[str, set[str]] = defaultdict(set)
    names: dict[str, set[str]] = defaultdict(set)
    for s in spans:
        by_trace[s["trace_id"]].add(s["service"])
        names[s["trace_id"]].add(s["name"])
    # the demo's job, and the same job as a confidential VM (pending on this host, then cancelled): a trace each
    job_traces = [t for t, n in names.items() if "publish JobSubmitted" in n]
    assert len(job_traces) == 2
    placed = [t for t in job_traces if "publish JobPlaced" in names[t]]
    assert len(placed) == 1
    trace = placed[0]
    assert {"qvm-cli", "scheduler", "node-agent"} <= by_trace[trace]
    assert {"publish JobSubmitted", "handle job.submitted", "publish JobPlaced", "handle job.placed",
            "publish JobAccepted"} <= names[trace]
