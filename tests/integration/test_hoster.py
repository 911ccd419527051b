"""A hoster's whole path, as the README's "Become a hoster" section tells it, against a running control plane:
`deploy/install.sh --token` installs into a temp root and joins (swtpm as the host's TPM), the installed
node-agent runs a job in a QEMU micro VM, `qvm node drain --wait` empties it, `qvm node uninstall` removes
it and withdraws it: the agent stops with the "withdrawn" exit status, `node.revoked` is on the bus, and the
node's certificate no longer opens the bus."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from services.attestation_verifier.service import Verifier
from services.janitor.service import Janitor
from services.key_broker.service import KeyBroker
from services.scheduler.service import Scheduler
from shared.buckets import JOIN_INVITES, KEYS
from shared.bus import Bus
from shared.cli.node_ops import drain, status
from shared.crypto.kek import PassphraseFileSource, create_kek_file
from shared.errors import EXIT_WITHDRAWN, Unauthorized
from shared.events import Domain, EventType, JobSubmitted
from shared.identity import Identity, Role
from shared.join.client import read_env
from shared.join.controlplane import start_join_service
from shared.join.invites import create_invite
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from shared.pki import Pki
from shared.tpm.policy_gen import local_policy
from shared.tpm.swtpm import Swtpm
from tests.framework.flow import eventually, job_book, running
from tests.framework.images import IMAGE, build_test_image
from tests.framework.stack import running_stack

pytestmark = [pytest.mark.nats, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
NODE = "hoster-1"

NODE_CLI = typer.Typer()
NODE_CLI.command("drain")(drain)
NODE_CLI.command("status")(status)


async def test_install_join_run_drain_uninstall(tmp_path: Path, swtpm: Swtpm) -> None:
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
                                                     "attest_interval_s": 3600.0})
        create_kek_file(tmp_path / "kek.json", bytearray(b"test passphrase"))
        ring = PassphraseFileSource(tmp_path / "kek.json", bytearray(b"test passphrase")).load()
        kb_bus = await stack.bus(Role.KEY_BROKER)
        services = (await Scheduler.create(await stack.bus(Role.SCHEDULER), settings),
                    Janitor(await stack.bus(Role.JANITOR), settings),
                    await Verifier.create(await stack.bus(Role.ATTESTATION_VERIFIER), settings),
                    KeyBroker(kb_bus, settings, ring, await kb_bus.kv(KEYS)))
        market = await stack.bus(Role.MARKETPLACE)
        agent: subprocess.Popen[bytes] | None = None
        try:
            async with running(*services):
                # The operator invites; the hoster installs with the token.
                ca_der = x509.load_pem_x509_certificate(stack.pki.ca_cert.read_bytes()).public_bytes(
                    serialization.Encoding.DER)
                token, _ = await create_invite(await admin.kv(JOIN_INVITES), NODE, ca_der, 600)
                done = await asyncio.to_thread(
                    subprocess.run, ["bash", str(ROOT / "deploy/install.sh"), "--no-apt", "--no-start", "--venv",
                                     str(VENV), "--tpm", swtpm.tcti, "--control-plane", joins.url, *paths],
                    env={**os.environ, "QVM_JOIN_TOKEN": str(token)}, capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, done.stdout + done.stderr
                assert str(token) not in done.stdout + done.stderr, "the token is never echoed"
                env = read_env(host / "etc/qvm/node.env")
                assert env["QVM_NODE_ID"] == NODE and env["QVM_NATS_URL"] == stack.url
                unit = (host / "etc/systemd/system/qvm-node-agent.service").read_text()
                assert f"EnvironmentFile={host / 'etc/qvm/node.env'}" in unit
                keep = tmp_path / "stolen-pki"  # what someone holding the node's files would keep
                shutil.copytree(host / "etc/qvm/pki", keep)

                # The installed agent, as its unit would start it (the doctor is off: this machine has no KVM).
                agent_env = {**os.environ, **env, "QVM_NODE_DOCTOR": "off", "QVM_IMAGES_DIR": str(images),
                             "QVM_HEARTBEAT_INTERVAL_S": "0.3", "QVM_SWEEP_INTERVAL_S": "0.5"}
                agent = _start_agent(agent_env, host, tmp_path / "agent.log")

                # It runs a job.
                await market.publish(JobSubmitted(owner="alice", image=IMAGE, command=("sleep", "1"),
                                                  max_runtime_s=300, profile=HardwareProfile(cpu_cores=1, ram_mib=256)),
                                     job_id="job-1")
                await eventually(lambda: _state(admin, "job-1", JobState.DONE), timeout=180, what="job-1 done")
                verified = [m async for b in admin.read(Domain.ATTESTATION, f"qvm.attestation.{NODE}.verified")
                            for m in b]
                assert verified, "the joined node's TPM quote verified before it got work"
                attested = [m async for b in admin.read(Domain.JOBS, "qvm.jobs.job-1.instance.attested.>") for m in b]
                assert len(attested) == 1

                # Drained: empty, and the scheduler knows it.
                out = await asyncio.to_thread(CliRunner().invoke, NODE_CLI,
                                              ["drain", "--wait", "--timeout", "60", "--state-dir",
                                               str(host / "var/lib/qvm")])
                assert out.exit_code == 0, out.output
                shown = CliRunner().invoke(NODE_CLI, ["status", "--json", "--state-dir", str(host / "var/lib/qvm")])
                assert '"draining": true' in shown.output.replace(" ", "").replace('":true', '": true')

                # Uninstalled: files gone, the node withdrawn, its agent stops as withdrawn.
                gone = await asyncio.to_thread(
                    subprocess.run, [str(VENV / "bin/python"), "-m", "shared.cli.node_install", "uninstall", *paths],
                    capture_output=True, text=True, timeout=120)
                assert gone.returncode == 0, gone.stdout + gone.stderr
                assert not any((host / p).exists() for p in ("opt/qvm", "etc/qvm", "var/lib/qvm",
                                                              "etc/systemd/system/qvm-node-agent.service"))
                code = await asyncio.to_thread(agent.wait, 60)
                assert code == EXIT_WITHDRAWN, (tmp_path / "agent.log").read_text()[-3000:]
                revoked = [m async for b in admin.read(Domain.NODES, f"qvm.nodes.{NODE}.revoked") for m in b]
                assert len(revoked) == 1
                assert admin.codec.decode(revoked[0].subject, revoked[0].data).spec.type is EventType.NODE_REVOKED
            # The node's certificate (a copy kept before the uninstall) is refused by the bus.
            with pytest.raises(Unauthorized):
                await Bus.connect(stack.url, Pki(keep), Identity(Role.NODE_AGENT, NODE), connect_timeout=3)
        finally:
            if agent is not None and agent.poll() is None:
                agent.kill()
                agent.wait()
            joins.stop()


def _start_agent(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([str(VENV / "bin/python"), "-m", "services.node_agent"], env=env, cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=out)


def _state(admin: Bus, job: str, state: JobState) -> Awaitable[bool]:
    async def check() -> bool:
        book = await job_book(admin, strict=False)
        return job in book.jobs and book.jobs[job].state is state
    return check()
