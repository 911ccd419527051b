"""Job files (`qvm submit JOB.yaml`): parse and validate into a `JobSubmitted`, with readable errors.

    id: train-42            # optional; default: a fresh id
    owner: alice
    image: pytorch-2.4      # a signed image bundle name
    command: [python, train.py]
    security: basic         # or confidential
    max_runtime_s: 3600
    profile:
      cpu_cores: 4
      ram_mib: 16384
      gpus: {count: 1, model: H100, min_vram_mib: 80000}
    output_key: 9f2c…       # optional: the client's X25519 public key (hex) the output is sealed to;
                            # without one no output is published (`qvm submit --wait` makes one)
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shared.errors import JobSpecError
from shared.events import JobSubmitted
from shared.identity import valid_id

__all__ = ["load_job"]

MAX_JOB_FILE = 64 * 1024


def load_job(path: Path) -> tuple[str, JobSubmitted]:
    try:
        size = path.stat().st_size
        if size > MAX_JOB_FILE:
            raise JobSpecError(f"{path}: {size} bytes, more than the {MAX_JOB_FILE} a job file may have")
        doc: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JobSpecError(f"{path}: cannot read ({exc.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_job(doc, str(path))


def parse_job(doc: Any, where: str = "job") -> tuple[str, JobSubmitted]:
    if not isinstance(doc, dict):
        raise JobSpecError(f"{where}: a job file is a mapping (owner, image, profile, ...)")
    doc = dict(doc)
    job_id = str(doc.pop("id", "") or f"job-{uuid.uuid4().hex[:12]}")
    if not valid_id(job_id):
        raise JobSpecError(f"{where}: id {job_id!r} must be 1-64 of A-Z a-z 0-9 _ - (starting alphanumeric)")
    try:
        return job_id, JobSubmitted.model_validate(doc)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                 for e in exc.errors(include_url=False)]
        raise JobSpecError(f"{where}: invalid job\n" + "\n".join(lines)) from None
