"""Job files are untrusted input: every defect is one clear error, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import JobSpecError
from shared.jobspec import load_job


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_example_job_loads() -> None:
    job_id, job = load_job(Path("deploy/examples/job.yaml"))
    assert job_id == "demo-job" and job.profile.cpu_cores == 1


@pytest.mark.parametrize(("text", "needle"), [
    ("owner: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "a job file is a mapping"),
    ("owner: a\n", "image: Field required"),
    ("owner: a\nimage: i\nprofile: {cpu_cores: 0}\n", "profile.cpu_cores"),
    ("owner: a\nimage: i\nsurprise: 1\n", "surprise: Extra inputs are not permitted"),
    ("id: 'bad id!'\nowner: a\nimage: i\n", "must be 1-64"),
    ("owner: a\nimage: i\nsecurity: maximum\n", "security"),
])
def test_bad_job_files_are_refused_clearly(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(JobSpecError) as exc:
        load_job(write(tmp_path, text))
    assert needle in str(exc.value)


def test_oversized_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="more than"):
        load_job(write(tmp_path, "owner: a\n" + "#" * 70_000))
    with pytest.raises(JobSpecError, match="cannot read"):
        load_job(tmp_path / "nope.yaml")


def test_cli_submit_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path, "owner: a\n")
    proc = subprocess.run([sys.executable, "-m", "shared.cli.main", "submit", str(bad)], capture_output=True,
                          text=True, env={**os.environ, "QVM_STATE_DIR": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2
    assert "image: Field required" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
