"""`make demo`: the embedded stack end to end, narrated.

1. PKI and nats-server with mutual TLS; streams provisioned.
2. A TPM for this host (swtpm with a local-CA EK certificate; /dev/tpmrm0 via QVM_TPM on real hosts);
   scheduler, janitor, attestation-verifier, key-broker and this host's node-agent as supervised processes.
3. The node registers with its real inventory and enrolls its TPM: EK certificate checked, AK bound to
   the EK by credential activation, first quote verified; only then is it `trusted` (the scheduler's
   default minimum).
4. A confidential job is submitted as the marketplace, placed on this node and accepted by its
   node-agent, which verifies the signed image, measures the launch into the TPM and boots a QEMU microvm
   (KVM where it works, TCG otherwise). After the verifier checked a quote bound to the instance's key,
   the key-broker releases the job's volume key sealed to that key, and the guest formats and opens its
   LUKS2 volume; the client gathers the evidence itself, checks it with the verifier's code, shows what
   it verified and only then seals its secret to the instance. The workload reads both and prints their
   digest; its output reaches the bus only sealed to a key the client made for the job, and the client opens
   and verifies it. The keys are destroyed and the volume erased at the end, with evidence.
   Then the same job as a confidential VM (SEV-SNP / TDX): placed only on a host that proved it can start
   one; on a host that cannot (most of them), it stays pending with `no_confidential_host` and is cancelled.
5. The janitor's teardown record (guest RAM scrubbed and verified, volume erased, keys destroyed), then
   `qvm audit replay`: every signature and transition, a complete record per finished job, no key that
   outlived its job; then the stack stops.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import x25519
from rich.console import Console
from rich.table import Table

from shared.audit import AuditWorkers, audit_replay
from shared.buckets import NODES
from shared.bus import Bus
from shared.cli.client import image_digest, show_output, show_verified
from shared.cli.common import local_node_id
from shared.cli.render import summarize
from shared.cli.stack import LocalStack
from shared.client.output import new_output_key, with_output_key
from shared.client.sdk import ConfidentialClient
from shared.codec import Event
from shared.config import StackSettings
from shared.errors import QvmError
from shared.events import (
    CATALOGUE,
    AttestationFailed,
    AttestationResult,
    Domain,
    EventType,
    InstanceAttested,
    InstanceBooted,
    InstanceDestroyed,
    InstanceSuspicious,
    JobCancelRequested,
    JobPending,
    JobSubmitted,
    KeyReleased,
    KeyReleaseRefused,
    KeysDestroyed,
    SecretsReleased,
    TeardownRecord,
    scope_filter,
    subject_filter,
    subject_for,
)
from shared.identity import Identity, Role
from shared.image.demo import ensure_demo_image
from shared.jobspec import load_job
from shared.lifecycle import JobState
from shared.models import SecurityLevel, TrustState
from shared.registry import NodeRecord
from shared.replay import fold_jobs

__all__ = ["run_demo"]


async def run_demo(state_dir: Path, job_file: Path, console: Console, kernel: str = "minimal") -> int:
    await asyncio.to_thread(shutil.rmtree, state_dir, True)  # a fresh demo every time
    settings = StackSettings(state_dir=state_dir)

    node_id = settings.node_id or local_node_id()
    stack = LocalStack(settings, node_id, TrustState.TRUSTED)
    with console.status(f"preparing the signed demo image ({kernel} guest kernel; qvm's minimal one is built "
                        "once, in minutes, then cached)"):
        bundle = await asyncio.to_thread(ensure_demo_image, settings.images_path, kernel_flavor=kernel)
    console.print(f"0. signed demo image ready: {bundle} ({kernel} guest kernel)")
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
                          f"VMMs {inv['vmms'] or 'none'}, trust {rec['trust']}; TPM {stack.tcti}; runtime guard "
                          f"{inv.get('runtime_guard') or 'none'}")
            enrolled = await _wait_enrolled(admin, node_id, 60)
            console.print(f"   enrolled: AK {enrolled.ak_name[:20]}… bound to EK {enrolled.ek_sha256[:16]}… "
                          f"(EK certificate checked, credential activated), agent code "
                          f"{enrolled.agent_sha256[:16]}… approved, PCR {settings.measurement_pcr} = "
                          f"{enrolled.pcr_sha256[:16]}…, TPM resets {enrolled.reset_count}")
            await _wait_trusted(admin, node_id, 30)
            console.print("   node trust: [green]trusted[/green] (scheduler places only on trusted nodes)")
            job_id, job = load_job(job_file)
            job_id = f"{job_id}-{int(time.time())}"
            output_key: x25519.X25519PrivateKey | None = None
            if job.output_key is None:  # the client's own key for the output, in its memory only
                output_key = new_output_key()
                job = with_output_key(job, output_key)
            client = ConfidentialClient(market, settings.measurement_pcr)
            await client.submit(job, job_id)
            console.print(f"4. submitted job [bold]{job_id}[/bold] as the marketplace ({job_file})"
                          + (f"; encrypted volume {job.volume_mib} MiB" if job.volume_mib else "")
                          + ("; the client holds a secret" if job.client_secrets else "")
                          + f"; output sealed to the client's key {(job.output_key or '')[:16]}…")
            if job.client_secrets:
                verified = await client.verify(job_id, expected_images=[image_digest(bundle)], timeout_s=240)
                console.print("   the client gathered the instance's evidence from the bus and checked it itself:")
                show_verified(verified, console)
                await client.release_secrets(verified, DEMO_SECRETS)
                console.print(f"   client secret released: HPKE-sealed to instance key "
                              f"{verified.public_key.hex()[:16]}… (the key-broker cannot open it)")
            state, output_ok = await _wait_job(admin, job_id, output_key, console, 240)
            if job.volume_mib or job.client_secrets:
                _show_keys(await _key_events(admin, job_id), console)
            record = await _teardown_record(admin, job_id, 60)
            _show_record(record, console)
            attested = await _instance_verdict(admin, job_id)
            if attested is not None:
                console.print(f"   instance quote verified before the workload ran: image "
                              f"{attested.image_manifest_sha256[:16]}…, VMM {attested.vmm_sha256[:16]}…, instance "
                              f"key {attested.public_key[:16]}… bound into the quote's extraData")
            if state is not JobState.DONE or attested is None:
                console.print(f"[red]job ended in {state}, expected done[/red]")
                return 1
            if not output_ok:
                return 1
            if not await _confidential_vm_job(admin, client, job, inv.get("confidential") or [], console):
                return 1
            findings = await _guard_findings(admin)
            if inv.get("runtime_guard"):
                console.print(f"   runtime guard ({inv['runtime_guard']}): {len(findings)} finding(s) over the demo"
                              + ("" if not findings else ": " + ", ".join(findings)))
                if findings:  # a normal job must not look suspicious
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


DEMO_SECRETS = {"api-token": b"demo-token: only the attested instance can read this\n"}


async def _key_events(admin: Bus, job_id: str) -> list[Event]:
    events: list[Event] = []
    for domain, subject in ((Domain.KEYS, scope_filter(Domain.KEYS, job_id)),
                            (Domain.JOBS, subject_filter(CATALOGUE[EventType.INSTANCE_DESTROYED], job_id=job_id))):
        async for batch in admin.read(domain, subject):
            events += [admin.codec.decode(m.subject, m.data) for m in batch]
    return events


def _show_keys(events: list[Event], console: Console) -> None:
    """Key release and destruction, and the volume's erasure: the evidence, never key material."""
    for ev in events:
        p = ev.payload
        if isinstance(p, KeyReleased):
            console.print(f"   key.released: volume key (KEK v{p.kek_version}) sealed with {p.suite} to instance "
                          f"{p.instance_id}, on attestation result {p.result_id[:13]}…")
        elif isinstance(p, KeyReleaseRefused):
            console.print(f"   [red]key.release_refused[/red]: {p.reason}: {p.detail}")
        elif isinstance(p, SecretsReleased):
            console.print(f"   key.secrets_released: by the client after checking result "
                          f"{p.verified.result_id[:13]}… (image {p.verified.image_manifest_sha256[:16]}…)")
        elif isinstance(p, KeysDestroyed) and p.volume is not None:
            v = p.volume
            console.print(f"   key.destroyed ({p.reason}): wrapped copy {v.wrapped_sha256[:16]}… erased "
                          f"({v.revisions_erased} store revision(s) overwritten, tombstone at revision "
                          f"{v.store_revision}), {v.plaintext_buffers_zeroed} plaintext buffers overwritten, "
                          f"held by {v.released_to or 'nobody'}")
        elif isinstance(p, InstanceDestroyed) and p.volume is not None:
            v2 = p.volume
            console.print(f"   volume erased on the node: LUKS header found {v2.luks_header_found}, "
                          f"cryptsetup erase {v2.luks_erase}, {v2.overwritten_bytes} header bytes overwritten, "
                          f"verified zero {v2.verified_zero}, file removed {v2.removed}")


async def _teardown_record(admin: Bus, job_id: str, seconds: float) -> TeardownRecord:
    deadline = time.monotonic() + seconds
    record = subject_for(CATALOGUE[EventType.TEARDOWN_RECORD], job_id=job_id)
    while time.monotonic() < deadline:
        async for batch in admin.read(Domain.TEARDOWN, record):
            for m in batch:
                ev = admin.codec.decode(m.subject, m.data)
                if isinstance(ev.payload, TeardownRecord):
                    return ev.payload
        await asyncio.sleep(0.3)
    raise QvmError(f"no teardown record for {job_id} within {seconds:g}s (see the janitor log)")


def _show_record(rec: TeardownRecord, console: Console) -> None:
    """The signed end of the job: every wipe, its method, bytes and verification."""
    table = Table(title=f"teardown record (janitor): {rec.outcome}, "
                        + ("[green]complete[/green]" if rec.complete else "[red]INCOMPLETE[/red]")
                        + f", instance destroyed {rec.duration_ms:g} ms after the job ended")
    for col in ("step", "status", "evidence"):
        table.add_column(col)
    for st in rec.steps:
        table.add_row(st.name, st.status, st.detail)
    console.print(table)


async def _wait_node(admin: Bus, node_id: str, seconds: float) -> dict[str, Any]:
    kv = await admin.kv(NODES)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rec, _, _ = await kv.get(node_id, NodeRecord)
        if rec is not None:
            return rec.model_dump(mode="json")
        await asyncio.sleep(0.2)  # not registered yet
    raise QvmError(f"node {node_id} did not register within {seconds:g}s (see the node-agent log)")


async def _wait_enrolled(admin: Bus, node_id: str, seconds: float) -> AttestationResult:
    deadline = time.monotonic() + seconds
    subject = subject_for(CATALOGUE[EventType.ATTEST_VERIFIED], node_id=node_id)
    failed = subject_for(CATALOGUE[EventType.ATTEST_FAILED], node_id=node_id)
    while time.monotonic() < deadline:
        async for batch in admin.read(Domain.ATTESTATION, scope_filter(Domain.ATTESTATION, node_id)):
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


async def _guard_findings(admin: Bus) -> list[str]:
    """Every runtime-guard finding on the bus (instance.suspicious, any job)."""
    out = []
    async for batch in admin.read(Domain.JOBS, subject_filter(CATALOGUE[EventType.INSTANCE_SUSPICIOUS])):
        for m in batch:
            ev = admin.codec.decode(m.subject, m.data)
            if isinstance(ev.payload, InstanceSuspicious):
                out.append(f"{ev.payload.rule} by {ev.payload.comm} ({ev.job_id})")
    return out


async def _confidential_vm_job(admin: Bus, client: ConfidentialClient, job: JobSubmitted, features: list[str],
                               console: Console) -> bool:
    """The same job at the second protection level (a confidential VM): placed only on a host that proved
    SEV-SNP or TDX, its key released only on the guest's verified hardware report. A host without either (this
    one, most likely) never gets it: the scheduler keeps it pending, and the demo cancels it."""
    job_id = f"cvm-{int(time.time())}"
    await client.submit(job.model_copy(update={"security": SecurityLevel.CONFIDENTIAL, "client_secrets": False}),
                        job_id)
    if features:
        console.print(f"   4b. submitted [bold]{job_id}[/bold] as a confidential VM: this host offers "
                      f"{', '.join(features)}")
        state, _ = await _wait_job(admin, job_id, None, console, 300)
        attested = await _instance_verdict(admin, job_id)
        ok = state is JobState.DONE and attested is not None and attested.cvm is not None
        if attested is not None and attested.cvm is not None:
            console.print(f"   {attested.cvm} report verified: measurement {attested.cvm_measurement[:16]}…, "
                          f"TCB {attested.cvm_tcb}")
        return ok
    deadline = time.monotonic() + 30
    pending: JobPending | None = None
    while pending is None and time.monotonic() < deadline:
        _, events = await fold_jobs(admin.js, admin.codec, scope_filter(Domain.JOBS, job_id))
        pending = next((e.payload for e in events if isinstance(e.payload, JobPending)), None)
        await asyncio.sleep(0.3)
    if pending is None or pending.reason != "no_confidential_host":
        console.print(f"[red]confidential job {job_id}: expected pending (no_confidential_host), got {pending}[/red]")
        return False
    console.print(f"   4b. the same job as a confidential VM ([bold]{job_id}[/bold]): [yellow]pending[/yellow], "
                  f"{pending.reason} (this host has no SEV-SNP or TDX: `qvm node doctor` says which layer is "
                  "missing); its key would be released only on a verified hardware report. Cancelled.")
    await client.bus.publish(JobCancelRequested(reason="demo: no confidential host"), job_id=job_id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = (await fold_jobs(admin.js, admin.codec, scope_filter(Domain.JOBS, job_id)))[0].get(job_id)
        if view is not None and view.terminal:
            await _teardown_record(admin, job_id, 60)  # the janitor's record, even for a job that never ran
            return True
        await asyncio.sleep(0.3)
    console.print(f"[red]confidential job {job_id} was not cancelled[/red]")
    return False


async def _instance_verdict(admin: Bus, job_id: str) -> InstanceAttested | None:
    async for batch in admin.read(Domain.JOBS, subject_filter(CATALOGUE[EventType.INSTANCE_ATTESTED], job_id=job_id)):
        for m in batch:
            ev = admin.codec.decode(m.subject, m.data)
            if isinstance(ev.payload, InstanceAttested):
                return ev.payload
    return None


def _show_boot(events: list[Event], console: Console) -> None:
    """The instance's boot, stage by stage, as its node-agent measured it (instance.booted)."""
    booted = next((e.payload for e in events if isinstance(e.payload, InstanceBooted)), None)
    if booted is None:
        return
    console.print(f"   boot to READY: {booted.boot_ms:,.0f} ms ({booted.accel}, kernel {booted.kernel or 'unknown'}"
                  f"{', warm pool' if booted.warm else ''})")
    stages = booted.breakdown.model_dump() if booted.breakdown is not None else {}
    if stages:
        console.print("     " + ", ".join(f"{name.removesuffix('_ms')} {ms:,.0f}" for name, ms in stages.items()
                                          if ms >= 0.5) + " (ms)")


async def _wait_job(admin: Bus, job_id: str, output_key: x25519.X25519PrivateKey | None, console: Console,
                    seconds: float) -> tuple[JobState | None, bool]:
    """The job's end state, and whether its output opened and verified with the client's key."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        book, events = await fold_jobs(admin.js, admin.codec, scope_filter(Domain.JOBS, job_id))
        view = book.get(job_id)
        if view and view.terminal:
            table = Table(title=f"job {job_id}")
            for col in ("event", "producer", "details"):
                table.add_column(col)
            for ev in events:
                table.add_row(str(ev.spec.type), ev.envelope.producer, summarize(ev.payload, 110))
            console.print(table)
            console.print(f"   job state: [bold]{view.state}[/bold] on node {view.node_id}; exit code {view.exit_code}")
            _show_boot(events, console)
            console.print("   output from the guest (on the bus only sealed; opened by the client with its key):")
            ok = show_output(events, job_id, output_key, console, prefix="     | ", indent="   ")
            return view.state, ok
        await asyncio.sleep(0.3)
    return None, False
