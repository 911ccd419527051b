"""Runs accepted jobs in micro VMs on this node and reports every step as an event.

    accepted -> instance.provisioning (image verified, VM starting, instance public key)
             -> instance.booted (boot time) -> instance.running -> instance.output* -> instance.exited
             -> instance.destroyed (what was removed)
    any failure -> instance.failed (reason) -> instance.destroyed

Event ids derive from the assignment, so a redelivered assignment or a restarted step publishes once.
Each instance keeps `instance.json` (ids only, no secrets) in its work directory; after an agent crash
`reclaim()` kills the instance's VMM (found by pid file and verified by its command line), removes the
directory and reports the instance destroyed, so nothing leaks across restarts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from services.node_agent.attest.gate import InstanceGate
from services.node_agent.instance import Instance, InstanceError, InstanceSpec
from services.node_agent.isolation.cgroups import leftover_cgroups
from services.node_agent.isolation.network import (
    PREFIX,
    InstanceNetwork,
    NetworkError,
    leftover_namespaces,
    parse_egress,
)
from services.node_agent.keys import KeyError_, KeyInbox
from services.node_agent.vmm.base import Vmm
from services.node_agent.volume import VOLUME_FILE, erase_volume
from shared.bus import Bus
from shared.client.bundle import BundleError, unpack_bundle
from shared.codec import Event
from shared.config import Settings
from shared.crypto.errors import CryptoError
from shared.crypto.secret import zeroize
from shared.events import (
    InstanceBooted,
    InstanceDestroyed,
    InstanceExited,
    InstanceFailed,
    InstanceOutput,
    InstanceProvisioning,
    InstanceRunning,
    JobSubmitted,
)
from shared.ids import derive_event_id
from shared.image.manifest import ImageError, load_public_keys
from shared.models import Frozen
from shared.telemetry import current_job, get_logger

__all__ = ["InstanceRuntime"]

log = get_logger("qvm.node_agent.runtime")
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OUTPUT_CHUNK = 64 * 1024
OUTPUT_FLUSH_S = 0.5
OUTPUT_PUBLISHED_MAX = 1 << 20  # beyond this only the digest and byte count are reported


class OutputStreamer:
    """Publishes workload output while it runs: a chunk at 64 KiB, or every half second of quiet."""

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


@dataclass
class _Running:
    task: asyncio.Task[None]
    instance: Instance | None = None


class InstanceRuntime:
    def __init__(self, bus: Bus, settings: Settings, vmm: Vmm,
                 on_destroyed: Callable[[str], None] | None = None, gate: InstanceGate | None = None) -> None:
        """With `gate` (a node with a TPM) every instance is measured before launch and its workload waits
        for a verified quote; without one, instances run unattested (only on unverified nodes)."""
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
            self.jobs[job_id] = _Running(task)
        return instance_id

    async def _emit(self, job_id: str, payload: Frozen, cause: Event, *parts: str) -> None:
        await self.bus.publish(payload, job_id=job_id, node_id=self.node_id,
                               event_id=derive_event_id(cause.id, type(payload).__name__, *parts))

    async def _run(self, job_id: str, instance_id: str, spec: JobSubmitted, cause: Event) -> None:
        token = current_job.set(job_id)
        workdir = self.work / instance_id
        instance: Instance | None = None
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
            async def emit_chunk(seq: int, chunk: bytes) -> None:
                await self._emit(job_id, InstanceOutput(instance_id=instance_id, seq=seq,
                                                        data_b64=base64.b64encode(chunk).decode()), cause, str(seq))

            streamer = OutputStreamer(emit_chunk)
            flusher = asyncio.create_task(streamer.flush_every(OUTPUT_FLUSH_S))
            try:
                out = await instance.run(streamer.add)
            finally:
                flusher.cancel()
                await streamer.flush()
            await self._emit(job_id, InstanceExited(
                instance_id=instance_id, exit_code=out.exit_code, runtime_ms=round(instance.runtime_ms, 1),
                output_sha256=out.sha256, output_bytes=out.total_bytes, output_truncated=out.truncated), cause)
            log.info("instance exited", extra={"instance_id": instance_id, "exit_code": out.exit_code,
                                               "boot_ms": round(instance.boot_ms), "output_bytes": out.total_bytes})
        except (InstanceError, ImageError, NetworkError) as exc:
            log.warning("instance failed", extra={"instance_id": instance_id, "reason": exc.reason})
            await self._emit(job_id, InstanceFailed(instance_id=instance_id, reason=exc.reason[:64],
                                                    detail=exc.detail[:1024]), cause)
        except asyncio.CancelledError:
            log.info("instance torn down before it finished", extra={"instance_id": instance_id})
        finally:
            removed = await instance.destroy() if instance is not None else []
            if workdir.exists():
                await asyncio.to_thread(shutil.rmtree, workdir, True)
            with contextlib.suppress(Exception):
                await self._emit(job_id, InstanceDestroyed(
                    instance_id=instance_id, removed=tuple(removed),
                    volume=instance.volume_erasure if instance is not None else None,
                    ram=instance.ram_scrub if instance is not None else None), cause)
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
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running.task
        return True

    async def stop_all(self) -> None:
        for job_id in list(self.jobs):
            await self.teardown(job_id)

    # ------------------------------------------------------------ crash recovery
    async def reclaim(self) -> list[str]:
        """Remove what an earlier agent process left behind; report each instance destroyed."""
        reclaimed: list[str] = []
        if not self.work.is_dir():
            return reclaimed
        for workdir in sorted(p for p in self.work.iterdir() if p.is_dir()):
            removed = await asyncio.to_thread(_kill_leftover_vmm, workdir)
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
            reclaimed.append(workdir.name)
            if meta is not None:
                job_id, instance_id, cause = meta
                report = InstanceDestroyed(instance_id=instance_id, removed=(*removed, "agent_restart"), volume=erasure)
                with contextlib.suppress(Exception):
                    await self.bus.publish(report, job_id=job_id, node_id=self.node_id,
                                           event_id=derive_event_id(cause, "InstanceDestroyed"))
            log.warning("reclaimed a leftover instance", extra={"instance_id": workdir.name, "removed": len(removed)})
        return reclaimed


def _read_meta(workdir: Path) -> tuple[str, str, str] | None:
    try:
        meta = json.loads((workdir / "instance.json").read_text())
        return str(meta["job_id"]), str(meta["instance_id"]), str(meta["cause"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _kill_leftover_vmm(workdir: Path) -> list[str]:
    """Kill the VMM whose pid file is in `workdir`, only if its command line names that directory."""
    try:
        pid = int((workdir / "vmm.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return []
    if str(workdir).encode() not in cmdline:
        return []  # the pid was reused by an unrelated process
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return [f"vmm:{pid}"]
