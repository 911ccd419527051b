"""The hoster's install path for real: `deploy/install.sh` (no apt, this test's Python environment) into a
temporary root, run twice, checked with `systemd-analyze verify`, then `uninstall`, which must leave what it
did not make; and the script's refusal of systems other than Ubuntu >= 22.04 / Debian >= 12."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shared.cli.node_install import DEFAULT_TPM, MARKER, UNIT_NAME, UNIT_TAG, parse_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "install.sh"
VENV = Path(sys.executable).parent.parent
DEBIAN_12 = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n'

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="deploy/install.sh runs as root only")


def os_release(tmp_path: Path, text: str) -> dict[str, str]:
    f = tmp_path / "os-release"
    f.write_text(text)
    env = {**os.environ, "QVM_OS_RELEASE": str(f)}
    env.pop("QVM_JOIN_TOKEN", None)
    return env


def paths(root: Path) -> list[str]:
    return ["--prefix", str(root / "opt/qvm"), "--etc", str(root / "etc/qvm"), "--state", str(root / "var/lib/qvm"),
            "--systemd-dir", str(root / "etc/systemd/system")]


def install_sh(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), "--no-apt", "--venv", str(VENV), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def node_install(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli.node_install", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    return {str(p.relative_to(root)): (stat.S_IMODE(p.lstat().st_mode), p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_install_twice_verify_and_uninstall(tmp_path: Path) -> None:
    env = os_release(tmp_path, DEBIAN_12)
    t = tmp_path / "root"
    (t / "etc").mkdir(parents=True)
    (t / "etc/hosts.keep").write_text("not qvm's\n")  # siblings uninstall must leave
    (t / "var/lib/other").mkdir(parents=True)
    (t / "var/lib/other/data").write_text("not qvm's either\n")

    first = install_sh(env, *paths(t))
    assert first.returncode == 0, first.stdout + first.stderr
    prefix, etc, state, units = t / "opt/qvm", t / "etc/qvm", t / "var/lib/qvm", t / "etc/systemd/system"
    unit = units / UNIT_NAME
    assert (mode(etc), mode(etc / "pki"), mode(state), mode(prefix)) == (0o755, 0o700, 0o700, 0o755)
    assert (mode(etc / "node.env"), mode(unit)) == (0o644, 0o644)
    assert (prefix / MARKER).is_file()
    assert parse_env((etc / "node.env").read_text()) == {
        "QVM_STATE_DIR": str(state), "QVM_PKI_DIR": str(etc / "pki"), "QVM_TPM": DEFAULT_TPM,
        "QVM_NODE_DOCTOR": "enforce"}
    text = unit.read_text()
    assert text.startswith(UNIT_TAG)
    for line in (f"EnvironmentFile={etc}/node.env", f"ExecStart={VENV}/bin/python -m services.node_agent",
                 f"WorkingDirectory={state}", f"ReadWritePaths={state} {etc}/pki -/run/netns -/run/wireguard "
                 "-/run/cryptsetup", "RestartPreventExitStatus=3", "Restart=on-failure", "TimeoutStopSec=90"):
        assert line in text.splitlines(), line
    assert "written" in first.stdout and "not a system unit directory" in first.stdout  # nothing enabled

    before = snapshot(t)
    second = install_sh(env, *paths(t))
    assert second.returncode == 0, second.stdout + second.stderr
    assert snapshot(t) == before
    reported = [line.split()[0] for line in second.stdout.splitlines() if not line.startswith(("==>", "next:"))]
    assert set(reported) == {"unchanged", "skipped"}, second.stdout

    removed = node_install(env, "uninstall", *paths(t))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    files = sorted(str(p.relative_to(t)) for p in t.rglob("*") if not p.is_dir())
    assert files == ["etc/hosts.keep", "var/lib/other/data"]
    assert not any(p.exists() for p in (prefix, etc, state, unit))
    assert (VENV / "bin" / "python").exists()  # a --venv is not the install's to remove
    again = node_install(env, "uninstall", *paths(t))
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the systemd package): the unit is not verified")
    env = os_release(tmp_path, DEBIAN_12)
    done = install_sh(env, *paths(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    unit = tmp_path / "etc/systemd/system" / UNIT_NAME
    # verify needs no running systemd; it checks every key and value, and that ExecStart's binary exists.
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    caught = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "mixd" in caught.stdout + caught.stderr  # it does look


def test_shellcheck_is_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt install shellcheck)")
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("release", [
    'ID=fedora\nVERSION_ID=39\nPRETTY_NAME="Fedora Linux 39"\n',
    'ID=ubuntu\nVERSION_ID="20.04"\nPRETTY_NAME="Ubuntu 20.04.6 LTS"\n',
    'ID=debian\nVERSION_ID="11"\n',
    'ID=debian\n',  # testing / sid: no VERSION_ID
    "",
])
def test_other_systems_are_refused(tmp_path: Path, release: str) -> None:
    env = os_release(tmp_path, release)
    done = install_sh(env, *paths(tmp_path / "root"))
    assert done.returncode == 1
    assert "unsupported system" in done.stderr and "Ubuntu >= 22.04 or Debian >= 12" in done.stderr
    assert "--force" in done.stderr
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("release", ['ID=ubuntu\nVERSION_ID="22.04"\n', 'ID=ubuntu\nVERSION_ID="24.10"\n',
                                     'ID=debian\nVERSION_ID="13"\n'])
def test_supported_systems_pass(tmp_path: Path, release: str) -> None:
    done = install_sh(os_release(tmp_path, release), *paths(tmp_path / "root"), "--no-start")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "root/etc/systemd/system" / UNIT_NAME).is_file()


def test_force_installs_on_another_system(tmp_path: Path) -> None:
    env = os_release(tmp_path, "ID=fedora\nVERSION_ID=39\n")
    done = install_sh(env, "--force", *paths(tmp_path / "root"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning" in done.stderr and (tmp_path / "root/opt/qvm" / MARKER).is_file()


def test_bad_flags_and_a_missing_venv_are_refused(tmp_path: Path) -> None:
    env = os_release(tmp_path, DEBIAN_12)
    unknown = install_sh(env, "--prefx", str(tmp_path))
    assert unknown.returncode == 1 and "unknown flag: --prefx" in unknown.stderr
    no_venv = subprocess.run(["bash", str(SCRIPT), "--no-apt", "--venv", str(tmp_path / "none"), *paths(tmp_path)],
                             env=env, capture_output=True, text=True, timeout=60)
    assert no_venv.returncode == 1 and "no " in no_venv.stderr and not (tmp_path / "opt").exists()
