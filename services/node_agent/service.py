"""The node-agent: register, heartbeat, check assignments, accept or refuse, run accepted jobs.

consume  job.placed for this node only, teardown.requested for this node only,
         attest.challenge and node verdicts, instance verdicts (this node only), sealed keys and client
         secrets for this node's instances
decide   `drain.drain_refusal` (the hoster's drain request: no new jobs), then `check_assignment` against
         the live host and the jobs this agent already holds; the job's network policy (egress needs an
         uplink namespace)
act      hold the job's resources; run it in a micro VM (`runtime.InstanceRuntime`), measured before launch
         and held until its quote verifies (`attest.gate`); tear it down; quote for challenges
emit     node.registered at start, attest.enroll_requested, node.heartbeat every interval (saying whether the
         node drains), attest.requested on the re-attestation schedule, attest.evidence, job.accepted /
         job.refused (ids derived from the assignment, so a redelivered assignment is answered once),
         instance.*; locally `<state_dir>/node-status.json` (`status`) at start, every heartbeat and at stop
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable

from services.node_agent import cvm_host
from services.node_agent.attest.attester import Attester, AttestError
from services.node_agent.attest.gate import InstanceGate
from services.node_agent.attest.measure import agent_config, code_digest
from services.node_agent.cvm_host import Kind
from services.node_agent.drain import DrainWatch, drain_refusal
from services.node_agent.gpu.cc_evidence import collect_gpu_evidence
from services.node_agent.guard import GuardError, RuntimeGuard, build_guard
from services.node_agent.guard.respond import GuardResponder
from services.node_agent.hardware_check import Refusal, check_assignment
from services.node_agent.instance import InstanceError
from services.node_agent.inventory import HostReader, nvml_gpus
from services.node_agent.isolation.gpus import GpuPassthrough
from services.node_agent.isolation.network import NetworkError, parse_egress
from services.node_agent.isolation.vfio import VfioError
from services.node_agent.ledger import AssignmentLedger
from services.node_agent.runtime import InstanceRuntime
from services.node_agent.settings import NodeAgentSettings
from services.node_agent.status import gpu_states, job_states, write_status
from services.node_agent.vmm.base import Vmm
from services.node_agent.vmm.cloud_hypervisor import CloudHypervisor
from services.node_agent.vmm.firecracker import Firecracker
from services.node_agent.vmm.qemu_cvm import QemuConfidential
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from shared.bus import Bus
from shared.codec import Event
from shared.consumers import consumer_spec
from shared.errors import ConfigError, Reason, RejectedEvent, Unauthorized
from shared.events import (
    AttestationFailed,
    AttestationResult,
    AttestChallenge,
    AttestPurpose,
    AttestRequested,
    JobAccepted,
    JobPlaced,
    JobRefused,
    NodeHeartbeat,
    NodeRegistered,
    TeardownRequested,
)
from shared.identity import Role
from shared.models import GpuInfo, Inventory, ResourceClaim, TrustState
from shared.nodestatus import NodeStatusReport, TrustStatus, public_url, status_path
from shared.pki import signing_key_digest
from shared.runtime import run_together
from shared.telemetry import get_logger
from shared.tpm.measurements import AgentMeasurement, digest_of

__all__ = ["AGENT_VERSION", "NodeAgent"]

AGENT_VERSION = "0.1.0"
log = get_logger("qvm.node_agent")


def attester_for(bus: Bus, settings: NodeAgentSettings) -> Attester | None:
    """The node's attester when it has a TPM (`QVM_TPM`); its quotes bind the node's signing key."""
    if not settings.tpm:
        return None
    if bus.codec.signer is None:
        raise ConfigError("a node-agent with a TPM needs its signing key (the node key its quotes bind)")
    return Attester(settings.tpm, settings.measurement_log_path(bus.identity.node_id or "node"),
                    settings.measurement_pcr, signing_key_digest(bus.codec.signer.key.public_key()),
                    settings.tpm_ak_algorithm)


def _confidential_vmm() -> Vmm | None:
    """The driver for confidential jobs, when this host proved every layer of SEV-SNP or TDX (CPU, kernel,
    device, OVMF build, QEMU's guest object: `cvm_host.detect`); None otherwise, and such jobs are refused."""
    host = cvm_host.detect()
    kinds = host.features()
    if not kinds:
        return None
    kind: Kind = "sev-snp" if "sev-snp" in kinds else "tdx"
    log.info("confidential VMs available", extra={"kind": kind, "ovmf": str(host.support(kind).ovmf)})
    return QemuConfidential(kind, ovmf=host.support(kind).ovmf)


class NodeAgent:
    def __init__(self, bus: Bus, settings: NodeAgentSettings, host: HostReader | None = None,
                 inventory: Inventory | None = None,
                 read_gpus: Callable[[], tuple[GpuInfo, ...]] = nvml_gpus,
                 vmm: Vmm | None = None, attester: Attester | None = None, gpus: GpuPassthrough | None = None,
                 cvm_vmm: Vmm | None = None) -> None:
        """`inventory`/`read_gpus` are injectable for tests on machines without GPUs (the NVML boundary).
        Without `vmm` the agent only places (tests of the bus side); `create()` always gives it one. `gpus`
        (VFIO and VRAM scrub) defaults to the host's real sysfs and libcuda."""
        assert bus.identity.node_id, "a node-agent bus identity carries its node id"
        self.bus = bus
        self.node_id = bus.identity.node_id
        self.settings = settings
        self.host = host or HostReader()
        self.read_gpus = read_gpus
        self.inventory = inventory or self.host.inventory(gpus=read_gpus())
        self.held: dict[str, ResourceClaim] = {}
        self.held_since: dict[str, int] = {}  # job id -> when this agent accepted it (for the status report)
        self.ledger = AssignmentLedger(settings.state_dir / "node" / f"assignments-{self.node_id}.jsonl")
        self._beat = 0
        self.drain = DrainWatch(settings.state_dir)
        self.live_gpus = self.inventory.gpus  # as NVML last reported them (refreshed by each assignment check)
        self.registered_ns = 0
        self.nats_url = public_url(settings.nats_url or "")
        self.last_heartbeat_ns = 0
        self.trust = TrustStatus(detail="awaiting the first attestation result" if attester is not None
                                 else "this node has no TPM (QVM_TPM): it is never trusted")
        self.attester = attester
        self.enrolled = False
        self.gate = InstanceGate(bus, attester, settings.attest_timeout_s) if attester else None
        self.guard: RuntimeGuard | None = None  # the eBPF runtime guard, once loaded (`run`)
        self.guard_digest = ""
        self.guard_responder: GuardResponder | None = None
        self.runtime = InstanceRuntime(bus, settings, vmm, on_destroyed=self._release, gate=self.gate,
                                       gpus=gpus or GpuPassthrough(self.inventory.gpus),
                                       cvm_vmm=cvm_vmm) if vmm else None

    @classmethod
    async def create(cls, bus: Bus, settings: NodeAgentSettings) -> NodeAgent:
        drivers: dict[str, Callable[[], Vmm]] = {
            "qemu-microvm": lambda: QemuMicrovm(accel=settings.vm_accel),
            "firecracker": Firecracker,
            "cloud-hypervisor": CloudHypervisor,
        }
        if settings.vmm not in drivers:
            raise ConfigError(f"unknown VMM {settings.vmm!r} (one of {', '.join(drivers)})")
        return cls(bus, settings, vmm=drivers[settings.vmm](), attester=attester_for(bus, settings),
                   cvm_vmm=await asyncio.to_thread(_confidential_vmm))

    def _release(self, job_id: str) -> None:
        self.held.pop(job_id, None)
        self.held_since.pop(job_id, None)

    async def _membership(self, stop: asyncio.Event) -> None:
        """A withdrawn node (revoked, or its hoster left) is refused by the bus from then on: stop everything.
        Its instances are torn down here (the `finally` of `run`), since no teardown request can reach it."""
        done = asyncio.ensure_future(stop.wait())
        refused = asyncio.ensure_future(self.bus.unauthorized.wait())
        try:
            await asyncio.wait({done, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            refused.cancel()
        if self.bus.unauthorized.is_set():
            log.error("the bus refuses this node: withdrawn from the platform; stopping its instances",
                      extra={"node_id": self.node_id})
            stop.set()

    async def run(self, stop: asyncio.Event) -> None:
        self.drain.poll()
        await self.write_status()
        if self.runtime is not None:
            await self.runtime.reclaim()
            await self.runtime.warm_up()  # KVM or TCG settled now, not in the first job's boot
            await self._start_guard()  # before the agent measures itself: the guard's digest is in that entry
        await self.bus.publish(NodeRegistered(inventory=self.inventory, agent_version=AGENT_VERSION),
                               node_id=self.node_id)
        self.registered_ns = time.time_ns()
        await self.write_status()
        log.info("registered", extra={"node_id": self.node_id, "cpu_cores": self.inventory.cpu_cores,
                                      "gpus": len(self.inventory.gpus)})
        attesting = [self._attesting(stop)] if self.attester is not None else []
        if self.attester is None and self.runtime is not None:
            self.runtime.fill_pool()  # no TPM: nothing to measure first
        guarding = [self._guarding(stop)] if self.guard is not None else []
        try:
            await run_together(
                self.bus.consume(consumer_spec(Role.NODE_AGENT, "assignments"), self.on_assignment, stop),
                self.bus.consume(consumer_spec(Role.NODE_AGENT, "teardown"), self.on_teardown, stop),
                self._heartbeats(stop),
                self._sweeps(stop),
                self._membership(stop),
                *attesting,
                *guarding,
            )
            if self.bus.unauthorized.is_set():
                raise Unauthorized(f"node {self.node_id} was withdrawn from the platform: its instances are stopped")
        finally:
            if self.runtime is not None:
                await self.runtime.stop_all()
            if self.guard is not None:
                await self.guard.close()
            if self.attester is not None:
                await self.attester.close()
            await self.write_status(stopped=True)

    # ------------------------------------------------------------ the runtime guard
    async def _start_guard(self) -> None:
        """Load the eBPF guard (`QVM_GUARD`): auto where the kernel allows it, required or not at all. A node
        without it says so (inventory, status) and its measured launch names no guard, so a policy that
        requires one does not trust it."""
        assert self.runtime is not None
        if self.settings.guard == "off":
            return
        try:
            build = await asyncio.to_thread(build_guard)
            guard = await RuntimeGuard.start(build)
        except GuardError as exc:
            if self.settings.guard == "required":
                raise ConfigError(f"QVM_GUARD=required, but the runtime guard cannot run here: {exc.reason}: "
                                  f"{exc.detail}") from None
            log.warning("runtime guard unavailable: this node runs its VMMs unwatched",
                        extra={"reason": exc.reason, "detail": exc.detail[:300]})
            return
        self.guard, self.guard_digest = guard, build.digest
        self.runtime.guard = guard
        self.inventory = self.inventory.model_copy(update={"runtime_guard": guard.mode})
        log.info("runtime guard loaded", extra={"mode": guard.mode, "digest": build.digest[:16]})

    async def _guarding(self, stop: asyncio.Event) -> None:
        """Findings -> the responder. A guard that dies leaves the VMMs unwatched: the agent logs that in its
        measurement (a new agent entry naming no guard), so the node's next quote no longer passes a policy
        that requires the guard, and stops giving the guard new instances."""
        assert self.guard is not None and self.runtime is not None
        responder = GuardResponder(self.bus, self.runtime.job_of, self.runtime.stop_for, self.runtime.discard_warm)
        self.guard_responder = responder
        watch = asyncio.create_task(responder.run(self.guard.findings()))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({watch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if stop.is_set():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, GuardError):
                await watch
            return
        try:
            await watch
            detail = "the guard's loader ended"
        except GuardError as exc:
            detail = f"{exc.reason}: {exc.detail}"
        log.error("runtime guard stopped: VMMs are no longer watched", extra={"detail": detail[:300]})
        self.runtime.guard = None
        self.guard_digest = ""
        if self.attester is not None:
            with contextlib.suppress(AttestError):
                await self.attester.measure(self._agent_measurement())

    # ------------------------------------------------------------ consume
    async def on_assignment(self, event: Event) -> None:
        assert isinstance(event.payload, JobPlaced)
        placed = event.payload
        job_id = event.job_id or ""
        earlier = self.ledger.taken_elsewhere(job_id, event.stream_seq)
        if earlier is not None:  # a replayed assignment: this node already took the job once
            raise RejectedEvent(Reason.JOB_EXISTS, f"job {job_id} was accepted here from placement #{earlier}; "
                                                   f"#{event.stream_seq} is not run")
        if job_id in self.held:  # redelivered: answer the same way again (deduplicated by id)
            await self._accept(job_id, placed, event)
            return
        # decide
        refusal = drain_refusal(self.drain.poll())
        if refusal is None:
            others = [c for j, c in self.held.items() if j != job_id]
            refusal = await asyncio.to_thread(self._check, placed, others)
        if refusal is None and placed.job.egress:
            refusal = self._egress_refusal(placed.job.egress)
        # act + emit
        if refusal is not None:
            log.warning("assignment refused", extra={"reason": refusal.reason, "detail": refusal.detail})
            await self.bus.publish(JobRefused(node_id=self.node_id, attempt=placed.attempt, reason=refusal.reason,
                                              detail=refusal.detail),
                                   job_id=job_id, node_id=self.node_id, caused_by=event)
            return
        self.held[job_id] = placed.claim
        self.held_since[job_id] = time.time_ns()
        await asyncio.to_thread(self.ledger.record, job_id, event.stream_seq)
        await self._accept(job_id, placed, event)

    def _check(self, placed: JobPlaced, others: list[ResourceClaim]) -> Refusal | None:
        """Blocking (procfs, NVML): runs in a worker thread."""
        live = self.inventory.model_copy(update={"gpus": self.read_gpus()})
        self.live_gpus = live.gpus
        refusal = check_assignment(placed, live, self.host.meminfo_mib("MemAvailable") or live.ram_mib, others)
        if refusal is None and placed.claim.gpu_uuids and self.runtime is not None and self.runtime.gpus:
            try:
                self.runtime.gpus.check(placed.claim.gpu_uuids)
            except VfioError as exc:
                refusal = Refusal(f"gpu_{exc.reason}"[:64], exc.detail)
        return refusal

    def _egress_refusal(self, entries: tuple[str, ...]) -> Refusal | None:
        if self.settings.egress_netns is None or self.settings.vm_network != "netns":
            return Refusal("egress_unsupported", "this node has no uplink namespace: it runs guests without "
                                                 "network access only")
        try:
            parse_egress(entries)
        except NetworkError as exc:
            return Refusal(exc.reason, exc.detail)
        return None

    async def _accept(self, job_id: str, placed: JobPlaced, event: Event) -> None:
        await self.bus.publish(JobAccepted(node_id=self.node_id, attempt=placed.attempt), job_id=job_id,
                               node_id=self.node_id, caused_by=event)
        log.info("assignment accepted", extra={"attempt": placed.attempt})
        if self.runtime is not None:
            self.runtime.start(job_id, placed.job, event)

    async def on_teardown(self, event: Event) -> None:
        assert isinstance(event.payload, TeardownRequested)
        job_id = event.job_id or ""
        if self.runtime is not None and await self.runtime.teardown(job_id):
            log.info("instance torn down", extra={"reason": event.payload.reason})
        if self.held.pop(job_id, None) is not None:
            log.info("job released", extra={"reason": event.payload.reason})
        self.held_since.pop(job_id, None)

    # ------------------------------------------------------------ attestation
    attest_backoff_s = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # between failed starts: about a minute in all ...
    attest_retry_s = 60.0  # ... then one try a minute, for as long as the agent runs

    async def _attesting(self, stop: asyncio.Event) -> None:
        """In the background (the agent heartbeats and sweeps meanwhile): start the attester, then answer
        challenges, take instance verdicts and sealed keys, and re-attest on schedule."""
        if not await self._start_attester(stop):
            return
        if self.runtime is not None:
            self.runtime.fill_pool()  # warm instances: measured after the agent, under its guard
        await run_together(
            self.bus.consume(consumer_spec(Role.NODE_AGENT, "attestation"), self.on_attestation, stop),
            self.bus.consume(consumer_spec(Role.NODE_AGENT, "verdicts"), self.on_verdict, stop),
            self.bus.consume(consumer_spec(Role.NODE_AGENT, "keys"), self.on_keys, stop),
            self._reattest(stop),
        )

    def _agent_measurement(self) -> AgentMeasurement:
        return AgentMeasurement(
            node_id=self.node_id, agent_version=AGENT_VERSION, agent_sha256=code_digest(),
            config_sha256=digest_of(agent_config(self.settings)), config=agent_config(self.settings),
            guard_sha256=self.guard_digest)

    async def _start_attester(self, stop: asyncio.Event) -> bool:
        """Open the TPM, measure the agent, ask to enroll; on failure try again, with back-off
        (`attest_backoff_s`), then every `attest_retry_s` until it works: a TPM can be briefly busy or full
        (what a killed agent left in it is flushed by `TpmDevice.load_keys`). Each failure is logged with
        its reason and shown in the node's status; until it works the node runs unverified and the
        scheduler never trusts it. False only when the agent stops first."""
        assert self.attester is not None
        measurement = self._agent_measurement()
        started = False
        attempt = 0
        while not stop.is_set():
            attempt += 1
            try:
                # act: open the TPM and measure the agent (once), then emit the enrollment request
                if not started:
                    await self.attester.start(measurement)
                    started = True
                await self.bus.publish(self.attester.enroll_request(), node_id=self.node_id)
            except AttestError as exc:
                reason, detail = exc.reason, exc.detail
            except Exception as exc:  # the bus (publish), the log's file system: retried like the TPM
                reason = "enroll_request_failed" if started else "attester_start_failed"
                detail = f"{type(exc).__name__}: {exc}"
            else:
                log.info("enrollment requested", extra={"pcr": self.settings.measurement_pcr, "attempt": attempt})
                if attempt > 1:
                    self.trust = TrustStatus(detail="awaiting the first attestation result")
                return True
            # decide: when to try again
            backoff = self.attest_backoff_s
            wait = backoff[attempt - 1] if attempt <= len(backoff) else self.attest_retry_s
            log.error("node cannot attest; retrying", extra={"reason": reason, "detail": detail[:300],
                                                              "attempt": attempt, "retry_in_s": wait})
            self.trust = TrustStatus(detail=f"cannot attest ({reason}: {detail}); retrying"[:300],
                                     updated_ns=time.time_ns())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        return False

    async def on_attestation(self, event: Event) -> None:
        assert self.attester is not None
        match event.payload:
            case AttestChallenge() as challenge:
                if challenge.expires_ns < time.time_ns():
                    log.info("expired challenge skipped", extra={"purpose": challenge.purpose.value})
                    return
                key: bytes | None = None
                if challenge.purpose is AttestPurpose.INSTANCE:
                    key = self.gate.key_for(challenge.instance_id or "") if self.gate else None
                    if key is None:
                        log.info("challenge for an instance no longer here", extra={
                            "instance_id": challenge.instance_id})
                        return
                try:
                    evidence = await self.attester.answer(challenge, key)
                    if challenge.purpose is AttestPurpose.NODE and self.inventory.gpus:
                        # the GPUs this host still drives (not handed to a VM): their CC evidence, same nonce
                        gpus = await asyncio.to_thread(collect_gpu_evidence, bytes.fromhex(challenge.nonce))
                        evidence = evidence.model_copy(update={"gpus": gpus})
                    if challenge.purpose is AttestPurpose.INSTANCE and self.gate is not None:
                        cvm = await self.gate.cvm_evidence(challenge.instance_id or "", bytes.fromhex(challenge.nonce))
                        if cvm is not None:
                            evidence = evidence.model_copy(update={"cvm": cvm})
                except (AttestError, InstanceError) as exc:
                    log.error("cannot answer challenge", extra={"reason": exc.reason, "detail": exc.detail[:300]})
                    return
                await self.bus.publish(evidence, node_id=self.node_id, caused_by=event)
            case AttestationResult() as result:
                self.enrolled = True
                self.trust = TrustStatus(state=result.trust, detail=f"{result.purpose.value} quote verified",
                                         updated_ns=event.envelope.time_ns, verified_ns=result.verified_ns,
                                         expires_ns=result.expires_ns)
                log.info("node attested", extra={"purpose": result.purpose.value, "pcr": result.pcr_sha256[:16]})
            case AttestationFailed() as failed:
                self.enrolled = False  # enroll again at the next tick (a reboot, a revocation)
                self.trust = TrustStatus(state=TrustState.UNTRUSTED, detail=f"{failed.reason}: {failed.detail}"[:300],
                                         updated_ns=event.envelope.time_ns)
                log.warning("node attestation failed", extra={"purpose": failed.purpose.value,
                                                              "reason": failed.reason})

    async def on_verdict(self, event: Event) -> None:
        if self.gate is not None:
            self.gate.resolve(event)

    async def on_keys(self, event: Event) -> None:
        """Sealed keys and client secrets for this node's instances (only ciphertext passes here)."""
        if self.runtime is not None:
            self.runtime.keys.resolve(event)

    async def _reattest(self, stop: asyncio.Event) -> None:
        """Every interval (with jitter, so a fleet does not challenge in step): a node quote, or a new
        enrollment after a failure."""
        assert self.attester is not None
        while not stop.is_set():
            delay = self.settings.attest_interval_s + random.uniform(0, self.settings.attest_jitter_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            try:
                if self.enrolled:
                    request = AttestRequested(purpose=AttestPurpose.NODE, key=self.attester.node_key.hex())
                    await self.bus.publish(request, node_id=self.node_id)
                else:
                    await self.bus.publish(self.attester.enroll_request(), node_id=self.node_id)
            except Exception as exc:  # the next tick retries
                log.warning("re-attestation request failed", extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}"})

    # ------------------------------------------------------------ heartbeats
    async def _sweeps(self, stop: asyncio.Event) -> None:
        """Now and then: reclaim what no live job owns (a failed teardown, a crash mid-job), with evidence."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.agent_sweep_interval_s)
            if self.runtime is not None and not stop.is_set():
                try:
                    await self.runtime.sweep()
                except Exception as exc:  # one failed sweep must not stop the agent; the next one retries
                    log.warning("sweep failed", extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"})

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        """The first beat right after registering (a node that just joined is alive at once), then one per
        interval."""
        first = True
        while not stop.is_set():
            if not first:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.heartbeat_interval_s)
                if stop.is_set():
                    return
            first = False
            self._beat += 1
            try:
                await self.bus.publish(NodeHeartbeat(seq=self._beat, jobs=tuple(sorted(self.held)),
                                                     draining=self.drain.poll()),
                                       node_id=self.node_id)
                self.last_heartbeat_ns = time.time_ns()
            except Exception as exc:  # a missed beat is reported, the next one retries
                log.warning("heartbeat failed", extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            await self.write_status()

    # ------------------------------------------------------------ local status
    def status_report(self, stopped: bool = False) -> NodeStatusReport:
        """What `qvm node status` shows: ids, states and times only (the file is world-readable)."""
        nc = self.bus.nc
        if nc.connected_url is not None:  # else the last one it was connected to
            self.nats_url = public_url(nc.connected_url.geturl())
        instances: dict[str, tuple[str, str]] = {}
        if self.runtime is not None:
            for job_id, running in list(self.runtime.jobs.items()):
                phase = ("tearing_down" if running.cleaning else
                         running.instance.state.value if running.instance is not None else "starting")
                instances[job_id] = (running.instance_id, phase)
        now = time.time_ns()
        return NodeStatusReport(
            node_id=self.node_id, agent_version=AGENT_VERSION, pid=os.getpid(), nats_url=self.nats_url,
            connected=nc.is_connected, registered_ns=self.registered_ns, last_heartbeat_ns=self.last_heartbeat_ns,
            heartbeat_interval_s=self.settings.heartbeat_interval_s, written_ns=now, stopped_ns=now if stopped else 0,
            draining=self.drain.draining, draining_since_ns=self.drain.since_ns, trust=self.trust,
            gpus=gpu_states(self.live_gpus, self.held), jobs=job_states(self.held, self.held_since, instances))

    async def write_status(self, stopped: bool = False) -> None:
        """Never fails the agent: a status it cannot write is logged, the next beat tries again."""
        try:
            await asyncio.to_thread(write_status, status_path(self.settings.state_dir), self.status_report(stopped))
        except Exception as exc:
            log.warning("status not written", extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
