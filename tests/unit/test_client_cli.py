"""`qvm client`: its inputs are checked before anything is submitted or released (clean errors, exit 2)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.cli.client import image_digest, parse_secret
from shared.cli.main import app
from shared.errors import QvmError

JOB = """owner: alice
image: img
volume_mib: 32
client_secrets: {secrets}
"""


def _client(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {"COLUMNS": "200", "QVM_STATE_DIR": str(tmp_path / "state"), "QVM_NATS_URL": "tls://127.0.0.1:1"}
    result = CliRunner(env=env).invoke(app, ["client", *args])
    return result.exit_code, result.output


def test_parse_secret(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"\x00t0ken\n")
    assert parse_secret(f"api-token=@{tmp_path / 'token'}") == ("api-token", b"\x00t0ken\n")
    assert parse_secret("name=value=with=equals") == ("name", b"value=with=equals")
    for bad in ("novalue", "=x", f"a=@{tmp_path / 'missing'}"):
        with pytest.raises(QvmError):
            parse_secret(bad)


def test_image_digest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes(b"{}")
    assert image_digest(tmp_path) == hashlib.sha256(b"{}").hexdigest()
    with pytest.raises(QvmError, match="no image manifest"):
        image_digest(tmp_path / "nope")


def test_run_refuses_before_submitting(tmp_path: Path) -> None:
    waits = tmp_path / "waits.yaml"
    waits.write_text(JOB.format(secrets="true"))
    code, out = _client(tmp_path, "run", str(waits))
    assert code == 2 and "give at least one --secret" in out, out
    plain = tmp_path / "plain.yaml"
    plain.write_text(JOB.format(secrets="false"))
    code, out = _client(tmp_path, "run", str(plain), "--secret", "a=b")
    assert code == 2 and "does not set client_secrets" in out, out
    small = tmp_path / "small.yaml"
    small.write_text(JOB.format(secrets="true").replace("volume_mib: 32", "volume_mib: 4"))
    code, out = _client(tmp_path, "run", str(small), "--secret", "a=b")
    assert code == 2 and "at least 16 MiB" in out, out
    assert "Traceback" not in out
