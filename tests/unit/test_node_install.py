"""`qvm node install` / `uninstall` (shared/cli/node_install.py): the unit it renders, how node.env is merged
(keys the join wrote are never clobbered), the paths it refuses to own, what it asks systemd for where
systemd runs the host, and uninstall's guards and its leave from the control plane."""

from __future__ import annotations

import inspect
import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from shared.cli import node_install
from shared.cli.node_install import (
    DEFAULT_TPM,
    MARKER,
    UNIT_NAME,
    InstallError,
    Layout,
    app,
    merge_env,
    parse_env,
    render_unit,
)

VENV = Path(sys.executable).parent.parent
runner = CliRunner()


def layout(root: Path, venv: Path = VENV) -> Layout:
    return Layout.of(root / "opt/qvm", root / "etc/qvm", root / "var/lib/qvm", root / "etc/systemd/system", venv)


def path_args(root: Path) -> list[str]:
    return ["--prefix", str(root / "opt/qvm"), "--etc", str(root / "etc/qvm"), "--state", str(root / "var/lib/qvm"),
            "--systemd-dir", str(root / "etc/systemd/system")]


def settings_of(unit: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every setting, comments left out."""
    out, section = [], ""
    for line in unit.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


# ------------------------------------------------------------------------------------------- the unit
def test_unit_runs_the_agent_with_the_install_paths() -> None:
    lay = Layout.of(Path("/opt/q"), Path("/etc/q"), Path("/var/lib/q"), Path("/etc/systemd/system"))
    s = settings_of(render_unit(lay))
    one = {(sec, k): v for sec, k, v in s}
    assert one["Service", "Type"] == "simple"
    assert one["Service", "EnvironmentFile"] == "/etc/q/node.env"
    assert one["Service", "ExecStart"] == "/opt/q/venv/bin/python -m services.node_agent"
    assert one["Service", "WorkingDirectory"] == "/var/lib/q"
    assert one["Service", "Restart"] == "on-failure"
    assert one["Service", "RestartSec"] == "5"
    assert one["Service", "RestartPreventExitStatus"] == "3"
    assert one["Service", "TimeoutStopSec"] == "90"
    assert one["Service", "KillMode"] == "mixed"
    assert one["Service", "LimitMEMLOCK"] == "infinity"
    assert one["Service", "UMask"] == "0077"
    assert one["Service", "ProtectSystem"] == "strict"
    assert one["Service", "ReadWritePaths"].split() == ["/var/lib/q", "/etc/q/pki", "-/run/netns", "-/run/wireguard",
                                                        "-/run/cryptsetup"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelLogs", "ProtectHostname",
                "RestrictRealtime", "LockPersonality", "RestrictSUIDSGID"):
        assert one["Service", key] == "yes", key
    assert one["Install", "WantedBy"] == "multi-user.target"
    # The doctor runs in the agent (QVM_NODE_DOCTOR=enforce), not once more before it.
    assert all("doctor" not in v for sec, k, v in s if k.startswith("ExecStart"))
    dropped = {v for sec, k, v in s if k == "CapabilityBoundingSet"}
    assert all(v.startswith("~") for v in dropped)
    assert {"CAP_SYS_TIME", "CAP_WAKE_ALARM"} <= {c for v in dropped for c in v[1:].split()}


@pytest.mark.parametrize("key", ["ProtectClock", "PrivateDevices", "DevicePolicy", "DeviceAllow",
                                 "ProtectKernelTunables", "ProtectControlGroups", "ProtectKernelModules",
                                 "MemoryDenyWriteExecute", "RestrictNamespaces", "PrivateNetwork",
                                 "SystemCallFilter", "RestrictAddressFamilies"])
def test_unit_leaves_out_what_would_stop_vms_vfio_tpm_or_netns(key: str) -> None:
    unit = render_unit(Layout.of(Path("/opt/qvm"), Path("/etc/qvm"), Path("/var/lib/qvm"), Path("/x")))
    assert key not in {k for _, k, _ in settings_of(unit)}
    assert f"{key}=" in unit  # ... and says why, in a comment


def test_unit_with_an_outside_venv_runs_that_python() -> None:
    lay = Layout.of(Path("/opt/qvm"), Path("/etc/qvm"), Path("/var/lib/qvm"), Path("/x"), Path("/srv/env"))
    assert "ExecStart=/srv/env/bin/python -m services.node_agent\n" in render_unit(lay)


# ------------------------------------------------------------------------------------------- node.env
def test_parse_env_reads_systemd_style_lines() -> None:
    text = "# c\n; c\n\nA=1\nexport B = two \nC=\"x \\\"y\\\"\"\nD='lit $x'\nnot a line\nA=3\n9X=bad\n"
    assert parse_env(text) == {"A": "3", "B": "two", "C": 'x "y"', "D": "lit $x"}


def test_a_new_node_env_has_the_install_keys() -> None:
    text = merge_env(None, {"QVM_STATE_DIR": "/var/lib/qvm", "QVM_PKI_DIR": "/etc/qvm/pki", "QVM_TPM": DEFAULT_TPM})
    assert text.startswith("#")
    assert parse_env(text) == {"QVM_STATE_DIR": "/var/lib/qvm", "QVM_PKI_DIR": "/etc/qvm/pki",
                               "QVM_TPM": "device:/dev/tpmrm0", "QVM_NODE_DOCTOR": "enforce"}


def test_merge_keeps_the_joins_keys_comments_and_operator_edits() -> None:
    joined = ("# header\nQVM_STATE_DIR=/old/state\nQVM_NATS_URL=tls://nats.example:4222\nQVM_NODE_ID=gpu-7\n"
              "# mine\nQVM_NODE_DOCTOR=warn\nQVM_LOG_LEVEL=DEBUG\nQVM_TPM=device:/dev/tpm0\n")
    merged = merge_env(joined, {"QVM_STATE_DIR": "/var/lib/qvm", "QVM_PKI_DIR": "/etc/qvm/pki"})
    env = parse_env(merged)
    assert env["QVM_NATS_URL"] == "tls://nats.example:4222" and env["QVM_NODE_ID"] == "gpu-7"
    assert env["QVM_NODE_DOCTOR"] == "warn"  # a default never overrides what is there
    assert env["QVM_LOG_LEVEL"] == "DEBUG" and env["QVM_TPM"] == "device:/dev/tpm0"
    assert env["QVM_STATE_DIR"] == "/var/lib/qvm" and env["QVM_PKI_DIR"] == "/etc/qvm/pki"
    lines = merged.splitlines()
    assert lines[:3] == ["# header", "QVM_STATE_DIR=/var/lib/qvm", "QVM_NATS_URL=tls://nats.example:4222"]
    assert "# mine" in lines and lines[-1] == "QVM_PKI_DIR=/etc/qvm/pki"  # a new key goes at the end
    assert merge_env(merged, {"QVM_STATE_DIR": "/var/lib/qvm", "QVM_PKI_DIR": "/etc/qvm/pki"}) == merged


def test_merge_leaves_a_line_that_already_says_the_value_and_drops_duplicates() -> None:
    text = "QVM_TPM=device:/dev/a\nQVM_TPM='device:/dev/tpmrm0'\nQVM_NODE_DOCTOR=enforce\n"
    merged = merge_env(text, {"QVM_TPM": "device:/dev/tpmrm0"})
    assert merged == "QVM_TPM='device:/dev/tpmrm0'\nQVM_NODE_DOCTOR=enforce\n"


def test_merge_quotes_what_needs_it_and_refuses_line_breaks() -> None:
    merged = merge_env("", {"QVM_X": "a b$c"}, {})
    assert "QVM_X='a b$c'" in merged.splitlines() and parse_env(merged)["QVM_X"] == "a b$c"
    with pytest.raises(InstallError):
        merge_env("", {"QVM_X": "a\nQVM_NATS_URL=evil"}, {})
    with pytest.raises(InstallError):
        merge_env("", {"QVM_X": "it's"}, {})


def test_tpm_follows_the_flag_then_node_env_then_the_host_default(tmp_path: Path) -> None:
    lay = layout(tmp_path)
    assert node_install.env_settings(lay, None, {})["QVM_TPM"] == DEFAULT_TPM
    assert node_install.env_settings(lay, None, {"QVM_TPM": "device:/dev/tpm0"})["QVM_TPM"] == "device:/dev/tpm0"
    assert node_install.env_settings(lay, "swtpm:port=1", {"QVM_TPM": "x"})["QVM_TPM"] == "swtpm:port=1"


# ------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("name,value", [("prefix", "/opt"), ("etc", "/etc"), ("state", "/var/lib"), ("state", "/"),
                                        ("prefix", "/usr/local"), ("etc", "/etc/systemd"), ("state", "/var")])
def test_system_directories_are_never_owned(tmp_path: Path, name: str, value: str) -> None:
    paths = {"prefix": tmp_path / "p", "etc": tmp_path / "e", "state": tmp_path / "s", name: Path(value)}
    with pytest.raises(InstallError, match="system directory"):
        Layout.of(paths["prefix"], paths["etc"], paths["state"], tmp_path / "u", VENV).check()


def test_paths_a_unit_cannot_hold_and_overlaps_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="letters, digits"):
        Layout.of(tmp_path / "my qvm", tmp_path / "e", tmp_path / "s", tmp_path / "u").check()
    with pytest.raises(InstallError, match="letters, digits"):
        Layout.of(tmp_path / "p%i", tmp_path / "e", tmp_path / "s", tmp_path / "u").check()
    with pytest.raises(InstallError, match="systemd-dir"):
        Layout.of(tmp_path / "p", tmp_path / "e", tmp_path / "s", tmp_path / "e" / "units").check()
    with pytest.raises(InstallError, match="not this install's"):
        Layout.of(tmp_path / "p", tmp_path / "e", tmp_path / "s", tmp_path / "u", tmp_path / "s" / "env").check()
    Layout.of(tmp_path / "p", tmp_path / "e", tmp_path / "s", tmp_path / "u", tmp_path / "p" / "venv").check()


def test_a_directory_with_someone_elses_files_is_not_taken_over(tmp_path: Path) -> None:
    (tmp_path / "etc/qvm").mkdir(parents=True)
    (tmp_path / "etc/qvm/theirs.conf").write_text("x")
    result = runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)])
    assert result.exit_code == 1 and "theirs.conf" in result.output and "uninstall would remove it" in result.output
    assert not (tmp_path / "opt/qvm").exists()  # refused before anything was written


def test_a_prefix_holding_only_the_venv_install_sh_made_is_fine(tmp_path: Path) -> None:
    lay = Layout.of(tmp_path / "opt/qvm", tmp_path / "e", tmp_path / "s", tmp_path / "u")
    (lay.venv / "bin").mkdir(parents=True)
    node_install.check_takeover(lay, None)
    (lay.prefix / "other").mkdir()
    with pytest.raises(InstallError, match="other"):
        node_install.check_takeover(lay, None)


def test_install_refuses_an_environment_without_the_agent(tmp_path: Path) -> None:
    result = runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no Python environment" in result.output
    assert not (tmp_path / "opt").exists()


# ------------------------------------------------------------------------------------------- install
def tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    return {str(p.relative_to(root)): (stat.S_IMODE(p.stat().st_mode), p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_install_writes_everything_once_and_a_rerun_changes_nothing(tmp_path: Path) -> None:
    first = runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)])
    assert first.exit_code == 0, first.output
    lay = layout(tmp_path)
    assert json.loads(lay.marker.read_text())["etc"] == str(lay.etc)
    assert lay.unit_file.read_text() == render_unit(lay)
    assert "not a system unit directory" in first.output  # a staging tree: nothing enabled
    before = tree(tmp_path)
    again = runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)])
    assert again.exit_code == 0, again.output
    assert tree(tmp_path) == before
    actions = {line.split()[0] for line in again.output.splitlines() if line and not line.startswith("next:")}
    assert actions == {"unchanged", "skipped"}


def test_a_rerun_repairs_modes_and_keeps_what_the_join_wrote(tmp_path: Path) -> None:
    assert runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)]).exit_code == 0
    lay = layout(tmp_path)
    lay.state.chmod(0o755)
    with lay.env_file.open("a") as f:
        f.write("QVM_NATS_URL=tls://cp:4222\nQVM_NODE_ID=n1\n")
    result = runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV), "--tpm", "device:/dev/tpm0"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(lay.state.stat().st_mode) == 0o700 and f"{lay.state} 0755 -> 0700" in result.output
    env = parse_env(lay.env_file.read_text())
    assert env["QVM_NATS_URL"] == "tls://cp:4222" and env["QVM_NODE_ID"] == "n1"
    assert env["QVM_TPM"] == "device:/dev/tpm0"
    assert "next: join" not in result.output  # it has joined


class Systemctl:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *args: str) -> tuple[bool, str]:
        self.calls.append(args)
        return True, ""


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> Systemctl:
    """This host as one systemd runs, with the temp unit directory as a system one; systemctl recorded."""
    fake = Systemctl()
    monkeypatch.setattr(node_install, "systemd_running", lambda: True)
    monkeypatch.setattr(node_install, "is_system_unit_dir", lambda d: True)
    monkeypatch.setattr(node_install, "systemctl", fake)
    return fake


def test_under_systemd_it_enables_and_starts_only_once_joined(tmp_path: Path, systemd: Systemctl) -> None:
    assert runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)]).exit_code == 0
    assert systemd.calls == [("daemon-reload",), ("enable", UNIT_NAME)]  # not joined: not started
    systemd.calls.clear()
    with layout(tmp_path).env_file.open("a") as f:
        f.write("QVM_NATS_URL=tls://cp:4222\n")
    assert runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)]).exit_code == 0
    assert systemd.calls == [("enable", UNIT_NAME), ("start", UNIT_NAME)]
    systemd.calls.clear()
    result = runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV), "--tpm", "device:/dev/tpm0"])
    assert result.exit_code == 0
    assert systemd.calls == [("enable", UNIT_NAME), ("restart", UNIT_NAME)]  # node.env changed
    systemd.calls.clear()
    assert runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV), "--no-start"]).exit_code == 0
    assert systemd.calls == []


# ------------------------------------------------------------------------------------------- uninstall
class FakeJoin:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.left_with: list[dict[str, Any]] = []

    def leave(self, **kwargs: Any) -> None:
        self.left_with.append(kwargs)
        if self.fail:
            raise RuntimeError("control plane unreachable")


@pytest.mark.parametrize("fail", [False, True])
def test_uninstall_leaves_the_control_plane_then_removes_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              systemd: Systemctl, fail: bool) -> None:
    assert runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)]).exit_code == 0
    lay = layout(tmp_path)
    with lay.env_file.open("a") as f:
        f.write("QVM_NATS_URL=tls://cp:4222\n")
    fake = FakeJoin(fail)
    monkeypatch.setattr(node_install, "join_client", lambda: fake)
    systemd.calls.clear()
    result = runner.invoke(app, ["uninstall", *path_args(tmp_path)])
    assert fake.left_with == [{"etc_dir": lay.etc}]
    assert result.exit_code == (1 if fail else 0), result.output
    assert ("control plane unreachable" in result.output) is fail
    assert systemd.calls == [("disable", "--now", UNIT_NAME), ("daemon-reload",)]
    assert not any(p.exists() for p in (lay.prefix, lay.etc, lay.state, lay.unit_file))


def test_uninstall_without_a_join_never_asks_the_control_plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)]).exit_code == 0
    monkeypatch.setattr(node_install, "join_client", lambda: pytest.fail("asked the control plane"))
    result = runner.invoke(app, ["uninstall", *path_args(tmp_path), "--keep-state"])
    assert result.exit_code == 0, result.output
    lay = layout(tmp_path)
    assert lay.state.is_dir() and not lay.etc.exists() and not lay.prefix.exists()


def test_uninstall_removes_only_what_the_marker_records(tmp_path: Path) -> None:
    assert runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)]).exit_code == 0
    other = tmp_path / "etc/other"
    other.mkdir()
    args = path_args(tmp_path)
    args[args.index("--etc") + 1] = str(other)
    result = runner.invoke(app, ["uninstall", *args])
    assert result.exit_code == 1 and "not the paths the install" in result.output
    assert other.is_dir() and layout(tmp_path).etc.is_dir() and layout(tmp_path).prefix.is_dir()


def test_uninstall_without_a_marker_touches_nothing(tmp_path: Path) -> None:
    nothing = runner.invoke(app, ["uninstall", *path_args(tmp_path)])
    assert nothing.exit_code == 0 and "nothing to remove" in nothing.output
    (tmp_path / "opt/qvm").mkdir(parents=True)
    (tmp_path / "opt/qvm/data").write_text("theirs")
    refused = runner.invoke(app, ["uninstall", *path_args(tmp_path)])
    assert refused.exit_code == 1 and MARKER in refused.output
    assert (tmp_path / "opt/qvm/data").read_text() == "theirs"


def test_uninstall_leaves_a_unit_it_did_not_write(tmp_path: Path) -> None:
    assert runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)]).exit_code == 0
    unit = layout(tmp_path).unit_file
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    result = runner.invoke(app, ["uninstall", *path_args(tmp_path)])
    assert result.exit_code == 1 and unit.read_text().startswith("[Service]")
    assert not layout(tmp_path).prefix.exists()


# ------------------------------------------------------------------------------------------- the join
def test_a_token_needs_the_control_plane_and_nothing_is_written_without(tmp_path: Path) -> None:
    result = runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV), "--token", "t"])
    assert result.exit_code == 1 and "--control-plane" in result.output
    assert not (tmp_path / "opt").exists()


def test_the_join_client_takes_what_install_and_uninstall_pass() -> None:
    client = pytest.importorskip("shared.join.client")
    inspect.signature(client.join).bind("t", "https://cp", Path("/e"), DEFAULT_TPM)
    inspect.signature(client.leave).bind(etc_dir=Path("/e"))


def test_install_and_the_join_agree_on_node_env(tmp_path: Path) -> None:
    """The join rewrites node.env its own way (sorted, comments dropped); a rerun of install leaves that."""
    client = pytest.importorskip("shared.join.client")
    assert runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)]).exit_code == 0
    lay = layout(tmp_path)
    client.write_env(lay.env_file, {"QVM_NATS_URL": "tls://cp:4222", "QVM_NODE_ID": "gpu-1",
                                    "QVM_PKI_DIR": str(lay.pki), "QVM_TPM": DEFAULT_TPM,
                                    "QVM_CONTROL_PLANE": "https://cp:8443"})
    written = lay.env_file.read_bytes(), stat.S_IMODE(lay.env_file.stat().st_mode)
    result = runner.invoke(app, ["install", *path_args(tmp_path), "--venv", str(VENV)])
    assert result.exit_code == 0 and f"unchanged  {lay.env_file}" in result.output
    assert (lay.env_file.read_bytes(), stat.S_IMODE(lay.env_file.stat().st_mode)) == written
    assert parse_env(lay.env_file.read_text())["QVM_NODE_DOCTOR"] == "enforce"
    assert client.read_env(lay.env_file)["QVM_STATE_DIR"] == str(lay.state)
