"""A hoster's whole path, as the README's "Become a hoster" section tells it, against a running control plane:
`deploy/install.sh --token` installs into a temp root and joins (swtpm as the host's TPM), the installed
node-agent runs a job in a QEMU micro VM, `qvm node drain --wait` empties it, `qvm node uninstall` removes
it and withdraws it: the agent stops with the "withdrawn" exit status, `node.revoked` is on the bus, and the
node's certificate no longer opens the bus."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from services.attestation_verifier.service import Verifier
from services.janitor.service import Janitor
from services.key_broker.service import KeyBroker
from services.scheduler.service import Scheduler
from shared.buckets import JOIN_INVITES, KEYS
from shared.bus import Bus
from shared.cli.node import node_app
from shared.cli.node_ops import drain, status
from shared.crypto.kek import PassphraseFileSource, create_kek_file
from shared.errors import EXIT_WITHDRAWN, Unauthorized
from shared.events import Domain, EventType, JobSubmitted
from shared.identity import Identity, Role
from shared.join.client import read_env
from shared.join.controlplane import JoinService, start_join_service
from shared.join.invites import create_invite
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from shared.pki import Pki
from shared.tpm.policy_gen import local_policy
from shared.tpm.swtpm import Swtpm
from tests.framework.flow import events_of, eventually, job_book, running
from tests.framework.images import IMAGE, build_test_image
from tests.framework.stack import Stack, running_stack

pytestmark = [pytest.mark.nats, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
NODE = "hoster-1"

NODE_CLI = typer.Typer()
NODE_CLI.command("drain")(drain)
NODE_CLI.command("status")(status)


@dataclass
class Platform:
    """A running control plane (services in this process, joins over HTTPS) and one hoster's installed node."""

    tmp: Path
    stack: Stack
    admin: Bus
    market: Bus
    joins: JoinService
    host: Path
    paths: list[str]
    images: Path
    agent: subprocess.Popen[bytes] | None = None

    @property
    def state(self) -> Path:
        return self.host / "var/lib/qvm"

    async def install(self, swtpm: Swtpm) -> dict[str, str]:
        """The operator invites; the hoster runs install.sh with the token. The node's env file."""
        token, _ = await create_invite(await self.admin.kv(JOIN_INVITES), NODE, self.stack.pki.ca_der, 600)
        done = await asyncio.to_thread(
            subprocess.run, ["bash", str(ROOT / "deploy/install.sh"), "--no-apt", "--no-start", "--venv", str(VENV),
                             "--tpm", swtpm.tcti, "--control-plane", self.joins.url, *self.paths],
            env={**os.environ, "QVM_JOIN_TOKEN": str(token)}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert str(token) not in done.stdout + done.stderr, "the token is never echoed"
        return read_env(self.host / "etc/qvm/node.env")

    def start_agent(self, env: dict[str, str]) -> None:
        """The installed agent, as its unit would start it (the doctor is off: this machine has no KVM)."""
        self.agent = _start_agent({**os.environ, **env, "QVM_NODE_DOCTOR": "off", "QVM_IMAGES_DIR": str(self.images),
                                   "QVM_HEARTBEAT_INTERVAL_S": "0.3", "QVM_SWEEP_INTERVAL_S": "0.5"},
                                  self.host, self.tmp / "agent.log")

    async def submit(self, job_id: str, seconds: int, volume_mib: int = 0) -> None:
        await self.market.publish(JobSubmitted(owner="alice", image=IMAGE, command=("sleep", str(seconds)),
                                               max_runtime_s=300, profile=HardwareProfile(cpu_cores=1, ram_mib=256),
                                               volume_mib=volume_mib), job_id=job_id)

    async def agent_exit(self) -> int:
        assert self.agent is not None
        code = await asyncio.to_thread(self.agent.wait, 90)
        return int(code)

    def agent_log(self) -> str:
        return (self.tmp / "agent.log").read_text()[-3000:]


@contextlib.asynccontextmanager
async def platform(tmp_path: Path, swtpm: Swtpm, **overrides: object) -> AsyncIterator[Platform]:
    host = tmp_path / "host"  # the hoster's machine: its own file tree
    paths = ["--prefix", str(host / "opt/qvm"), "--etc", str(host / "etc/qvm"), "--state", str(host / "var/lib/qvm"),
             "--systemd-dir", str(host / "etc/systemd/system")]
    async with running_stack(tmp_path / "cp", nodes=()) as stack:
        admin = await stack.bus(Role.ADMIN)
        joins = await start_join_service(admin, stack.server, ek_ca=swtpm.state.ek_ca)
        # The platform's services, with trust required: the joined node's TPM must verify before it gets work.
        images = tmp_path / "images"  # the platform's signed images, as the host receives them
        build_test_image(images)
        policy = tmp_path / "policy.json"
        policy.write_text(local_policy(images, ek_ca=swtpm.state.ek_ca).model_dump_json())
        settings = stack.settings.model_copy(update={"min_trust": TrustState.TRUSTED, "attest_policy": policy,
                                                     "attest_interval_s": 3600.0, **overrides})
        create_kek_file(tmp_path / "kek.json", bytearray(b"test passphrase"))
        ring = PassphraseFileSource(tmp_path / "kek.json", bytearray(b"test passphrase")).load()
        kb_bus = await stack.bus(Role.KEY_BROKER)
        services = (await Scheduler.create(await stack.bus(Role.SCHEDULER), settings),
                    Janitor(await stack.bus(Role.JANITOR), settings),
                    await Verifier.create(await stack.bus(Role.ATTESTATION_VERIFIER), settings),
                    KeyBroker(kb_bus, settings, ring, await kb_bus.kv(KEYS)))
        p = Platform(tmp_path, stack, admin, await stack.bus(Role.MARKETPLACE), joins, host, paths, images)
        try:
            async with running(*services):
                yield p
        finally:
            if p.agent is not None and p.agent.poll() is None:
                p.agent.kill()
                p.agent.wait()
            joins.stop()


async def test_install_join_run_drain_uninstall(tmp_path: Path, swtpm: Swtpm) -> None:
    async with platform(tmp_path, swtpm) as p:
        env = await p.install(swtpm)
        assert env["QVM_NODE_ID"] == NODE and env["QVM_NATS_URL"] == p.stack.url
        unit = (p.host / "etc/systemd/system/qvm-node-agent.service").read_text()
        assert f"EnvironmentFile={p.host / 'etc/qvm/node.env'}" in unit
        keep = tmp_path / "stolen-pki"  # what someone holding the node's files would keep
        shutil.copytree(p.host / "etc/qvm/pki", keep)
        p.start_agent(env)

        # It attests and runs a job.
        await p.submit("job-1", 1)
        await eventually(lambda: _state(p.admin, "job-1", JobState.DONE), timeout=180, what="job-1 done")
        verified = [m async for b in p.admin.read(Domain.ATTESTATION, f"qvm.attestation.{NODE}.verified") for m in b]
        assert verified, "the joined node's TPM quote verified before it got work"
        attested = [m async for b in p.admin.read(Domain.JOBS, "qvm.jobs.job-1.instance.attested.>") for m in b]
        assert len(attested) == 1

        # Drained: empty, and its status says so.
        out = await asyncio.to_thread(CliRunner().invoke, NODE_CLI,
                                      ["drain", "--wait", "--timeout", "60", "--state-dir", str(p.state)])
        assert out.exit_code == 0, out.output
        shown = CliRunner().invoke(NODE_CLI, ["status", "--json", "--state-dir", str(p.state)])
        assert json.loads(shown.output)["draining"] is True

        # Uninstalled: files gone, the node withdrawn, its agent stops as withdrawn.
        gone = await asyncio.to_thread(
            subprocess.run, [str(VENV / "bin/python"), "-m", "shared.cli.node_install", "uninstall", *p.paths],
            capture_output=True, text=True, timeout=120)
        assert gone.returncode == 0, gone.stdout + gone.stderr
        assert not any((p.host / d).exists() for d in ("opt/qvm", "etc/qvm", "var/lib/qvm",
                                                       "etc/systemd/system/qvm-node-agent.service"))
        assert await p.agent_exit() == EXIT_WITHDRAWN, p.agent_log()
        revoked = [m async for b in p.admin.read(Domain.NODES, f"qvm.nodes.{NODE}.revoked") for m in b]
        assert len(revoked) == 1
        assert p.admin.codec.decode(revoked[0].subject, revoked[0].data).spec.type is EventType.NODE_REVOKED
        # The node's certificate (a copy kept before the uninstall) is refused by the bus.
        with pytest.raises(Unauthorized):
            await Bus.connect(p.stack.url, Pki(keep), Identity(Role.NODE_AGENT, NODE), connect_timeout=3)


async def test_revoking_a_node_with_a_running_job(tmp_path: Path, swtpm: Swtpm) -> None:
    """The operator revokes a node while its job runs: the node is cut off at once; its job fails
    (node_revoked) and its key is destroyed; the agent, refused by the bus, stops the micro VM itself and
    exits withdrawn; the janitor's teardown record says what the cut-off node could not report."""
    async with platform(tmp_path, swtpm, deadline_teardown_s=3.0) as p:
        p.start_agent(await p.install(swtpm))
        await p.submit("job-r", 120, volume_mib=16)  # an encrypted volume: a key the broker releases
        await eventually(lambda: _has(p.admin, "qvm.jobs.job-r.instance.running.>"), timeout=180,
                         what="job-r running")
        instances = p.state / "instances"
        assert any(instances.iterdir()), "the running instance has its directory"

        out = await asyncio.to_thread(CliRunner().invoke, node_app, ["revoke", NODE, "--control-plane", p.joins.url,
                                                                     "--detail", "test"],
                                      env={"QVM_PKI_DIR": str(p.stack.pki.root), "QVM_STATE_DIR": str(tmp_path)})
        assert out.exit_code == 0 and "withdrawn" in out.output, out.output

        assert await p.agent_exit() == EXIT_WITHDRAWN, p.agent_log()
        assert not any(instances.iterdir()), "the agent tore its instance down before exiting"
        assert str(instances) not in _processes(), "no VMM of the node left running"
        await eventually(lambda: _state(p.admin, "job-r", JobState.FAILED), timeout=30, what="job-r failed")
        failed = [e for e in await events_of(p.admin, subject="qvm.jobs.job-r.failed")]
        assert failed[0].payload.reason == "node_revoked"  # type: ignore[attr-defined]
        await eventually(lambda: _has(p.admin, "qvm.keys.job-r.destroyed", Domain.KEYS), timeout=30,
                         what="job-r's key destroyed")
        await eventually(lambda: _has(p.admin, "qvm.teardown.job-r.record", Domain.TEARDOWN), timeout=30,
                         what="job-r's teardown record")
        record = (await events_of(p.admin, Domain.TEARDOWN, "qvm.teardown.job-r.record"))[0].payload
        assert record.complete is False  # type: ignore[attr-defined]  # the node could not report its wipe


def _start_agent(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([str(VENV / "bin/python"), "-m", "services.node_agent"], env=env, cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=out)


def _processes() -> str:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout


def _has(admin: Bus, subject: str, domain: Domain = Domain.JOBS) -> Awaitable[bool]:
    async def check() -> bool:
        return bool([m async for b in admin.read(domain, subject) for m in b])
    return check()


def _state(admin: Bus, job: str, state: JobState) -> Awaitable[bool]:
    async def check() -> bool:
        book = await job_book(admin, strict=False)
        return job in book.jobs and book.jobs[job].state is state
    return check()
