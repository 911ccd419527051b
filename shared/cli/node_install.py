"""`qvm node install` and `qvm node uninstall`: this host as a qvm node, set up and taken down again.

`install` makes the directories (`--etc` 0755 with `pki/` 0700, `--state` 0700), writes `<etc>/node.env`
(the agent's `QVM_*` settings, one `KEY=VALUE` a line, merged: keys the join wrote are kept), the systemd unit
`<systemd-dir>/qvm-node-agent.service` rendered with these paths, and a marker `<prefix>/.qvm-install` that
records what was installed; with `--token` it joins the control plane (`shared.join.client.join`), and where
systemd runs this host (PID 1) and the unit went into a system unit directory it enables the unit and starts
it once the node has joined. Every step says what it did (`created`, `written`, `unchanged`, ...); a second run
changes nothing that is already right.

`uninstall` stops and disables the unit, asks the control plane to revoke the node (`shared.join.client.leave`)
when it had joined, and removes the unit, `--etc`, `--state` (unless `--keep-state`) and `--prefix`: only
the paths the marker records, never `/`, `/etc`, `/var/lib`, `/opt` and the like themselves.

`deploy/install.sh` installs the Debian packages and the Python environment, then runs this module
(`python -m shared.cli.node_install install ...`), so the steps live here once.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = [
    "DEFAULT_TPM",
    "MARKER",
    "UNIT_NAME",
    "InstallError",
    "Layout",
    "install",
    "merge_env",
    "parse_env",
    "render_unit",
    "uninstall",
]

UNIT_NAME = "qvm-node-agent.service"
UNIT_TAG = "# qvm-node-agent: written by `qvm node install`"
MARKER = ".qvm-install"
ENV_FILE = "node.env"
ENV_MODE = 0o644  # no secret in it (keys live in pki/, 0700); the join writes it 0644 too
DEFAULT_TPM = "device:/dev/tpmrm0"
DEFAULT_PREFIX, DEFAULT_ETC, DEFAULT_STATE = Path("/opt/qvm"), Path("/etc/qvm"), Path("/var/lib/qvm")
DEFAULT_SYSTEMD_DIR = Path("/etc/systemd/system")
JOIN_MODULE = "shared.join.client"
# Keys `install` owns in node.env: the paths follow the options of each run; QVM_TPM follows --tpm when given.
# Defaults are written only when the key is missing, so an operator's edit (QVM_NODE_DOCTOR=warn) survives.
ENV_DEFAULTS = {"QVM_NODE_DOCTOR": "enforce"}
# Paths no install may own (uninstall removes what it owns whole), nor any directory above one of them.
PROTECTED = frozenset(Path(p) for p in (
    "/", "/bin", "/boot", "/dev", "/etc", "/etc/systemd", "/etc/systemd/system", "/home", "/lib", "/lib32",
    "/lib64", "/libx32", "/lost+found", "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap",
    "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local", "/usr/sbin", "/usr/share", "/var",
    "/var/cache", "/var/lib", "/var/log", "/var/opt", "/var/tmp", "/var/spool"))
# Directories systemd itself loads system units from: a unit written anywhere else is a staging tree.
SYSTEM_UNIT_DIRS = frozenset(Path(p) for p in (
    "/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system",
    "/lib/systemd/system"))
# Unit files take paths space-separated, expand `%` specifiers and `$` in ExecStart: keep paths plain.
PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._/@+:,=-]*$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9._/@+:,=%-]*$")


class InstallError(Exception):
    """A reason the install or uninstall cannot go on, for one clear line (exit code 1)."""


# ------------------------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class Layout:
    """Where one install puts things. Every path is absolute."""

    prefix: Path
    etc: Path
    state: Path
    systemd_dir: Path
    venv: Path

    @classmethod
    def of(cls, prefix: Path, etc: Path, state: Path, systemd_dir: Path, venv: Path | None = None) -> Layout:
        def absolute(p: Path) -> Path:
            return Path(os.path.abspath(os.path.expanduser(p)))

        return cls(absolute(prefix), absolute(etc), absolute(state), absolute(systemd_dir),
                   absolute(venv) if venv is not None else absolute(prefix) / "venv")

    @property
    def pki(self) -> Path:
        return self.etc / "pki"

    @property
    def env_file(self) -> Path:
        return self.etc / ENV_FILE

    @property
    def unit_file(self) -> Path:
        return self.systemd_dir / UNIT_NAME

    @property
    def marker(self) -> Path:
        return self.prefix / MARKER

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def venv_in_prefix(self) -> bool:
        return self.venv.is_relative_to(self.prefix)

    def owned(self) -> dict[str, Path]:
        """The directories this install owns (uninstall removes them whole)."""
        return {"prefix": self.prefix, "etc": self.etc, "state": self.state}

    def record(self) -> dict[str, Any]:
        """What the marker holds: every path, and what uninstall removes."""
        return {
            "installed_by": "qvm node install",
            "prefix": str(self.prefix), "etc": str(self.etc), "state": str(self.state),
            "systemd_dir": str(self.systemd_dir), "venv": str(self.venv),
            "files": [str(self.env_file), str(self.unit_file), str(self.marker)],
            "removes": [str(self.unit_file), str(self.etc), str(self.state), str(self.prefix)],
        }

    def check(self) -> None:
        """Refuse paths a unit file cannot hold, system directories, and overlaps that would make uninstall
        remove more than the install made."""
        for name, p in {**self.owned(), "systemd_dir": self.systemd_dir, "venv": self.venv}.items():
            if not PLAIN_PATH.match(str(p)):
                raise InstallError(f"--{name.replace('_', '-')} {p}: use a path of letters, digits and ._/@+:,=- "
                                   "(it goes into a systemd unit)")
        for name, p in self.owned().items():
            refuse_system_path(f"--{name}", p)
            if self.systemd_dir.is_relative_to(p):
                raise InstallError(f"--{name} {p} holds --systemd-dir {self.systemd_dir}: uninstall would remove it")
            if not self.venv_in_prefix and self.venv.is_relative_to(p):
                raise InstallError(f"--{name} {p} holds --venv {self.venv}, which is not this install's: "
                                   "uninstall would remove it")


def refuse_system_path(what: str, p: Path) -> None:
    for candidate in {p, Path(os.path.realpath(p))}:
        if candidate in PROTECTED or any(q.is_relative_to(candidate) for q in PROTECTED):
            raise InstallError(f"{what} {p}: a system directory, not one qvm may own (give e.g. {p / 'qvm'})")


def systemd_running() -> bool:
    """sd_booted(): systemd is this host's init (PID 1)."""
    return Path("/run/systemd/system").is_dir()


def is_system_unit_dir(d: Path) -> bool:
    real = Path(os.path.realpath(d))
    return any(real == Path(os.path.realpath(s)) for s in SYSTEM_UNIT_DIRS)


# ------------------------------------------------------------------------------------------- the unit
def render_unit(layout: Layout) -> str:
    """The node-agent's systemd unit with this install's paths, each setting with the reason for it."""
    return f"""{UNIT_TAG} (shared/cli/node_install.py); a rerun rewrites it.
# Local changes belong in a drop-in (systemctl edit qvm-node-agent), which a rerun leaves alone.
[Unit]
Description=qvm node-agent: attested micro VMs for GPU marketplace jobs
# It connects to the control plane's NATS (and retries): start it once the network is up.
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
# QVM_STATE_DIR, QVM_PKI_DIR, QVM_TPM, QVM_NODE_DOCTOR (install); QVM_NATS_URL, QVM_NODE_ID and
# QVM_CONTROL_PLANE (the join).
EnvironmentFile={layout.env_file}
WorkingDirectory={layout.state}
# No `qvm node doctor` in ExecStartPre: QVM_NODE_DOCTOR=enforce makes the agent run the same checks itself
# at start, inside this sandbox (what it checks is what it can use), and exit 2 naming each failed one.
# `ip netns add` and wireguard-go need their directories under /run, which is read-only in the sandbox
# (ProtectSystem=strict): they are made first, outside it ('+'), so ReadWritePaths can open them.
ExecStartPre=+/bin/mkdir -p -m 0755 /run/netns /run/wireguard
ExecStartPre=+/bin/mkdir -p -m 0700 /run/cryptsetup
# The WireGuard tunnel to the control plane, when the join granted one (else it says so and does nothing):
# NATS is reached through it only. Outside the sandbox: it makes a network interface.
ExecStartPre=+{layout.python} -P -m shared.cli.main node tunnel up --etc {layout.etc}
ExecStart={layout.python} -m services.node_agent
# A crash, or a failed start (exit 2: a host check that may clear, like a TPM that appears late), is
# retried. Exit 3: the control plane revoked this node; restarting cannot help, it has to join again.
Restart=on-failure
RestartSec=5
RestartPreventExitStatus=3
# SIGTERM to the agent alone: it tears its instances down (VRAM scrub, volume erase, keys destroyed) while
# its helpers still run; whatever is left after TimeoutStopSec gets SIGKILL.
KillMode=mixed
TimeoutStopSec=90
# A helper killed by the OOM killer is the agent's to handle, not a reason to stop every job on the host.
OOMPolicy=continue
# VFIO pins all of a guest's RAM; QEMU with many devices and the agent's sockets need descriptors.
LimitMEMLOCK=infinity
LimitNOFILE=524288
# Everything the agent and its VMMs create (state, sockets, volumes) is root's alone.
UMask=0077
SyslogIdentifier=qvm-node-agent

# Hardening that still lets the agent run QEMU (/dev/kvm), VFIO (/dev/vfio/*, sysfs driver_override and
# bind/unbind), the TPM (/dev/tpmrm0), network namespaces and nftables (CAP_NET_ADMIN), cgroups, dm-crypt
# and the NVIDIA devices. It runs as root: it binds GPUs to vfio-pci and makes cgroups, netns and rules.
# No setuid gains for it or its children (QEMU, ip, nft, cryptsetup, wireguard-go).
NoNewPrivileges=yes
# /usr, /etc, /boot, /var, /opt read-only (the venv included); /dev, /proc, /sys stay writable (VFIO and
# cgroups write /sys, netns sysctls /proc/sys). Writable: the state (instances, images, measurement log),
# the PKI (certificates), and /run/netns, /run/wireguard, /run/cryptsetup (locks). Netns the agent adds are
# mounted in its own mount namespace: `ip netns list` on the host shows their names, only the agent uses them.
ProtectSystem=strict
ReadWritePaths={layout.state} {layout.pki} -/run/netns -/run/wireguard -/run/cryptsetup
ProtectHome=yes
PrivateTmp=yes
# No /dev/kmsg, /proc/kmsg, syslog(2).
ProtectKernelLogs=yes
# Its own UTS namespace: it may read the hostname (the default node id), not change it.
ProtectHostname=yes
# What ProtectClock= does (no CAP_SYS_TIME, CAP_WAKE_ALARM), without ProtectClock= itself: on systemd < 253
# (Ubuntu 22.04's 249) it implies DeviceAllow=char-rtc, which turns on the device allow-list and blocks
# /dev/kvm, /dev/vfio, /dev/tpmrm0, /dev/net/tun, /dev/nvidia*. Also no reboot, LSM, audit or immutable-file
# changes.
CapabilityBoundingSet=~CAP_SYS_TIME CAP_WAKE_ALARM CAP_SYS_BOOT CAP_SYS_PACCT CAP_LEASE CAP_BLOCK_SUSPEND
CapabilityBoundingSet=~CAP_MAC_ADMIN CAP_MAC_OVERRIDE CAP_AUDIT_CONTROL CAP_LINUX_IMMUTABLE
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
# Not set, on purpose: PrivateDevices=, DevicePolicy=, DeviceAllow= (the devices above, loop and
# device-mapper); ProtectKernelTunables= (VFIO's sysfs writes, netns sysctls); ProtectControlGroups= (a
# cgroup per VMM under /sys/fs/cgroup/qvm); ProtectKernelModules= (NVML and CUDA load nvidia_uvm through
# nvidia-modprobe); MemoryDenyWriteExecute= (QEMU's TCG JIT); RestrictNamespaces= (a netns and mount
# namespace per instance); RestrictAddressFamilies=, SystemCallFilter= (QEMU and wireguard-go inherit them:
# the agent puts each VMM under its own seccomp allow-list); PrivateNetwork=.

[Install]
WantedBy=multi-user.target
"""


# ------------------------------------------------------------------------------------------- node.env
def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _split(line: str) -> tuple[str, str] | None:
    """(key, raw value) of a `KEY=VALUE` line (an `export ` before the key is allowed); None for comments,
    blank lines and anything else."""
    s = line.strip()
    if not s or s[0] in "#;":
        return None
    key, sep, value = s.removeprefix("export ").partition("=")
    key = key.strip()
    return (key, value.strip()) if sep and ENV_KEY.match(key) else None


def parse_env(text: str) -> dict[str, str]:
    """`KEY=VALUE` lines as systemd's EnvironmentFile= reads them (quotes removed); the last one wins."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        kv = _split(line)
        if kv:
            out[kv[0]] = _unquote(kv[1])
    return out


def format_env_value(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise InstallError(f"an environment value cannot hold a line break: {value!r}")
    if ENV_PLAIN_VALUE.match(value):
        return value
    if "'" in value:
        raise InstallError(f"an environment value here cannot hold a single quote: {value!r}")
    return f"'{value}'"  # literal in single quotes, for systemd and for a shell alike


ENV_HEADER = """\
# The qvm node-agent's settings (QVM_*), read by its systemd unit (EnvironmentFile=). `qvm node install`
# writes QVM_STATE_DIR, QVM_PKI_DIR, QVM_TPM and QVM_NODE_DOCTOR, the join QVM_NATS_URL, QVM_NODE_ID, QVM_CONTROL_PLANE;
# each keeps every other line. After an edit: systemctl restart qvm-node-agent
"""


def merge_env(existing: str | None, settings: Mapping[str, str], defaults: Mapping[str, str] = ENV_DEFAULTS) -> str:
    """node.env with `settings` set (changed in place where the key is there, appended where not) and each of
    `defaults` added only where its key is missing. Every other line (the join's keys, an operator's,
    comments) stays as it was."""
    lines = existing.splitlines() if existing is not None else ENV_HEADER.splitlines()
    present = parse_env(existing or "")
    wanted = dict(settings) | {k: v for k, v in defaults.items() if k not in present}
    for key, value in wanted.items():
        if not ENV_KEY.match(key):
            raise InstallError(f"not an environment variable name: {key!r}")
        line = f"{key}={format_env_value(value)}"
        at = [i for i, raw in enumerate(lines) if (kv := _split(raw)) is not None and kv[0] == key]
        if not at:
            lines.append(line)
            continue
        last = _split(lines[at[-1]])
        if last is None or _unquote(last[1]) != value:
            lines[at[-1]] = line
        for i in reversed(at[:-1]):  # an earlier duplicate would only confuse a reader: the last one wins
            del lines[i]
    return "\n".join(lines) + "\n"


def env_settings(layout: Layout, tpm: str | None, existing: Mapping[str, str]) -> dict[str, str]:
    """The keys this run sets: the paths, and the TPM (`--tpm`, else what node.env says, else the host's)."""
    return {
        "QVM_STATE_DIR": str(layout.state),
        "QVM_PKI_DIR": str(layout.pki),
        "QVM_TPM": tpm if tpm is not None else existing.get("QVM_TPM") or DEFAULT_TPM,
    }


# ------------------------------------------------------------------------------------------- file steps
Say = Callable[[str, object], None]


def say(action: str, what: object) -> None:
    typer.echo(f"{action:<10} {what}")


def ensure_dir(path: Path, mode: int, report: Say) -> bool:
    """The directory with exactly `mode`; True when something changed."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise InstallError(f"{path} is there and is not a directory")
    if not path.exists():
        path.mkdir(parents=True, mode=0o755)
        os.chmod(path, mode)
        report("created", f"{path} ({mode:04o})")
        return True
    return _ensure_mode(path, mode, report)


def _ensure_mode(path: Path, mode: int, report: Say) -> bool:
    have = stat.S_IMODE(path.stat().st_mode)
    if have == mode:
        report("unchanged", path)
        return False
    os.chmod(path, mode)
    report("mode", f"{path} {have:04o} -> {mode:04o}")
    return True


def ensure_file(path: Path, text: str, mode: int, report: Say) -> bool:
    """The file with exactly `text` and `mode`, replaced atomically when it differs; True when it changed."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise InstallError(f"{path} is there and is not a regular file")
    if path.exists() and path.read_text() == text:
        return _ensure_mode(path, mode, report)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report("written", path)
    return True


def read_marker(layout: Layout) -> dict[str, Any] | None:
    try:
        data = json.loads(layout.marker.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InstallError(f"{layout.marker} is unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("installed_by") != "qvm node install":
        raise InstallError(f"{layout.marker} is not a qvm install marker")
    return data


def check_takeover(layout: Layout, marker: Mapping[str, Any] | None) -> None:
    """Uninstall removes --prefix, --etc and --state whole: each must be new, empty, or already this
    install's (recorded by its marker; --prefix may hold the venv deploy/install.sh made in it first)."""
    for name, p in layout.owned().items():
        if not p.exists() or (marker is not None and marker.get(name) == str(p)):
            continue
        if not p.is_dir():
            raise InstallError(f"--{name} {p} is there and is not a directory")
        left = {c.name for c in p.iterdir()}
        if name == "prefix" and layout.venv_in_prefix:
            left -= {layout.venv.relative_to(p).parts[0]} if layout.venv != p else set()
        if left:
            raise InstallError(f"--{name} {p} already holds {', '.join(sorted(left)[:5])}, not from a qvm install: "
                               "uninstall would remove it whole; give a new or empty directory")


def check_venv(layout: Layout) -> None:
    if not os.access(layout.python, os.X_OK):
        raise InstallError(f"no Python environment at {layout.venv} ({layout.python} missing): run "
                           "deploy/install.sh, or pass --venv with one that has qvm[node-agent,cli]")
    done = subprocess.run([str(layout.python), "-c", "import services.node_agent.service"],
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise InstallError(f"{layout.python} cannot import the node-agent ({last}): "
                           f"{layout.venv}/bin/pip install 'qvm[node-agent,cli]'")


def systemctl(*args: str) -> tuple[bool, str]:
    try:
        done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=180, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return done.returncode == 0, (done.stderr or done.stdout).strip()


def join_client() -> Any:
    """`shared.join.client`, imported only when a join or leave is asked for."""
    return importlib.import_module(JOIN_MODULE)


def run_join(token: str, control_plane: str, layout: Layout, tpm: str) -> str:
    """Join the control plane (it writes the node's keys and certificates under <etc>/pki and QVM_NATS_URL,
    QVM_NODE_ID, QVM_CONTROL_PLANE into node.env); the node id it joined as."""
    result, _ = join_client().join(token, control_plane, layout.etc, tpm)
    return str(result.node_id)


# ------------------------------------------------------------------------------------------- commands
def install(
    prefix: Annotated[Path, typer.Option(help="Where qvm lives: the venv (default) and the install marker")]
    = DEFAULT_PREFIX,
    etc: Annotated[Path, typer.Option(help="Configuration: node.env and pki/ (the node's certificates)")]
    = DEFAULT_ETC,
    state: Annotated[Path, typer.Option(help="The agent's state: instances, images, measurement log")]
    = DEFAULT_STATE,
    systemd_dir: Annotated[Path, typer.Option(help="Where the unit goes (elsewhere than a system unit "
                                              "directory: a staging tree, nothing is enabled)")]
    = DEFAULT_SYSTEMD_DIR,
    venv: Annotated[Path | None, typer.Option(help="The Python environment with qvm[node-agent,cli] "
                                              "(default <prefix>/venv)")] = None,
    token: Annotated[str | None, typer.Option(envvar="QVM_JOIN_TOKEN", show_envvar=True,
                                              help="Join the control plane with this token")] = None,
    control_plane: Annotated[str | None, typer.Option(help="The control plane to join")] = None,
    tpm: Annotated[str | None, typer.Option(help=f"The TPM as a tss2 TCTI (default: what node.env says, else "
                                            f"{DEFAULT_TPM})")] = None,
    start: Annotated[bool, typer.Option("--start/--no-start", help="Enable the unit, and start it once joined "
                                        "(only where systemd is PID 1 and the unit is in a system unit "
                                        "directory)")] = True,
) -> None:
    """Install the node-agent as a systemd service: directories, node.env, the unit; join with --token.
    Running it again changes only what is not already right."""
    try:
        if token is not None and not control_plane:
            raise InstallError("--token needs --control-plane URL (the control plane to join)")
        layout = Layout.of(prefix, etc, state, systemd_dir, venv)
        layout.check()
        marker = read_marker(layout)
        check_takeover(layout, marker)
        check_venv(layout)
        if marker is not None:
            for name in ("etc", "state", "systemd_dir"):
                if marker.get(name) not in (None, str(getattr(layout, name))):
                    typer.echo(f"note: the previous install used --{name.replace('_', '-')} {marker[name]}; "
                               "it is left as it is", err=True)
        ensure_dir(layout.prefix, 0o755, say)
        ensure_file(layout.marker, json.dumps(layout.record(), indent=2, sort_keys=True) + "\n", 0o644, say)
        ensure_dir(layout.etc, 0o755, say)
        ensure_dir(layout.pki, 0o700, say)
        ensure_dir(layout.state, 0o700, say)
        existing = layout.env_file.read_text() if layout.env_file.exists() else None
        env_changed = ensure_file(layout.env_file, merge_env(existing, env_settings(
            layout, tpm, parse_env(existing or ""))), ENV_MODE, say)
        if not layout.systemd_dir.exists():
            ensure_dir(layout.systemd_dir, 0o755, say)
        unit_changed = ensure_file(layout.unit_file, render_unit(layout), 0o644, say)
    except InstallError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None

    joined_now = False
    if token is not None and control_plane:
        try:
            node_id = run_join(token, control_plane, layout, parse_env(layout.env_file.read_text())["QVM_TPM"])
        except Exception as exc:  # the join's own refusals, or its module missing: one line, exit 1
            typer.echo(f"error: the join failed: {exc}", err=True)
            raise typer.Exit(1) from None
        say("joined", f"{control_plane}" + (f" as node {node_id}" if node_id else ""))
        joined_now = True
    joined = bool(parse_env(layout.env_file.read_text()).get("QVM_NATS_URL"))

    if not start:
        say("skipped", f"enabling {UNIT_NAME} (--no-start)")
    elif not is_system_unit_dir(layout.systemd_dir):
        say("skipped", f"enabling {UNIT_NAME}: {layout.systemd_dir} is not a system unit directory")
    elif not systemd_running():
        say("skipped", f"enabling {UNIT_NAME}: systemd is not this host's init (PID 1)")
    else:
        _activate(unit_changed, env_changed or joined_now, joined)
    if not joined:
        typer.echo(f"next: join the control plane: {layout.python} -m shared.cli.node_install install "
                   "--token TOKEN --control-plane URL (with the same paths)")


def _activate(unit_changed: bool, config_changed: bool, joined: bool) -> None:
    if unit_changed:
        ok, out = systemctl("daemon-reload")
        if not ok:
            typer.echo(f"error: systemctl daemon-reload: {out}", err=True)
            raise typer.Exit(1)
    ok, out = systemctl("enable", UNIT_NAME)
    if not ok:
        typer.echo(f"error: systemctl enable {UNIT_NAME}: {out}", err=True)
        raise typer.Exit(1)
    say("enabled", UNIT_NAME)
    if not joined:
        say("skipped", f"starting {UNIT_NAME}: the node has not joined (no QVM_NATS_URL in node.env)")
        return
    verb = "restart" if unit_changed or config_changed else "start"
    ok, out = systemctl(verb, UNIT_NAME)
    if not ok:
        typer.echo(f"error: systemctl {verb} {UNIT_NAME}: {out} (journalctl -u {UNIT_NAME})", err=True)
        raise typer.Exit(1)
    say("restarted" if verb == "restart" else "started", UNIT_NAME)


def uninstall(
    prefix: Annotated[Path, typer.Option(help="The install's prefix (holds its marker)")] = DEFAULT_PREFIX,
    etc: Annotated[Path, typer.Option(help="The install's configuration directory")] = DEFAULT_ETC,
    state: Annotated[Path, typer.Option(help="The install's state directory")] = DEFAULT_STATE,
    systemd_dir: Annotated[Path, typer.Option(help="Where the install put the unit")] = DEFAULT_SYSTEMD_DIR,
    keep_state: Annotated[bool, typer.Option(help="Leave the state directory")] = False,
) -> None:
    """Stop and disable the node-agent, revoke the node at the control plane when it had joined, and remove
    what `install` made: the unit, --etc, --state (unless --keep-state) and --prefix. Exit 1 when a step failed
    (the rest still runs)."""
    failed = False
    try:
        layout = Layout.of(prefix, etc, state, systemd_dir)
        marker = read_marker(layout)
        if marker is None:
            there = [p for p in (layout.prefix, layout.env_file, layout.unit_file) if p.exists()]
            if there:
                raise InstallError(f"no install marker {layout.marker}: not removing what no install recorded "
                                   f"({', '.join(map(str, there))})")
            say("absent", f"no qvm install at {layout.prefix}: nothing to remove")
            return
        wrong = [f"--{n.replace('_', '-')} {getattr(layout, n)} (the install's: {marker.get(n)})"
                 for n in ("etc", "state", "systemd_dir") if marker.get(n) != str(getattr(layout, n))]
        if wrong:
            raise InstallError("these are not the paths the install at " f"{layout.prefix} recorded: "
                               + "; ".join(wrong))
        for name, p in layout.owned().items():
            refuse_system_path(f"--{name}", p)
    except InstallError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None

    managed = systemd_running() and is_system_unit_dir(layout.systemd_dir)
    if managed and layout.unit_file.exists():
        ok, out = systemctl("disable", "--now", UNIT_NAME)
        say("stopped" if ok else "failed", f"{UNIT_NAME}" + ("" if ok else f": systemctl disable --now: {out}"))
        failed |= not ok

    if layout.env_file.exists() and parse_env(layout.env_file.read_text()).get("QVM_NATS_URL"):
        try:
            join_client().leave(etc_dir=layout.etc)
            say("left", "the control plane revoked this node")
            tunnel = importlib.import_module("shared.join.tunnel").node_tunnel(layout.etc)
            if tunnel is not None:
                tunnel.down()
                say("removed", f"tunnel {tunnel.interface.name}")
        except Exception as exc:  # keep going: the host is cleaned up either way
            typer.echo(f"error: leaving the control plane failed: {exc}; the node stays registered until an "
                       "operator revokes it", err=True)
            failed = True

    if layout.unit_file.exists():
        if UNIT_TAG in layout.unit_file.read_text(errors="replace"):
            layout.unit_file.unlink()
            say("removed", layout.unit_file)
            if managed:
                ok, out = systemctl("daemon-reload")
                failed |= not ok
        else:
            typer.echo(f"error: {layout.unit_file} was not written by qvm node install: left", err=True)
            failed = True
    for p in (layout.etc, *(() if keep_state else (layout.state,)), layout.prefix):
        if p.is_symlink():
            p.unlink()
            say("removed", p)
        elif p.exists():
            shutil.rmtree(p)
            say("removed", p)
    if keep_state:
        say("kept", layout.state)
    if failed:
        raise typer.Exit(1)


# The module's own entry (`python -m shared.cli.node_install ...`): what deploy/install.sh runs.
app = typer.Typer(help="This host as a qvm node: install and uninstall the node-agent.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.command("install")(install)
app.command("uninstall")(uninstall)


@app.callback()
def _configure() -> None:
    from shared.telemetry import setup_logging

    setup_logging("qvm-node-install", os.environ.get("QVM_LOG_LEVEL", "ERROR"))


if __name__ == "__main__":
    app()
