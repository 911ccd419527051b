"""Runs accepted jobs in micro VMs on this node: sequences the phases of each job and reports every step
as an event. The phases' own work lives with them: the instance (`instance`), the attestation gate
(`attest.gate`), the keys (`keys`), the output (`output`), the teardown (`teardown`).

    accepted -> verify the image, provision  -> instance.provisioning (VM starting, instance public key)
             -> GPUs to vfio-pci, launch      -> instance.booted (boot time)
             -> attest gate, keys             -> instance.running
             -> run                           -> instance.output* (sealed to the client) -> instance.exited
             -> teardown                      -> instance.destroyed (what was removed, with evidence)
    any failure -> instance.failed (reason) -> teardown -> instance.destroyed

Event ids derive from the assignment, so a redelivered assignment or a restarted step publishes once.
Each instance keeps `instance.json` (ids only, no secrets) in its work directory; after an agent crash
`reclaim()` (at start), and `sweep()` periodically, put every instance directory no live job owns through
the same teardown (its VMM found by pid file and verified by its command line, its guest RAM scrubbed
through its memfd) and report it destroyed, so nothing leaks across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from services.node_agent.attest.gate import InstanceGate
from services.node_agent.guard.respond import JobRef
from services.node_agent.instance import SCRATCH_FILE, Instance, InstanceError, InstanceSpec
from services.node_agent.isolation.gpus import GpuPassthrough
from services.node_agent.isolation.network import NetworkError, parse_egress
from services.node_agent.isolation.vfio import Binding, VfioError
from services.node_agent.keys import KeyInbox
from services.node_agent.output import run_workload
from services.node_agent.settings import NodeAgentSettings
from services.node_agent.teardown import (
    GpuRelease,
    Remains,
    leftover_dirs,
    leftover_remains,
    read_owner,
    tear_down,
    write_owner,
)
from services.node_agent.vmm.base import Vmm
from services.node_agent.volume import VOLUME_FILE
from services.node_agent.warm_pool import PoolKey, Warm, WarmPool
from shared.bus import Bus
from shared.codec import Event
from shared.events import (
    GuardPolicy,
    InstanceBooted,
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
from shared.image.verify import verify_open
from shared.models import Frozen, SecurityLevel
from shared.telemetry import current_job, get_logger

__all__ = ["InstanceRuntime"]

log = get_logger("qvm.node_agent.runtime")
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _manifest_digest(bundle: Path) -> str:
    """The image's identity in events and the measured launch: SHA-256 of its signed manifest."""
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


@dataclass
class _Running:
    task: asyncio.Task[None]
    instance_id: str
    instance: Instance | None = None
    bindings: list[Binding] = field(default_factory=list)  # the job's GPUs on vfio-pci while it runs
    cleaning: bool = False  # in its teardown: a stop request waits for it instead of cancelling it
    guard_policy: GuardPolicy = field(default_factory=GuardPolicy)
    stopped_for: tuple[str, str] | None = None  # (reason, detail) when the agent stopped it (runtime guard)


class Watcher(Protocol):
    """The runtime guard as the runtime uses it (services/node_agent/guard/guard.py `RuntimeGuard`)."""

    async def watch(self, instance_id: str, vmm_pid: int, protected_files: Sequence[Path]) -> int: ...

    async def unwatch(self, instance_id: str) -> None: ...


class InstanceRuntime:
    def __init__(self, bus: Bus, settings: NodeAgentSettings, vmm: Vmm,
                 on_destroyed: Callable[[str], None] | None = None, gate: InstanceGate | None = None,
                 gpus: GpuPassthrough | None = None, cvm_vmm: Vmm | None = None) -> None:
        """With `gate` (a node with a TPM) every instance is measured before launch and its workload waits
        for a verified quote; without one, instances run unattested (only on unverified nodes). `gpus`
        hands a job's claimed GPUs to its VM (VFIO) and scrubs them afterwards. `cvm_vmm` starts the
        confidential jobs (SEV-SNP / TDX guests on q35), `vmm` the others. `guard` (set by the agent once
        its runtime guard runs) watches each VMM from its launch to its teardown."""
        self.cvm_vmm = cvm_vmm
        self.guard: Watcher | None = None
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
        self.pool = WarmPool(settings.warm_pool, self._launch_warm, self._destroy_warm) if settings.warm_pool \
            else None

    # ------------------------------------------------------------ start
    def start(self, job_id: str, spec: JobSubmitted, cause: Event) -> str:
        """Start the job's instance in the background (idempotent per job): a warm one when the pool has one
        of the job's exact shape, else a new one. Returns the instance id."""
        if job_id in self.jobs:
            return self.jobs[job_id].instance_id
        warm = self._take_warm(spec, cause)
        instance_id = warm.instance.spec.instance_id if warm else \
            "i-" + hashlib.sha256(cause.id.encode()).hexdigest()[:16]
        task = asyncio.create_task(self._run(job_id, instance_id, spec, cause, warm))
        self.jobs[job_id] = _Running(task, instance_id, guard_policy=spec.runtime_guard)
        return instance_id

    def _take_warm(self, spec: JobSubmitted, cause: Event) -> Warm | None:
        """A warm instance fits a job with the same image, vCPUs, RAM and volume size, and nothing a boot would
        have to set up for it: no GPUs (passed through at launch), no egress (the instance's network is made
        at launch), not a confidential VM (another VMM)."""
        if self.pool is None or spec.egress or spec.security is SecurityLevel.CONFIDENTIAL:
            return None
        if isinstance(cause.payload, JobPlaced) and cause.payload.claim.gpu_uuids:
            return None
        return self.pool.take(PoolKey(spec.image, spec.profile.cpu_cores, max(128, spec.profile.ram_mib),
                                      spec.volume_mib))

    async def _launch_warm(self, key: PoolKey, instance_id: str) -> Warm:
        """A warm instance for the pool: verified, measured with no job, booted to READY, watched."""
        workdir = self.work / instance_id
        trusted = await asyncio.to_thread(load_public_keys, self.settings.publisher_key_files())
        instance = Instance(self._instance_spec(instance_id, "", self._bundle(key.image), (), key.vcpus,
                                                key.memory_mib, 3600.0, (), key.volume_mib),
                            workdir, self.vmm, dict(trusted))
        try:
            await instance.verify()
            digest = _manifest_digest(instance.spec.bundle)
            if self.gate is not None:
                await self.gate.measure("", instance, digest)
            await instance.launch()
            assert instance.vm is not None
            await self._watch(instance)
        except BaseException:
            await self._destroy_warm(Warm(instance, ""))
            raise
        return Warm(instance, digest)

    async def _destroy_warm(self, warm: Warm) -> None:
        """A warm instance no job took (agent shutdown, a failed boot): the same teardown, nothing to report."""
        if self.guard is not None:
            with contextlib.suppress(Exception):
                await self.guard.unwatch(warm.instance.spec.instance_id)
        with contextlib.suppress(Exception):
            await warm.instance.tear_down(None)

    def _instance_spec(self, instance_id: str, job_id: str, bundle: Path, command: tuple[str, ...], vcpus: int,
                       memory_mib: int, run_timeout_s: float, egress: tuple[str, ...],
                       volume_mib: int) -> InstanceSpec:
        return InstanceSpec(instance_id=instance_id, job_id=job_id, bundle=bundle, command=command, vcpus=vcpus,
                            memory_mib=memory_mib, run_timeout_s=run_timeout_s, cgroups=self.settings.vm_cgroups,
                            seccomp=self.settings.vm_seccomp, network=self.settings.vm_network == "netns",
                            egress=tuple(parse_egress(list(egress))), uplink=self.settings.egress_netns,
                            volume_mib=volume_mib)

    def job_of(self, instance_id: str) -> JobRef | None:
        """The job an instance of this node runs, for the runtime guard's findings."""
        for job_id, running in self.jobs.items():
            if running.instance_id == instance_id:
                return JobRef(job_id, running.guard_policy)
        return None

    def _vmm_for(self, spec: JobSubmitted) -> Vmm:
        """A confidential job runs only in a confidential VM: never falls back to a plain micro VM."""
        if spec.security is not SecurityLevel.CONFIDENTIAL:
            return self.vmm
        if self.cvm_vmm is None:
            raise InstanceError("no_confidential_vm", "the job needs a confidential VM; this node has no SEV-SNP "
                                                      "or TDX driver")
        return self.cvm_vmm

    async def _emit(self, job_id: str, payload: Frozen, cause: Event, *parts: str) -> None:
        await self.bus.publish(payload, job_id=job_id, node_id=self.node_id,
                               event_id=derive_event_id(cause.id, type(payload).__name__, *parts))

    async def _run(self, job_id: str, instance_id: str, spec: JobSubmitted, cause: Event,
                   warm: Warm | None = None) -> None:
        token = current_job.set(job_id)
        workdir = self.work / instance_id
        instance: Instance | None = warm.instance if warm else None
        claimed = tuple(cause.payload.claim.gpu_uuids) if isinstance(cause.payload, JobPlaced) else ()
        bindings: list[Binding] = []
        try:
            if warm is not None:
                await self._assign_warm(job_id, spec, warm, cause)
            else:
                instance = await self._launch_for(job_id, instance_id, spec, cause, claimed, bindings)
            assert instance is not None and instance.vm is not None
            manifest = instance.manifest
            await self._emit(job_id, InstanceBooted(instance_id=instance_id, boot_ms=round(instance.boot_ms, 1),
                                                    accel=instance.vm.accel,
                                                    kernel=manifest.kernel_release[:128] if manifest else "",
                                                    breakdown=instance.boot_breakdown, warm=warm is not None),
                             cause)
            if self.gate is not None:
                verdict = await self.gate.attest(job_id, instance_id, instance.public_key, cause, instance)
                log.info("instance attested", extra={"instance_id": instance_id,
                                                     "pcr": verdict.pcr_sha256[:16]})
            if spec.volume_mib or spec.client_secrets:
                await self.keys.deliver(instance, bool(spec.volume_mib), bool(spec.client_secrets),
                                        self.settings.key_release_timeout_s, self.settings.client_secrets_timeout_s)
            await self._emit(job_id, InstanceRunning(instance_id=instance_id), cause)
            if warm is not None:
                self.fill_pool()  # its replacement, now that this job's start no longer needs the CPU

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
            stopped = self.jobs[job_id].stopped_for if job_id in self.jobs else None
            if stopped is not None:  # the agent stopped it (a runtime-guard finding): the job fails with why
                log.warning("instance stopped", extra={"instance_id": instance_id, "reason": stopped[0]})
                with contextlib.suppress(Exception):
                    await self._emit(job_id, InstanceFailed(instance_id=instance_id, reason=stopped[0][:64],
                                                            detail=stopped[1][:1024]), cause)
            else:
                log.info("instance torn down before it finished", extra={"instance_id": instance_id})
        finally:
            if instance is None and job_id in self.jobs:  # a launch that failed half-way: what exists of it
                instance = self.jobs[job_id].instance
            await self._tear_down(job_id, instance_id, instance, workdir, claimed, bindings, cause)
            current_job.reset(token)
            if warm is not None:
                self.fill_pool()  # (again, for a job that ended before it ran: fill is idempotent)

    async def _launch_for(self, job_id: str, instance_id: str, spec: JobSubmitted, cause: Event,
                          claimed: tuple[str, ...], bindings: list[Binding]) -> Instance:
        """A new instance for the job: verified, measured (with the job), given its GPUs, booted to READY,
        watched. The instance is the job's (`self.jobs[job_id].instance`) from its creation, so a failure
        half-way still tears down what exists."""
        bundle = self._bundle(spec.image)
        workdir = self.work / instance_id
        trusted = await asyncio.to_thread(load_public_keys, self.settings.publisher_key_files())
        instance = Instance(
            self._instance_spec(instance_id, job_id, bundle, spec.command, spec.profile.cpu_cores,
                                max(128, spec.profile.ram_mib), float(spec.max_runtime_s), tuple(spec.egress),
                                spec.volume_mib),
            workdir, self._vmm_for(spec), dict(trusted))
        self.jobs[job_id].instance = instance
        await instance.verify()
        write_owner(workdir, job_id, instance_id, self.node_id, cause.id)  # for a teardown after a crash
        digest = _manifest_digest(bundle)
        self._refuse_keys_unattested(spec)
        if self.gate is not None:
            await self.gate.measure(job_id, instance, digest)  # measured launch: extend before the VMM starts
        await self._emit(job_id, InstanceProvisioning(
            instance_id=instance_id, image=spec.image, image_manifest_sha256=digest, vmm=instance.vmm.name,
            public_key=instance.public_key.hex()), cause)
        if claimed:
            if self.gpus is None:
                raise InstanceError("gpu_passthrough_unavailable", "this node cannot hand GPUs to a VM")
            bindings.extend(await asyncio.to_thread(self.gpus.attach, claimed))
            self.jobs[job_id].bindings = bindings
            instance.spec = dataclasses.replace(instance.spec, vfio_devices=tuple(b.gpu for b in bindings))
        await instance.launch()
        assert instance.vm is not None
        await self._watch(instance)
        return instance

    async def _assign_warm(self, job_id: str, spec: JobSubmitted, warm: Warm, cause: Event) -> None:
        """A warm instance becomes the job's: its spec takes the job's command and limits, the TPM log binds
        the job to its launch (the assignment entry), and the job's events say what runs it."""
        instance = warm.instance
        self.jobs[job_id].instance = instance
        instance.spec = dataclasses.replace(instance.spec, job_id=job_id, command=spec.command,
                                            run_timeout_s=float(spec.max_runtime_s))
        write_owner(instance.workdir, job_id, instance.spec.instance_id, self.node_id, cause.id)
        self._refuse_keys_unattested(spec)
        if self.gate is not None:
            await self.gate.assign(job_id, instance)
        await self._emit(job_id, InstanceProvisioning(
            instance_id=instance.spec.instance_id, image=spec.image, image_manifest_sha256=warm.manifest_sha256,
            vmm=instance.vmm.name, public_key=instance.public_key.hex()), cause)

    def _refuse_keys_unattested(self, spec: JobSubmitted) -> None:
        if (spec.volume_mib or spec.client_secrets) and self.gate is None:
            raise InstanceError("attestation_required", "keys and client secrets go only to attested "
                                                        "instances; this node has no TPM")

    async def _watch(self, instance: Instance) -> None:
        """From its launch until its teardown, the VMM, what it starts, and the instance's disks are watched."""
        if self.guard is not None and instance.vm is not None:
            await self.guard.watch(instance.spec.instance_id, instance.vm.pid,
                                   [p for p in (instance.workdir / SCRATCH_FILE, instance.workdir / VOLUME_FILE)
                                    if p.exists()])

    async def _tear_down(self, job_id: str, instance_id: str, instance: Instance | None, workdir: Path,
                         claimed: tuple[str, ...], bindings: list[Binding], cause: Event) -> None:
        """The last phase, however the job ended: everything its instance held released, and reported."""
        if job_id in self.jobs:  # from here on nothing cancels the teardown half-way (see `teardown`)
            self.jobs[job_id].cleaning = True
        gpus = GpuRelease(self.gpus, bindings, claimed) if claimed and self.gpus is not None else None
        if instance is not None:
            if self.guard is not None:  # the agent's own teardown tools (cryptsetup erase) open the instance's files
                with contextlib.suppress(Exception):
                    await self.guard.unwatch(instance_id)
            evidence = await instance.tear_down(gpus)
        else:  # it failed before its instance existed: only the claimed GPUs (and a work directory) to release
            evidence = await tear_down(Remains(workdir, gpus=gpus))
        with contextlib.suppress(Exception):
            await self._emit(job_id, evidence.report(instance_id), cause)
        self.jobs.pop(job_id, None)
        self.keys.forget(instance_id)
        if self.on_destroyed:
            self.on_destroyed(job_id)

    def _bundle(self, image: str) -> Path:
        if not _IMAGE_NAME.match(image):
            raise InstanceError("image_invalid_name", f"{image[:80]!r} is not an image name")
        bundle = self.settings.images_path / image
        if not bundle.is_dir():
            raise InstanceError("image_not_found", f"no image {image!r} on this node")
        return bundle

    # ------------------------------------------------------------ stop
    async def stop_for(self, job_id: str, reason: str, detail: str) -> bool:
        """Stop the job's workload because the agent must (a runtime-guard finding): the job fails with
        `reason`, and its instance is torn down as any other."""
        running = self.jobs.get(job_id)
        if running is None or running.cleaning:
            return False
        if running.stopped_for is None:
            running.stopped_for = (reason, detail)
        return await self.teardown(job_id)

    async def teardown(self, job_id: str) -> bool:
        """Stop the job's instance if it runs here; returns whether there was one."""
        running = self.jobs.get(job_id)
        if running is None:
            return False
        if not running.cleaning:  # a cancel inside the teardown would leave it half done, unreported
            running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(running.task)
        if self.jobs.get(job_id) is running:  # cancelled before it began: nothing of it exists to tear down
            self.jobs.pop(job_id, None)
            if self.on_destroyed:
                self.on_destroyed(job_id)
        return True

    async def stop_all(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        for job_id in list(self.jobs):
            await self.teardown(job_id)

    # ------------------------------------------------------------ start
    async def warm_up(self) -> None:
        """At start, before any job: have the VMM settle what it must find out once (QEMU: KVM or TCG, by a
        probe boot of a verified image's kernel), so no job's boot waits for it. Best effort: a failure
        here only means the first launch asks again."""
        probe = getattr(self.vmm, "probe_accel", None)
        bundles = sorted(self.settings.images_path.iterdir()) if self.settings.images_path.is_dir() else []
        try:
            trusted = dict(await asyncio.to_thread(load_public_keys, self.settings.publisher_key_files()))
        except ImageError:
            trusted, bundles = {}, []
        if probe is None:
            return
        for bundle in bundles:
            if not (bundle / "manifest.json").is_file():
                continue
            try:
                _manifest, files = await asyncio.to_thread(verify_open, bundle, trusted)
            except ImageError:
                continue
            try:
                accel = await probe(Path(f"/proc/{os.getpid()}/fd/{files[0].fileno()}"))
                log.info("accelerator known", extra={"accel": accel, "image": bundle.name})
            except Exception as exc:  # the probe is an optimisation: the launch asks again
                log.warning("accelerator probe failed", extra={"reason": type(exc).__name__})
            finally:
                for f in files:
                    f.close()
            break

    async def discard_warm(self, instance_id: str) -> bool:
        """Tear down a warm instance (a runtime-guard finding at it before any job took it); the pool boots a
        fresh one. False when no warm instance has that id."""
        warm = self.pool.discard(instance_id) if self.pool is not None else None
        if warm is None:
            return False
        await self._destroy_warm(warm)
        return True

    def fill_pool(self) -> None:
        """Boot the configured warm instances, in the background. The agent calls it once its own measurement
        is in the TPM log and its runtime guard runs, so each warm launch is measured and watched like any."""
        if self.pool is not None:
            self.pool.fill()

    # ------------------------------------------------------------ crash recovery
    async def reclaim(self) -> list[str]:
        """At start: remove everything an earlier agent process left behind; report each instance destroyed."""
        return await self._reclaim(set(), "agent_restart")

    async def sweep(self) -> list[str]:
        """Periodically: remove any instance directory (with its VMM, namespace, cgroup, volume, RAM) that
        no live job of this agent owns, and give back GPUs left on vfio-pci by no live instance, scrubbed."""
        live = {r.instance_id for r in self.jobs.values()} | (self.pool.instance_ids() if self.pool else set())
        return await self._reclaim(live, "sweep")

    async def _reclaim(self, live: set[str], why: str) -> list[str]:
        reclaimed: list[str] = []
        for workdir in leftover_dirs(self.work, live):
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
        """A leftover instance through the same teardown as a live one; reported if its owner is known."""
        owner = read_owner(workdir)
        evidence = await tear_down(leftover_remains(workdir))
        if owner is not None:
            with contextlib.suppress(Exception):
                await self.bus.publish(evidence.report(owner.instance_id, why), job_id=owner.job_id,
                                       node_id=self.node_id, event_id=derive_event_id(owner.cause, "InstanceDestroyed"))
        log.warning("reclaimed a leftover instance", extra={"instance_id": workdir.name,
                                                            "removed": len(evidence.removed), "why": why})
