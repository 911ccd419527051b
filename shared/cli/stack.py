"""`qvm up`: the embedded stack on one machine, as a small deployment would run it.

Starts nats-server (mutual TLS, generated permissions, JetStream under the state dir), provisions the
streams, starts this machine's TPM (swtpm unless `QVM_TPM` names a real one) and writes the verifier's
policy, then runs each service as its own supervised child process (`python -m services.<name>`),
restarting a crashed one with back-off. `stop()` (or Ctrl-C) ends the services first, then NATS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.bus import Bus
from shared.config import StackSettings
from shared.identity import Identity, Role
from shared.models import TrustState
from shared.natsserver import EmbeddedCluster, EmbeddedNats
from shared.pki import Pki, write_private
from shared.provision import provision
from shared.telemetry import get_logger
from shared.tpm.swtpm import Swtpm, SwtpmState

if TYPE_CHECKING:
    from shared.join.controlplane import JoinService
    from shared.join.tunnel import WireGuardHub

__all__ = ["SERVICE_MODULES", "LocalStack"]

log = get_logger("qvm.cli.stack")

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
    last_exit: int | None = None  # the returncode of the process that died last (negative: its signal)

    @staticmethod
    def describe_exit(code: int | None) -> str:
        """A returncode as people read it: `exit 1`, or `signal 9 (SIGKILL)` for a negative one."""
        if code is None:
            return "exit status unknown"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                return f"signal {-code}"
            return f"signal {-code} ({name})"
        return f"exit {code}"


@dataclass
class LocalStack:
    settings: StackSettings
    node_id: str
    min_trust: TrustState
    services: tuple[str, ...] = tuple(SERVICE_MODULES)
    join_listen: str | None = None  # host:port to serve node joins on (the registrar); None: no joins
    nats_host: str = "127.0.0.1"  # where NATS listens (a WireGuard address, for remote nodes)
    server_names: tuple[str, ...] = ()  # names/addresses nodes dial, added to the server certificate
    wireguard_endpoint: str | None = None  # host:port nodes dial for the tunnel; None: no tunnel
    wireguard_net: str = "10.99.0.0/24"  # the tunnel's network: the control plane takes its first address
    hub: WireGuardHub | None = None
    nats_servers: int = 1  # 3: a local NATS cluster (replicated streams), to try one on a machine
    nats: EmbeddedNats | EmbeddedCluster | None = None
    tpm: Swtpm | None = None
    children: list[Child] = field(default_factory=list)
    admin: Bus | None = None
    join: JoinService | None = None

    def _guard_digest(self) -> str:
        """The runtime guard this host's node-agent will load (QVM_GUARD auto / required), which the policy
        then requires; none where it cannot run here (the agent then runs without it, and says so)."""
        if self.settings.guard == "off":
            return ""
        from shared.guard import available, build_guard

        mode, why = available()
        if mode is None:
            log.warning("runtime guard unavailable: the policy does not require one", extra={"why": why[:300]})
            return ""
        return build_guard().digest

    @property
    def pki(self) -> Pki:
        return Pki(self.settings.pki_path)

    async def start(self) -> str:
        state = self.settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        if self.wireguard_endpoint:
            self.hub = await asyncio.to_thread(self._start_hub)
            self.nats_host = str(self.hub.server_address)  # nodes reach NATS through the tunnel only
        local_node = [self.node_id] if "node-agent" in self.services else []
        self.pki.init(nodes=local_node, server_names=(*self.server_names, self.nats_host))
        if self.nats_servers > 1:
            self.nats = EmbeddedCluster(self.pki, state / "nats", size=self.nats_servers, host=self.nats_host)
            self.settings = self.settings.model_copy(update={"stream_replicas": self.nats_servers})
        else:
            self.nats = EmbeddedNats(self.pki, state / "nats", host=self.nats_host)
        url = await asyncio.to_thread(self.nats.start)
        (state / "nats.url").write_text(url)
        admin = await Bus.connect(url, self.pki, Identity(Role.ADMIN))
        try:
            await provision(admin.js, self.settings)
        except BaseException:
            await admin.close()
            raise
        self._start_tpm()
        if self.join_listen:
            await self._serve_joins(admin, url)
        else:
            await admin.close()
        logs = state / "logs"
        logs.mkdir(exist_ok=True)
        for name in self.services:
            child = Child(name, SERVICE_MODULES[name], logs / f"{name}.log")
            self._spawn(child, url)
            self.children.append(child)
        return url

    async def _serve_joins(self, admin: Bus, url: str) -> None:
        """The registrar: nodes join with the operator's tokens; the TPM vendor CAs are the verifier's."""
        from shared.join.controlplane import start_join_service
        from shared.tpm.policy import load_policy

        assert self.nats is not None and self.join_listen
        host, _, port = self.join_listen.rpartition(":")
        policy = load_policy(self.settings.attest_policy_path)
        self.admin = admin
        self.join = await start_join_service(admin, self.nats, host=host or "127.0.0.1", port=int(port or 0),
                                             nats_url=url, ek_ca=policy.ek_ca,
                                             require_ek_certificate=policy.require_ek_certificate,
                                             tunnel=self.hub)
        (self.settings.state_dir / "join.url").write_text(self.join.url)

    def _start_hub(self) -> WireGuardHub:
        """The control plane's WireGuard interface: its key kept under the state dir (0600), its port the
        endpoint's. Nodes get addresses in `wireguard_net` as they join; members are re-added on restart."""
        import ipaddress

        from shared.join.tunnel import WireGuardHub
        from shared.wireguard import WgInterface, generate_keypair

        assert self.wireguard_endpoint
        key_file = self.settings.state_dir / "wireguard" / "private.key"
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_private(key_file, (generate_keypair().private + "\n").encode(), exclusive=True)
        network = ipaddress.IPv4Network(self.wireguard_net)
        port = int(self.wireguard_endpoint.rsplit(":", 1)[1])
        iface = WgInterface("qvm-cp", key_file.read_text().strip(), listen_port=port,
                            address=f"{network[1]}/{network.prefixlen}")
        iface.down()  # one left by an earlier run
        iface.up()
        return WireGuardHub(iface, network, self.wireguard_endpoint)

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
                              measurement_pcr=self.settings.measurement_pcr, guard_digest=self._guard_digest())
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
            "QVM_STREAM_REPLICAS": str(self.settings.stream_replicas),
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
                child.last_exit = child.proc.returncode  # before the respawn replaces the process
                child.restarts += 1
                self._spawn(child, self.nats.url if self.nats else "")
                restarted.append(f"{child.name} ({Child.describe_exit(child.last_exit)})")
        return restarted

    def stop(self) -> None:
        if self.join:
            self.join.stop()
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
        if self.hub:
            self.hub.interface.down()
        if self.tpm:
            self.tpm.stop()
        for name in ("nats.url", "join.url"):
            (self.settings.state_dir / name).unlink(missing_ok=True)
