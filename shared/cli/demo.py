"""`make demo`: the embedded stack end to end, narrated.

1. PKI and nats-server with mutual TLS; streams provisioned.
2. A TPM for this host (swtpm with a local-CA EK certificate; /dev/tpmrm0 via QVM_TPM on real hosts);
   scheduler, janitor, attestation-verifier and this host's node-agent as supervised processes.
3. The node registers with its real inventory and enrolls its TPM: EK certificate checked, AK bound to
   the EK by credential activation, first quote verified; only then is it `trusted` (the scheduler's
   default minimum).
4. A job is submitted as the marketplace, placed on this node and accepted by its node-agent, which
   verifies the signed image, measures the launch into the TPM, boots a QEMU microvm (KVM where it works,
   TCG otherwise), and runs the workload only after the verifier checked a quote bound to the
   instance's key; the output comes back on the bus.
5. `qvm audit replay`: every signature and transition checked; then the stack stops.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from pathlib import Path
from typing import Any

import msgpack
from nats.js.errors import NotFoundError
from rich.console import Console
from rich.table import Table

from shared.audit import AuditWorkers, audit_replay
from shared.bus import Bus
from shared.cli.render import summarize
from shared.cli.stack import LocalStack
from shared.config import Settings
from shared.errors import QvmError
from shared.events import (
    CATALOGUE,
    STREAMS,
    AttestationFailed,
    AttestationResult,
    Domain,
    EventType,
    InstanceAttested,
    InstanceOutput,
    subject_for,
)
from shared.identity import Identity, Role
from shared.image.demo import ensure_demo_image
from shared.jobspec import load_job
from shared.lifecycle import JobState
from shared.models import TrustState
from shared.replay import fold_jobs, read_stream

__all__ = ["run_demo"]


async def run_demo(state_dir: Path, job_file: Path, console: Console) -> int:
    await asyncio.to_thread(shutil.rmtree, state_dir, True)  # a fresh demo every time
    settings = Settings(state_dir=state_dir, heartbeat_interval_s=2.0)
    from shared.cli.main import local_node_id

    node_id = settings.node_id or local_node_id()
    stack = LocalStack(settings, node_id, TrustState.TRUSTED)
    with console.status("preparing the signed demo image (kernel from the distribution package)"):
        bundle = await asyncio.to_thread(ensure_demo_image, settings.images_path)
    console.print(f"0. signed demo image ready: {bundle}")
    console.rule("[bold]qvm demo")
    try:
        url = await stack.start()
        console.print(f"1. nats-server up at {url} (mutual TLS, per-identity permissions, JetStream)")
        console.print(f"2. services started: {', '.join(stack.services)} (logs: {state_dir / 'logs'})")
        admin = await Bus.connect(url, stack.pki, Identity(Role.ADMIN))
        market = await Bus.connect(url, stack.pki, Identity(Role.MARKETPLACE))
        try:
            rec = await _wait_node(admin, node_id, 30)
            inv = rec["inventory"]
            console.print(f"3. node [bold]{node_id}[/bold] registered: {inv['cpu_cores']} cores "
                          f"({inv['cpu_model']}), {inv['ram_mib']} MiB RAM, {len(inv['gpus'])} GPU(s), "
                          f"VMMs {inv['vmms'] or 'none'}, trust {rec['trust']}; TPM {stack.tcti}")
            enrolled = await _wait_enrolled(admin, node_id, 60)
            console.print(f"   enrolled: AK {enrolled.ak_name[:20]}… bound to EK {enrolled.ek_sha256[:16]}… "
                          f"(EK certificate checked, credential activated), agent code "
                          f"{enrolled.agent_sha256[:16]}… approved, PCR {settings.measurement_pcr} = "
                          f"{enrolled.pcr_sha256[:16]}…, TPM resets {enrolled.reset_count}")
            await _wait_trusted(admin, node_id, 30)
            console.print("   node trust: [green]trusted[/green] (scheduler places only on trusted nodes)")
            job_id, job = load_job(job_file)
            job_id = f"{job_id}-{int(time.time())}"
            await market.publish(job, job_id=job_id)
            console.print(f"4. submitted job [bold]{job_id}[/bold] as the marketplace ({job_file})")
            state = await _wait_job(admin, job_id, console, 240)
            attested = await _instance_verdict(admin, job_id)
            if attested is not None:
                console.print(f"   instance quote verified before the workload ran: image "
                              f"{attested.image_manifest_sha256[:16]}…, VMM {attested.vmm_sha256[:16]}…, instance "
                              f"key {attested.public_key[:16]}… bound into the quote's extraData")
            if state is not JobState.DONE or attested is None:
                console.print(f"[red]job ended in {state}, expected done[/red]")
                return 1
            verifier = AuditWorkers(stack.pki.trust_bundle.read_bytes(), stack.pki.ca_cert.read_bytes())
            try:
                report = await audit_replay(admin.js, verifier)
            finally:
                verifier.close()
            console.print(f"5. audit replay: {report.events} events, signatures and transitions checked: "
                          + ("[green]clean[/green]" if report.ok else f"[red]{report.violations}[/red]"))
            if not report.ok:
                return 1
        finally:
            await admin.close()
            await market.close()
    finally:
        await asyncio.to_thread(stack.stop)
        console.print("6. stack stopped")
    console.rule("[green]demo ok")
    return 0


async def _wait_node(admin: Bus, node_id: str, seconds: float) -> dict[str, Any]:
    kv = await admin.js.key_value("qvm_nodes")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            entry = await kv.get(node_id)
            if entry.value:
                rec: dict[str, Any] = msgpack.unpackb(entry.value, raw=False)
                return rec
        except NotFoundError:  # not registered yet
            pass
        await asyncio.sleep(0.2)
    raise QvmError(f"node {node_id} did not register within {seconds:g}s (see the node-agent log)")


async def _wait_enrolled(admin: Bus, node_id: str, seconds: float) -> AttestationResult:
    deadline = time.monotonic() + seconds
    subject = subject_for(CATALOGUE[EventType.ATTEST_VERIFIED], node_id=node_id)
    failed = subject_for(CATALOGUE[EventType.ATTEST_FAILED], node_id=node_id)
    while time.monotonic() < deadline:
        async for batch in read_stream(admin.js, STREAMS[Domain.ATTESTATION].name, f"qvm.attestation.{node_id}.>"):
            for m in batch:
                ev = admin.codec.decode(m.subject, m.data)
                if m.subject == subject and isinstance(ev.payload, AttestationResult):
                    return ev.payload
                if m.subject == failed and isinstance(ev.payload, AttestationFailed):
                    raise QvmError(f"enrollment failed: {ev.payload.reason}: {ev.payload.detail}")
        await asyncio.sleep(0.3)
    raise QvmError(f"node {node_id} did not enroll within {seconds:g}s (see the verifier and node-agent logs)")


async def _wait_trusted(admin: Bus, node_id: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (await _wait_node(admin, node_id, seconds))["trust"] == TrustState.TRUSTED.value:
            return
        await asyncio.sleep(0.2)
    raise QvmError(f"node {node_id} was not trusted within {seconds:g}s")


async def _instance_verdict(admin: Bus, job_id: str) -> InstanceAttested | None:
    async for batch in read_stream(admin.js, STREAMS[Domain.JOBS].name, f"qvm.jobs.{job_id}.instance.attested.*"):
        for m in batch:
            ev = admin.codec.decode(m.subject, m.data)
            if isinstance(ev.payload, InstanceAttested):
                return ev.payload
    return None


async def _wait_job(admin: Bus, job_id: str, console: Console, seconds: float) -> JobState | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        book, events = await fold_jobs(admin.js, admin.codec, f"qvm.jobs.{job_id}.>")
        view = book.get(job_id)
        if view and view.terminal:
            table = Table(title=f"job {job_id}")
            for col in ("event", "producer", "details"):
                table.add_column(col)
            for ev in events:
                table.add_row(str(ev.spec.type), ev.envelope.producer, summarize(ev.payload, 110))
            console.print(table)
            console.print(f"   job state: [bold]{view.state}[/bold] on node {view.node_id}; exit code {view.exit_code}")
            console.print("   output from the guest:")
            output = b"".join(base64.b64decode(ev.payload.data_b64) for ev in events
                              if isinstance(ev.payload, InstanceOutput))
            for line in output.decode(errors="replace").splitlines():
                console.print(f"     | {line}", markup=False, highlight=False)
            return view.state
        await asyncio.sleep(0.3)
    return None
