"""`qvm up`: the embedded stack on one machine, as a small deployment would run it.

Starts nats-server (mutual TLS, generated permissions, JetStream under the state dir), provisions the
streams, starts this machine's TPM (swtpm unless `QVM_TPM` names a real one) and writes the verifier's
policy, then runs each service as its own supervised child process (`python -m services.<name>`),
restarting a crashed one with back-off. `stop()` (or Ctrl-C) ends the services first, then NATS.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.bus import Bus
from shared.config import StackSettings
from shared.identity import Identity, Role
from shared.models import TrustState
from shared.natsserver import EmbeddedNats
from shared.pki import Pki
from shared.provision import provision
from shared.tpm.swtpm import Swtpm, SwtpmState

__all__ = ["SERVICE_MODULES", "LocalStack"]

SERVICE_MODULES = {"scheduler": "services.scheduler", "janitor": "services.janitor",
                   "attestation-verifier": "services.attestation_verifier", "key-broker": "services.key_broker",
                   "node-agent": "services.node_agent"}
"""What `qvm up` runs: every service, one process each."""


@dataclass
class Child:
    name: str
    module: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0


@dataclass
class LocalStack:
    settings: StackSettings
    node_id: str
    min_trust: TrustState
    services: tuple[str, ...] = tuple(SERVICE_MODULES)
    nats: EmbeddedNats | None = None
    tpm: Swtpm | None = None
    children: list[Child] = field(default_factory=list)

    @property
    def pki(self) -> Pki:
        return Pki(self.settings.pki_path)

    async def start(self) -> str:
        state = self.settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self.pki.init(nodes=[self.node_id])
        self.nats = EmbeddedNats(self.pki, state / "nats")
        url = await asyncio.to_thread(self.nats.start)
        (state / "nats.url").write_text(url)
        admin = await Bus.connect(url, self.pki, Identity(Role.ADMIN))
        try:
            await provision(admin.js, self.settings)
        finally:
            await admin.close()
        self._start_tpm()
        logs = state / "logs"
        logs.mkdir(exist_ok=True)
        for name in self.services:
            child = Child(name, SERVICE_MODULES[name], logs / f"{name}.log")
            self._spawn(child, url)
            self.children.append(child)
        return url

    def _start_tpm(self) -> None:
        """This machine's TPM for the node-agent: `QVM_TPM` when set (a host's /dev/tpmrm0), else a swtpm
        under the state dir (a development TPM: its EK certificate comes from a local CA). The embedded
        verifier's policy is written for what is here: this checkout's agent, the images under the state
        dir, this machine's QEMU (a real deployment reviews and ships its own)."""
        from shared.tpm.policy_gen import local_policy

        ek_ca = None
        if not self.settings.tpm:
            self.tpm = Swtpm(SwtpmState(self.settings.state_dir / "tpm" / "swtpm")).start()
            ek_ca = self.tpm.state.ek_ca
        policy = local_policy(self.settings.images_path, ek_ca=ek_ca.resolve() if ek_ca else None,
                              measurement_pcr=self.settings.measurement_pcr)
        path = self.settings.attest_policy_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(policy.model_dump_json(indent=2))

    @property
    def tcti(self) -> str | None:
        return self.tpm.tcti if self.tpm else self.settings.tpm

    def _env(self, url: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "QVM_STATE_DIR": str(self.settings.state_dir.resolve()), "QVM_NATS_URL": url,
            "QVM_PKI_DIR": str(self.settings.pki_path.resolve()), "QVM_MIN_TRUST": self.min_trust.value,
            "QVM_NODE_ID": self.node_id, "PYTHONUNBUFFERED": "1",
            "QVM_ATTEST_POLICY": str(self.settings.attest_policy_path.resolve()),
        })
        if self.tcti:
            env["QVM_TPM"] = self.tcti
        return env

    def _spawn(self, child: Child, url: str) -> None:
        with open(child.log, "ab") as out:
            child.proc = subprocess.Popen([sys.executable, "-m", child.module], env=self._env(url),
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        child.started = time.monotonic()

    def supervise_once(self) -> list[str]:
        """Restart children that died (back-off grows with restarts); returns what was restarted."""
        restarted = []
        for child in self.children:
            if child.proc and child.proc.poll() is not None:
                wait = min(2 ** child.restarts, 30)
                if time.monotonic() - child.started < wait:
                    continue
                child.restarts += 1
                self._spawn(child, self.nats.url if self.nats else "")
                restarted.append(f"{child.name} (exit {child.proc.returncode if child.proc else '?'})")
        return restarted

    def stop(self) -> None:
        for child in self.children:
            if child.proc and child.proc.poll() is None:
                child.proc.terminate()
        for child in self.children:
            if child.proc:
                try:
                    child.proc.wait(10)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
        if self.nats:
            self.nats.stop()
        if self.tpm:
            self.tpm.stop()
        url_file = self.settings.state_dir / "nats.url"
        if url_file.exists():
            url_file.unlink()
