"""Runs accepted jobs in micro VMs on this node and reports every step as an event.

    accepted -> instance.provisioning (image verified, VM starting, instance public key)
             -> instance.booted (boot time) -> instance.running
             -> instance.output* (each chunk sealed to the client's output key) -> instance.exited
             -> instance.destroyed (what was removed)
    any failure -> instance.failed (reason) -> instance.destroyed

Event ids derive from the assignment, so a redelivered assignment or a restarted step publishes once.
Each instance keeps `instance.json` (ids only, no secrets) in its work directory; after an agent crash
`reclaim()` kills the instance's VMM (found by pid file and verified by its command line), removes the
directory and reports the instance destroyed, so nothing leaks across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.node_agent.attest.gate import InstanceGate
from services.node_agent.instance import Instance, InstanceError, InstanceSpec
from services.node_agent.isolation.cgroups import leftover_cgroups
from services.node_agent.isolation.gpus import GpuPassthrough
from services.node_agent.isolation.network import (
    PREFIX,
    InstanceNetwork,
    NetworkError,
    leftover_namespaces,
    parse_egress,
)
from services.node_agent.isolation.vfio import Binding, VfioError
from services.node_agent.keys import KeyError_, KeyInbox
from services.node_agent.teardown.ram import scrub_memfd
from services.node_agent.vmm.base import Vmm
from services.node_agent.volume import VOLUME_FILE, erase_volume
from shared.bus import Bus
from shared.client.bundle import BundleError, unpack_bundle
from shared.codec import Event
from shared.config import Settings
from shared.crypto import hpke
from shared.crypto.errors import CryptoError
from shared.crypto.output import SealedDigest, seal_chunk
from shared.crypto.secret import zeroize
from shared.events import (
    OUTPUT_CHUNK_BYTES,
    InstanceBooted,
    InstanceDestroyed,
    InstanceExited,
    InstanceFailed,
    InstanceOutput,
    InstanceProvisioning,
    InstanceRunning,
    JobPlaced,
    JobSubmitted,
    NodeSwept,
)
from shared.ids import derive_event_id
from shared.image.manifest import ImageError, load_public_keys
from shared.models import Frozen, MemoryScrub, VramScrub
from shared.telemetry import current_job, get_logger

__all__ = ["InstanceRuntime", "run_workload"]

log = get_logger("qvm.node_agent.runtime")
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OUTPUT_CHUNK = OUTPUT_CHUNK_BYTES
OUTPUT_FLUSH_S = 0.5
OUTPUT_PUBLISHED_MAX = 1 << 20  # beyond this only the digest and byte count are reported


class OutputStreamer:
    """Publishes workload output while it runs: a chunk at 64 KiB, or every half second of quiet. `emit`
    seals each chunk to the client's output key before it reaches the bus (no key: no streamer at all)."""

    def __init__(self, emit: Callable[[int, bytes], Awaitable[None]]) -> None:
        self._emit = emit
        self._buf = bytearray()
        self._seq = 0
        self._published = 0
        self._lock = asyncio.Lock()

    async def add(self, chunk: bytes) -> None:
        room = OUTPUT_PUBLISHED_MAX - self._published - len(self._buf)
        if room > 0:
            self._buf += chunk[:room]
        if len(self._buf) >= OUTPUT_CHUNK:
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            while self._buf:
                chunk = bytes(self._buf[:OUTPUT_CHUNK])
                del self._buf[:OUTPUT_CHUNK]
                await self._emit(self._seq, chunk)
                self._seq += 1
                self._published += len(chunk)

    async def flush_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.flush()


async def run_workload(instance: Instance, job_id: str, output_key: str | None,
                       publish: Callable[[InstanceOutput], Awaitable[None]]) -> InstanceExited:
    """Run the job's workload in its instance and report how it ended.

    With the client's `output_key` (hex X25519) the output is sealed chunk by chunk while it runs, each
    chunk on its own with `info` binding job, instance and seq (`shared.crypto.output`), and handed to
    `publish`; the plaintext never leaves this function except into the seal. Without one nothing is
    published. The report counts every byte and carries the digest of the sealed chunks as published, never
    one of the plaintext.
    """
    instance_id = instance.spec.instance_id
    client_key = bytes.fromhex(output_key) if output_key else None
    digest = SealedDigest()

    async def emit_chunk(seq: int, chunk: bytes) -> None:
        assert client_key is not None
        try:
            sealed = seal_chunk(chunk, client_key, job_id, instance_id, seq)
        except CryptoError as exc:
            raise InstanceError("output_seal_failed", f"{exc.reason}: {exc.detail}") from None
        await publish(InstanceOutput(instance_id=instance_id, seq=seq, suite=hpke.SUITE_NAME, sealed=sealed.hex()))
        digest.update(sealed)

    if client_key is None:  # no key to seal to: the output is counted, never published
        out = await instance.run()
    else:
        streamer = OutputStreamer(emit_chunk)
        flusher = asyncio.create_task(streamer.flush_every(OUTPUT_FLUSH_S))
        try:
            out = await instance.run(streamer.add)
        finally:
            flusher.cancel()
            await streamer.flush()
    return InstanceExited(instance_id=instance_id, exit_code=out.exit_code, runtime_ms=round(instance.runtime_ms, 1),
                          output_sha256=digest.hexdigest(), output_bytes=out.total_bytes, output_chunks=digest.chunks,
                          output_truncated=client_key is not None and out.truncated)


@dataclass
class _Running:
    task: asyncio.Task[None]
    instance_id: str
    instance: Instance | None = None
    bindings: list[Binding] = field(default_factory=list)  # the job's GPUs on vfio-pci while it runs
    cleaning: bool = False  # in its teardown: a stop request waits for it instead of cancelling it


class InstanceRuntime:
    def __init__(self, bus: Bus, settings: Settings, vmm: Vmm,
                 on_destroyed: Callable[[str], None] | None = None, gate: InstanceGate | None = None,
                 gpus: GpuPassthrough | None = None) -> None:
        """With `gate` (a node with a TPM) every instance is measured before launch and its workload waits
        for a verified quote; without one, instances run unattested (only on unverified nodes). `gpus`
        hands a job's claimed GPUs to its VM (VFIO) and scrubs them afterwards."""
        self.gpus = gpus
        self.on_destroyed = on_destroyed
        self.gate = gate
        self.bus = bus
        self.settings = settings
        self.vmm = vmm
        self.node_id = bus.identity.node_id or ""
        self.work = settings.instances_path
        self.jobs: dict[str, _Running] = {}
        self.keys = KeyInbox()

    # ------------------------------------------------------------ start
    def start(self, job_id: str, spec: JobSubmitted, cause: Event) -> str:
        """Start the job's instance in the background (idempotent per job); returns the instance id."""
        instance_id = "i-" + hashlib.sha256(cause.id.encode()).hexdigest()[:16]
        if job_id not in self.jobs:
            task = asyncio.create_task(self._run(job_id, instance_id, spec, cause))
            self.jobs[job_id] = _Running(task, instance_id)
        return instance_id

    async def _emit(self, job_id: str, payload: Frozen, cause: Event, *parts: str) -> None:
        await self.bus.publish(payload, job_id=job_id, node_id=self.node_id,
                               event_id=derive_event_id(cause.id, type(payload).__name__, *parts))

    async def _run(self, job_id: str, instance_id: str, spec: JobSubmitted, cause: Event) -> None:
        token = current_job.set(job_id)
        workdir = self.work / instance_id
        instance: Instance | None = None
        claimed = tuple(cause.payload.claim.gpu_uuids) if isinstance(cause.payload, JobPlaced) else ()
        bindings: list[Binding] = []
        try:
            bundle = self._bundle(spec.image)
            trusted = await asyncio.to_thread(load_public_keys, self.settings.publisher_key_files())
            instance = Instance(
                InstanceSpec(instance_id=instance_id, job_id=job_id, bundle=bundle, command=spec.command,
                             vcpus=spec.profile.cpu_cores, memory_mib=max(128, spec.profile.ram_mib),
                             run_timeout_s=float(spec.max_runtime_s), cgroups=self.settings.vm_cgroups,
                             seccomp=self.settings.vm_seccomp,
                             network=self.settings.vm_network == "netns",
                             egress=tuple(parse_egress(spec.egress)), uplink=self.settings.egress_netns,
                             volume_mib=spec.volume_mib),
                workdir, self.vmm, dict(trusted))
            self.jobs[job_id].instance = instance
            await instance.verify()
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "instance.json").write_text(json.dumps(
                {"job_id": job_id, "instance_id": instance_id, "node_id": self.node_id, "cause": cause.id}))
            digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
            if (spec.volume_mib or spec.client_secrets) and self.gate is None:
                raise InstanceError("attestation_required", "keys and client secrets go only to attested "
                                                            "instances; this node has no TPM")
            if self.gate is not None:
                await self.gate.measure(job_id, instance, digest)  # measured launch: extend before the VMM starts
            await self._emit(job_id, InstanceProvisioning(
                instance_id=instance_id, image=spec.image, image_manifest_sha256=digest, vmm=self.vmm.name,
                public_key=instance.public_key.hex()), cause)
            if claimed:
                if self.gpus is None:
                    raise InstanceError("gpu_passthrough_unavailable", "this node cannot hand GPUs to a VM")
                bindings = await asyncio.to_thread(self.gpus.attach, claimed)
                self.jobs[job_id].bindings = bindings
                instance.spec = dataclasses.replace(instance.spec, vfio_devices=tuple(b.gpu for b in bindings))
            await instance.launch()
            assert instance.vm is not None
            await self._emit(job_id, InstanceBooted(instance_id=instance_id, boot_ms=round(instance.boot_ms, 1),
                                                    accel=instance.vm.accel), cause)
            if self.gate is not None:
                verdict = await self.gate.attest(job_id, instance_id, instance.public_key, cause)
                log.info("instance attested", extra={"instance_id": instance_id,
                                                     "pcr": verdict.pcr_sha256[:16]})
            if spec.volume_mib or spec.client_secrets:
                await self._receive_keys(job_id, instance, spec)
            await self._emit(job_id, InstanceRunning(instance_id=instance_id), cause)

            async def publish(chunk: InstanceOutput) -> None:
                await self._emit(job_id, chunk, cause, str(chunk.seq))

            exited = await run_workload(instance, job_id, spec.output_key, publish)
            await self._emit(job_id, exited, cause)
            log.info("instance exited", extra={"instance_id": instance_id, "exit_code": exited.exit_code,
                                               "boot_ms": round(instance.boot_ms), "output_bytes": exited.output_bytes})
        except (InstanceError, ImageError, NetworkError, VfioError) as exc:
            log.warning("instance failed", extra={"instance_id": instance_id, "reason": exc.reason})
            await self._emit(job_id, InstanceFailed(instance_id=instance_id, reason=exc.reason[:64],
                                                    detail=exc.detail[:1024]), cause)
        except asyncio.CancelledError:
            log.info("instance torn down before it finished", extra={"instance_id": instance_id})
        finally:
            if job_id in self.jobs:  # from here on nothing cancels the teardown half-way (see `teardown`)
                self.jobs[job_id].cleaning = True
            removed = await instance.destroy() if instance is not None else []
            if workdir.exists():
                await asyncio.to_thread(shutil.rmtree, workdir, True)
            scrubs: tuple[VramScrub, ...] = ()
            if claimed and self.gpus is not None:  # the VM is gone: GPUs back to the host driver, then scrubbed
                scrubs = await asyncio.to_thread(self.gpus.detach, bindings, claimed)
                removed.append(f"gpus:{len(bindings)} released")
            with contextlib.suppress(Exception):
                await self._emit(job_id, InstanceDestroyed(
                    instance_id=instance_id, removed=tuple(removed),
                    volume=instance.volume_erasure if instance is not None else None,
                    ram=instance.ram_scrub if instance is not None else None, gpus=scrubs), cause)
            self.jobs.pop(job_id, None)
            self.keys.forget(instance_id)
            if self.on_destroyed:
                self.on_destroyed(job_id)
            current_job.reset(token)

    async def _receive_keys(self, job_id: str, instance: Instance, spec: JobSubmitted) -> None:
        """After the verdict: the volume key from the key-broker, then the client's own secrets, each opened
        with the instance's private key in RAM and handed to the guest over its channel only."""
        instance_id = instance.spec.instance_id
        try:
            if spec.volume_mib:
                release = await self.keys.wait_key(instance_id, self.settings.key_release_timeout_s)
                dek = await asyncio.to_thread(instance.open_sealed, bytes.fromhex(release.sealed), "dek")
                try:
                    uuid = await instance.unlock_volume(dek)
                finally:
                    zeroize(dek)
                log.info("volume opened in the guest", extra={"instance_id": instance_id, "luks_uuid": uuid})
            if spec.client_secrets:
                sealed = await self.keys.wait_secrets(instance_id, self.settings.client_secrets_timeout_s)
                raw = await asyncio.to_thread(instance.open_sealed, bytes.fromhex(sealed.sealed), "client-secrets")
                try:
                    files = unpack_bundle(raw)
                finally:
                    zeroize(raw)
                await instance.deliver_secrets(files)
                log.info("client secrets delivered", extra={"instance_id": instance_id, "files": len(files)})
        except (KeyError_, CryptoError, BundleError) as exc:
            raise InstanceError(exc.reason, exc.detail) from None

    def _bundle(self, image: str) -> Path:
        if not _IMAGE_NAME.match(image):
            raise InstanceError("image_invalid_name", f"{image[:80]!r} is not an image name")
        bundle = self.settings.images_path / image
        if not bundle.is_dir():
            raise InstanceError("image_not_found", f"no image {image!r} on this node")
        return bundle

    # ------------------------------------------------------------ stop
    async def teardown(self, job_id: str) -> bool:
        """Stop the job's instance if it runs here; returns whether there was one."""
        running = self.jobs.get(job_id)
        if running is None:
            return False
        if not running.cleaning:  # a cancel inside the teardown would leave it half done, unreported
            running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(running.task)
        return True

    async def stop_all(self) -> None:
        for job_id in list(self.jobs):
            await self.teardown(job_id)

    # ------------------------------------------------------------ crash recovery
    async def reclaim(self) -> list[str]:
        """At start: remove everything an earlier agent process left behind; report each instance destroyed."""
        return await self._reclaim(set(), "agent_restart")

    async def sweep(self) -> list[str]:
        """Periodically: remove any instance directory (with its VMM, namespace, cgroup, volume, RAM) that
        no live job of this agent owns, and give back GPUs left on vfio-pci by no live instance, scrubbed."""
        live = {r.instance_id for r in self.jobs.values()}
        return await self._reclaim(live, "sweep")

    async def _reclaim(self, live: set[str], why: str) -> list[str]:
        reclaimed: list[str] = []
        if self.work.is_dir():
            for workdir in sorted(p for p in self.work.iterdir() if p.is_dir() and p.name not in live):
                await self._reclaim_instance(workdir, why)
                reclaimed.append(workdir.name)
        if self.gpus is not None:
            scrubs = await asyncio.to_thread(self.gpus.reclaim_orphans, self.live_gpus())
            if scrubs:
                reclaimed += [f"gpu:{g.gpu_uuid}" for g in scrubs]
                with contextlib.suppress(Exception):
                    await self.bus.publish(NodeSwept(reason=why, gpus=scrubs), node_id=self.node_id)
                log.warning("GPUs left on vfio-pci given back and scrubbed",
                            extra={"gpus": [g.gpu_uuid for g in scrubs], "verified": [g.verified for g in scrubs]})
        return reclaimed

    def live_gpus(self) -> set[str]:
        return {b.gpu for r in self.jobs.values() for b in r.bindings}

    async def _reclaim_instance(self, workdir: Path, why: str) -> None:
        removed, ram = await asyncio.to_thread(_kill_leftover_vmm, workdir)
        net = InstanceNetwork(PREFIX + workdir.name[-40:])
        if net.netns in leftover_namespaces() and await net.remove():
            removed.append(f"netns:{net.netns}")
        for cg in leftover_cgroups():
            if cg.name == workdir.name:
                with contextlib.suppress(OSError):
                    cg.rmdir()
                    removed.append("cgroup")
        meta = _read_meta(workdir)
        erasure = None
        if (workdir / VOLUME_FILE).exists():  # its VMM is dead: erase the LUKS header before the file goes
            erasure = await asyncio.to_thread(erase_volume, workdir / VOLUME_FILE)
            removed.append("volume")
        await asyncio.to_thread(shutil.rmtree, workdir, True)
        removed.append(f"workdir:{workdir.name}")
        if meta is not None:
            job_id, instance_id, cause = meta
            report = InstanceDestroyed(instance_id=instance_id, removed=(*removed, why), volume=erasure, ram=ram)
            with contextlib.suppress(Exception):
                await self.bus.publish(report, job_id=job_id, node_id=self.node_id,
                                       event_id=derive_event_id(cause, "InstanceDestroyed"))
        log.warning("reclaimed a leftover instance", extra={"instance_id": workdir.name, "removed": len(removed),
                                                            "why": why})


def _read_meta(workdir: Path) -> tuple[str, str, str] | None:
    try:
        meta = json.loads((workdir / "instance.json").read_text())
        return str(meta["job_id"]), str(meta["instance_id"]), str(meta["cause"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _kill_leftover_vmm(workdir: Path) -> tuple[list[str], MemoryScrub | None]:
    """Kill the VMM whose pid file is in `workdir`, only if its command line names that directory, and
    scrub its guest RAM: the memfd the dead agent created lives on in the VMM, so it is opened through
    /proc/<pid>/fd before the kill, scrubbed after it, then closed."""
    try:
        pid = int((workdir / "vmm.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return [], None
    if str(workdir).encode() not in cmdline:
        return [], None  # the pid was reused by an unrelated process
    ram_fd = _open_guest_ram(pid, workdir.name)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    scrub = None
    if ram_fd is not None:
        for _ in range(100):  # until the kernel has reaped it (a live writer would spoil the verification)
            if not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid):
                break
            time.sleep(0.02)
        try:
            scrub = scrub_memfd(ram_fd)
        finally:
            os.close(ram_fd)
    return [f"vmm:{pid}"] + (["guest-ram"] if scrub else []), scrub


def _open_guest_ram(pid: int, instance_id: str) -> int | None:
    """The VMM's descriptor of the guest RAM memfd the agent named `qvm-ram-<instance>`, opened anew."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for link in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(link).startswith(f"/memfd:qvm-ram-{instance_id}"):
                    return os.open(link, os.O_RDWR)
    except OSError:
        return None
    return None


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"
