"""`qvm keys init / rotate / show` for every kind of KEK source, each test in its own temporary state."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.cli.main import app
from shared.config import KekSettings
from shared.crypto.kek import default_kek_paths, load_ring
from shared.tpm.swtpm import Swtpm

PASS = "a passphrase for the tests"


def qvm(env: dict[str, str | None], *args: str, stdin: str | None = None) -> tuple[int, str]:
    base: dict[str, str | None] = {"COLUMNS": "200", "QVM_KEK_SOURCE": None, "QVM_KEK_PASSPHRASE": None,
                                   "QVM_KEK_PASSPHRASE_FILE": None, "QVM_TPM": None}
    result = CliRunner(env={**base, **env}).invoke(app, ["keys", *args], input=stdin)
    return result.exit_code, result.output


def shown_versions(output: str) -> list[tuple[int, bool]]:
    rows = re.findall(r"│\s*(\d+)\s*│\s*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC)\s*│\s*(current)?\s*│", output)
    return [(int(v), bool(state)) for v, _, state in rows]


def test_development_default(tmp_path: Path) -> None:
    env: dict[str, str | None] = {"QVM_STATE_DIR": str(tmp_path / "state")}
    code, out = qvm(env, "init")
    assert code == 0, out
    assert "created KEK version 1" in out and "development" in out
    kek_file, pass_file = default_kek_paths(tmp_path / "state")
    assert kek_file.exists() and pass_file.exists()

    code, out = qvm(env, "init")
    assert code == 2 and "kek_file_exists" in out and "Traceback" not in out

    code, out = qvm(env, "rotate")
    assert code == 0 and "added KEK version 2" in out, out
    code, out = qvm(env, "show")
    assert code == 0, out
    assert shown_versions(out) == [(1, False), (2, True)]
    ring = load_ring(KekSettings(state_dir=tmp_path / "state"))
    for v in ring.versions:  # never the key material
        assert ring._keys[v].hex() not in out.replace("\n", "") and ring._keys[v].hex()[:16] not in out
    assert pass_file.read_text().strip() not in out


def test_file_source_with_env_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    env: dict[str, str | None] = {"QVM_KEK_SOURCE": f"file:{path}", "QVM_KEK_PASSPHRASE": PASS}
    assert qvm(env, "init")[0] == 0
    assert json.loads(path.read_text())["format"] == "qvm-kek-passphrase-file"
    assert qvm(env, "rotate")[0] == 0
    assert qvm(env, "rotate")[0] == 0
    code, out = qvm(env, "show")
    assert code == 0 and shown_versions(out) == [(1, False), (2, False), (3, True)], out
    assert PASS not in out

    code, out = qvm({**env, "QVM_KEK_PASSPHRASE": "not the passphrase"}, "show")
    assert code == 2 and "bad_passphrase" in out and "Traceback" not in out
    code, out = qvm({**env, "QVM_KEK_PASSPHRASE": "not the passphrase"}, "rotate")
    assert code == 2 and "bad_passphrase" in out
    assert len(json.loads(path.read_text())["keys"]) == 3


def test_passphrase_file_setting(tmp_path: Path) -> None:
    pf = tmp_path / "pass.txt"
    pf.write_text(PASS + "\n")
    env: dict[str, str | None] = {"QVM_KEK_SOURCE": f"file:{tmp_path / 'kek.json'}", "QVM_KEK_PASSPHRASE_FILE": str(pf)}
    assert qvm(env, "init")[0] == 0
    code, out = qvm({"QVM_KEK_SOURCE": f"file:{tmp_path / 'kek.json'}", "QVM_KEK_PASSPHRASE": PASS}, "show")
    assert code == 0 and shown_versions(out) == [(1, True)]


def test_source_option_overrides_settings(tmp_path: Path) -> None:
    env: dict[str, str | None] = {"QVM_KEK_SOURCE": "kms:tests.unit.kek_kms_plugin:factory", "QVM_KEK_PASSPHRASE": PASS}
    path = tmp_path / "other.json"
    assert qvm(env, "init", "--source", f"file:{path}")[0] == 0
    assert path.exists()


def test_no_passphrase_without_terminal(tmp_path: Path) -> None:
    code, out = qvm({"QVM_KEK_SOURCE": f"file:{tmp_path / 'kek.json'}"}, "init")
    assert code == 2 and "passphrase" in out and "Traceback" not in out
    assert not (tmp_path / "kek.json").exists()


def test_prompted_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.cli.keys as keys

    monkeypatch.setattr(keys, "sys", types.SimpleNamespace(stdin=types.SimpleNamespace(isatty=lambda: True)))
    env: dict[str, str | None] = {"QVM_KEK_SOURCE": f"file:{tmp_path / 'kek.json'}"}
    code, out = qvm(env, "init", stdin=f"{PASS}\n{PASS}\n")
    assert code == 0 and "created KEK version 1" in out, out
    assert PASS not in out  # hidden input
    code, out = qvm(env, "show", stdin=f"{PASS}\n")
    assert code == 0 and shown_versions(out) == [(1, True)]
    code, out = qvm(env, "show", stdin="wrong passphrase\n")
    assert code == 2 and "bad_passphrase" in out


def test_kms_source_is_shown_not_managed(monkeypatch: pytest.MonkeyPatch) -> None:
    env: dict[str, str | None] = {"QVM_KEK_SOURCE": "kms:tests.unit.kek_kms_plugin:factory",
                                  "QVM_TEST_KMS_VERSIONS": "2"}
    code, out = qvm(env, "show")
    assert code == 0 and "test KMS" in out and shown_versions(out) == [(1, False), (2, True)], out
    for cmd in ("init", "rotate"):
        code, out = qvm(env, cmd)
        assert code == 2 and "KMS" in out


def test_bad_source_spec() -> None:
    code, out = qvm({"QVM_KEK_SOURCE": "vault:/x"}, "show")
    assert code == 2 and "unknown scheme" in out and "Traceback" not in out


def test_tpm_source(swtpm: Swtpm, tmp_path: Path) -> None:
    path = tmp_path / "kek.tpm.json"
    env: dict[str, str | None] = {"QVM_KEK_SOURCE": f"tpm:{path}?pcrs=7,16", "QVM_TPM": swtpm.tcti}
    code, out = qvm(env, "init")
    assert code == 0 and "TPM-sealed" in out, out
    assert qvm(env, "rotate")[0] == 0
    code, out = qvm(env, "show")
    assert code == 0 and shown_versions(out) == [(1, False), (2, True)], out
