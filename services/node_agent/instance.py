"""The provision, launch and run phases of one micro VM instance, from verified image to exit code, with an
explicit state machine.

    created --verify--> verified --launch--> booting --READY--> running --EXIT--> exited --> destroyed
    any state before exited --(error)--> failed --> destroyed

The instance owns its work directory (scratch disk, QMP socket, console log, VMM pid file, the data
volume's ciphertext; never a secret), a fresh X25519 key pair held in memory only (its public key goes
into the instance's events; attestation and key release bind to it), and the VMM process.

Between READY and `run()` (state running) the agent may hand the guest its data-encryption key
(`unlock_volume`: the guest formats and opens its LUKS2 volume, mounted at /data) and the client's secret
files (`deliver_secrets`: a tmpfs at /run/secrets), over the channel only. Refused inputs raise
`InstanceError` and change nothing (volume_bad_key, no_volume, secret_bad_name, secret_too_large,
secrets_too_many, illegal_state); a guest that fails either step fails the instance (volume_failed,
secret_rejected).

`tear_down()` hands everything the instance holds on the host to the teardown sequence
(`services.node_agent.teardown`: VMM, guest RAM scrubbed into `ram_scrub`, network namespace, volume erased
into `volume_erasure`, cgroup, work directory) and keeps what could not be released for a second call;
`destroy()` is the same, returning what was removed. Idempotent.

One module at about 400 lines, on purpose: each step makes its own state transitions, so the steps stay
next to the table that allows them. The child's confinement is `isolation.confine`, the wipes `teardown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, NoReturn

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from services.node_agent import teardown
from services.node_agent.channel import (
    BOOT_STAGES,
    ChannelError,
    CvmReport,
    GuestChannel,
    RunOutput,
    check_key,
    check_secret,
)
from services.node_agent.isolation.cgroups import CgroupError, VmCgroup
from services.node_agent.isolation.confine import confinement
from services.node_agent.isolation.network import EgressRule, InstanceNetwork, guest_net_arg
from services.node_agent.isolation.seccomp import VIOLATION_SIGNAL
from services.node_agent.vmm.base import LaunchSpec, Vmm, VmmError, VmProcess
from services.node_agent.volume import MIN_VOLUME_MIB, VOLUME_FILE, make_volume
from shared.crypto import hpke
from shared.errors import ReasonedError
from shared.events import BootBreakdown, CvmKind
from shared.image.manifest import ImageError, ImageManifest
from shared.image.verify import verify_open
from shared.models import MemoryScrub, VolumeErasure

__all__ = ["MAX_SECRETS_BYTES", "MAX_SECRET_FILES", "Instance", "InstanceError", "InstanceSpec", "VmState"]

MAX_SECRET_FILES = 32  # as shared/client/bundle.py allows
MAX_SECRETS_BYTES = 256 * 1024  # all files together (the guest's tmpfs is 1 MiB)


SCRATCH_FILE = "scratch.ext4"  # the instance's scratch disk (the guest encrypts it under a key it makes)


class VmState(StrEnum):
    CREATED = "created"
    VERIFIED = "verified"
    BOOTING = "booting"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"
    DESTROYED = "destroyed"


_NEXT: dict[VmState, frozenset[VmState]] = {
    VmState.CREATED: frozenset({VmState.VERIFIED, VmState.FAILED, VmState.DESTROYED}),
    VmState.VERIFIED: frozenset({VmState.BOOTING, VmState.FAILED, VmState.DESTROYED}),
    VmState.BOOTING: frozenset({VmState.RUNNING, VmState.FAILED}),
    VmState.RUNNING: frozenset({VmState.EXITED, VmState.FAILED}),
    VmState.EXITED: frozenset({VmState.DESTROYED}),
    VmState.FAILED: frozenset({VmState.DESTROYED}),
    VmState.DESTROYED: frozenset(),
}


class InstanceError(ReasonedError):
    """A failure with a stable reason code (see `ReasonedError`)."""


@dataclass(frozen=True)
class InstanceSpec:
    instance_id: str
    job_id: str
    bundle: Path
    command: tuple[str, ...]
    vcpus: int = 1
    memory_mib: int = 256
    scratch_mib: int = 1024
    run_timeout_s: float = 3600.0
    boot_timeout_s: float = 120.0
    cgroups: bool = True  # the job's CPU and memory limits on the VMM
    seccomp: bool = True  # the VMM's syscall allow-list (`vmm.seccomp_allow`; VMMs with their own filters: None)
    seccomp_allow: frozenset[str] | None = None  # overrides the driver's list (tests of violations)
    cgroup_root: Path = Path("/sys/fs/cgroup")
    network: bool = True  # a tap in the instance's own netns behind nftables default-deny (False: no NIC)
    egress: tuple[EgressRule, ...] = ()  # TCP destinations the guest may reach, through `uplink`
    uplink: str | None = None  # the node's uplink namespace (QVM_EGRESS_NETNS)
    volume_mib: int = 0  # an encrypted (LUKS2, opened in the guest) data volume at /data; 0: none, else >= 16
    volume_timeout_s: float = 300.0  # format, open, mkfs and mount in the guest
    vfio_devices: tuple[str, ...] = ()  # the job's GPUs, already bound to vfio-pci (isolation.gpus)


def boot_breakdown(boot_ms: float, vmm_start_ms: float, stamps: Mapping[str, float],
                   accel_probe_ms: float = 0.0) -> BootBreakdown | None:
    """Split a boot (VMM start to READY, host clock) by the guest init's stamps (guest uptime, seconds). What
    the guest's clock cannot see (before its kernel started, and READY's trip to the host) is the VMM's start
    plus the firmware's share; the stages after follow the stamps, so the parts add up to `boot_ms`."""
    if "ready" not in stamps:
        return None  # an init from before the stamps
    guest_ms = stamps["ready"] * 1000
    firmware = max(0.0, boot_ms - vmm_start_ms - guest_ms)
    parts: dict[str, float] = {"accel_probe_ms": min(accel_probe_ms, vmm_start_ms),
                               "vmm_start_ms": max(0.0, vmm_start_ms - accel_probe_ms), "firmware_ms": firmware}
    before = 0.0
    for stage, field_name in zip(BOOT_STAGES, _STAGE_FIELDS, strict=True):
        at = stamps.get(stage, before)
        parts[field_name] = max(0.0, (at - before) * 1000)
        before = at
    return BootBreakdown(**{k: round(v, 1) for k, v in parts.items()})


_STAGE_FIELDS = ("kernel_ms", "modules_ms", "channel_ms", "disks_ms", "scratch_ms", "mkfs_ms", "overlay_ms",
                 "ready_ms")
"""BootBreakdown's field for each of the guest's BOOT_STAGES (the time up to that stage's stamp)."""


@dataclass
class Instance:
    spec: InstanceSpec
    workdir: Path
    vmm: Vmm
    trusted_publishers: dict[str, object]
    state: VmState = VmState.CREATED
    manifest: ImageManifest | None = None
    vm: VmProcess | None = None
    boot_ms: float = 0.0
    boot_breakdown: BootBreakdown | None = None  # set by launch() when the guest init sent its stamps
    runtime_ms: float = 0.0
    on_state: Callable[[VmState], None] | None = None
    _key: x25519.X25519PrivateKey = field(default_factory=x25519.X25519PrivateKey.generate, repr=False)
    _files: list[BinaryIO] = field(default_factory=list, repr=False)
    _memfd: int | None = field(default=None, repr=False)
    cgroup: VmCgroup | None = None
    net: InstanceNetwork | None = None
    timings: dict[str, float] = field(default_factory=dict)
    volume_uuid: str | None = None  # the LUKS UUID the guest reported
    volume_erasure: VolumeErasure | None = None  # set by destroy() for an instance with a volume
    ram_scrub: MemoryScrub | None = None  # set by destroy(): the guest RAM's wipe
    secrets_delivered: list[str] = field(default_factory=list)  # names only
    _volume: Path | None = field(default=None, repr=False)
    _run_started: bool = field(default=False, repr=False)
    _secret_bytes: int = field(default=0, repr=False)
    _channel_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    # ------------------------------------------------------------ state machine
    def _to(self, new: VmState) -> None:
        if new not in _NEXT[self.state]:
            raise InstanceError("illegal_state", f"{self.state} -> {new}")
        self.state = new
        if self.on_state:
            self.on_state(new)

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def cvm_kind(self) -> CvmKind | None:
        """The confidential-VM technology of this instance's VMM (a `QemuConfidential` driver), or None."""
        kind = getattr(self.vmm, "cvm_kind", None)
        return CvmKind(kind) if kind else None

    async def cvm_report(self, report_data: bytes) -> CvmReport:
        """The guest's hardware report over `report_data`. Only the instance gate asks, while the instance
        waits for its verdict (booted, READY, no workload yet), so nothing else talks on the channel."""
        if self.cvm_kind is None or not hasattr(self, "_channel") or self.state is not VmState.RUNNING:
            raise InstanceError("cvm_report_unavailable", f"instance {self.spec.instance_id} is not a confidential "
                                                          f"VM ready to report (state {self.state})")
        try:
            return await asyncio.wait_for(self._channel.cvm_report(report_data), self.spec.boot_timeout_s)
        except TimeoutError:
            raise InstanceError("cvm_report_timeout", "the guest gave no report in time") from None
        except ChannelError as exc:
            raise InstanceError("cvm_report_failed", f"{exc.reason}: {exc.detail}"[:500]) from None

    def open_sealed(self, sealed: bytes, purpose: str) -> bytearray:
        """Open a release sealed (HPKE) to this instance's key, bound to `purpose` ("dek" or
        "client-secrets"), the job id and the instance id; a `CryptoError` otherwise. Blocking (run it with
        `asyncio.to_thread`). The result is the caller's to wipe; the AEAD library's own immutable return
        value is copied out and dropped at once (it cannot be overwritten)."""
        plain = hpke.open_sealed(sealed, self._key, hpke.release_info(purpose, self.spec.job_id,
                                                                          self.spec.instance_id))
        out = bytearray(plain)
        del plain
        return out

    def boots_elf(self) -> bool:
        """Whether the VMM boots the image's ELF vmlinux rather than its bzImage: always for Firecracker and
        Cloud Hypervisor; for QEMU (`pvh`) whenever the image ships one, since its PVH entry skips the
        kernel's real-mode setup and self-decompression (~0.3 s of a TCG boot). The measured launch names
        the one booted."""
        assert self.manifest is not None
        return self.manifest.vmlinux is not None and (self.vmm.elf_kernel or getattr(self.vmm, "pvh", False))

    def guest_cmdline(self) -> str:
        """The kernel command line the VMM gets (measured before launch)."""
        assert self.manifest is not None
        return self.manifest.cmdline + (f" {guest_net_arg()}" if self.spec.egress and self.spec.network else "")

    # ------------------------------------------------------------ steps
    async def verify(self) -> ImageManifest:
        """Check the bundle (signature, digests) through descriptors that stay open for the launch."""
        t0 = time.monotonic()
        try:
            manifest, files = await asyncio.to_thread(verify_open, self.spec.bundle, self.trusted_publishers)
            self.timings["verify_ms"] = (time.monotonic() - t0) * 1000
        except ImageError as exc:
            self._to(VmState.FAILED)
            raise InstanceError(f"image_{exc.reason}", exc.detail) from None
        self._files = files
        self.manifest = manifest
        self._to(VmState.VERIFIED)
        return manifest

    async def launch(self) -> None:
        assert self.manifest is not None
        t0 = time.monotonic()
        if self.spec.volume_mib and self.spec.volume_mib < MIN_VOLUME_MIB:
            self._to(VmState.FAILED)
            raise InstanceError("volume_too_small", f"a data volume needs at least {MIN_VOLUME_MIB} MiB "
                                                    f"(asked: {self.spec.volume_mib})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        scratch = self.workdir / SCRATCH_FILE
        if self.spec.volume_mib:
            self._volume = self.workdir / VOLUME_FILE
        # The disks and the network namespace are independent subprocess work: prepare them together.
        results = await asyncio.gather(
            asyncio.to_thread(_make_disks, scratch, self.spec.scratch_mib, self._volume, self.spec.volume_mib),
            InstanceNetwork.create(self.spec.instance_id, self.spec.egress, self.spec.uplink) if self.spec.network
            else _none(),
            return_exceptions=True)
        if isinstance(results[1], InstanceNetwork):
            self.net = results[1]
        for result in results:
            if isinstance(result, BaseException):
                self._to(VmState.FAILED)
                if isinstance(result, ReasonedError):
                    raise InstanceError(result.reason, result.detail) from None
                raise result
        if self.spec.cgroups:
            try:
                self.cgroup = VmCgroup.create(self.spec.instance_id, self.spec.vcpus, self.spec.memory_mib,
                                              self.spec.cgroup_root)
            except CgroupError as exc:
                self._to(VmState.FAILED)
                raise InstanceError(exc.reason, exc.detail) from None
        allow = (self.spec.seccomp_allow or self.vmm.seccomp_allow) if self.spec.seccomp else None
        confine, to_close = confinement(self.cgroup, self.net, allow)
        if self.vmm.ram_from_agent:  # a memfd with no path: after exit the agent still holds, and scrubs, every page
            self._memfd = os.memfd_create(f"qvm-ram-{self.spec.instance_id}", 0)
            os.ftruncate(self._memfd, self.spec.memory_mib << 20)
        kernel, initrd, rootfs = (f.fileno() for f in self._files[:3])
        if self.vmm.elf_kernel and self.manifest.vmlinux is None:
            self._to(VmState.FAILED)
            raise InstanceError("image_needs_vmlinux", f"{self.vmm.name} boots an ELF kernel; build the image "
                                                       "with --with-vmlinux")
        if self.boots_elf():
            kernel = self._files[3].fileno()
        spec = LaunchSpec(
            instance_id=self.spec.instance_id, workdir=self.workdir, kernel_fd=kernel, initrd_fd=initrd,
            rootfs_fd=rootfs, scratch=scratch,
            cmdline=self.guest_cmdline(),
            vcpus=self.spec.vcpus, memory_mib=self.spec.memory_mib, memory_fd=self._memfd, confine=confine,
            tap=self.net.tap if self.net else None, volume=self._volume, vfio_devices=self.spec.vfio_devices)
        started = time.monotonic()
        try:
            self.vm = await self.vmm.launch(spec)
            self.timings["prepare_ms"] = (started - t0) * 1000
            self.timings["spawn_ms"] = (time.monotonic() - started) * 1000
        except VmmError as exc:
            self._to(VmState.FAILED)
            raise InstanceError(exc.reason, exc.detail) from None
        finally:
            for fd in to_close:
                os.close(fd)
        self._to(VmState.BOOTING)
        assert self.vm.channel is not None
        self._channel = await GuestChannel.open(self.vm.channel)
        self.vm.channel = None  # the channel's stream owns the socket now
        try:
            stamps = await asyncio.wait_for(self._ready_or_exit(), self.spec.boot_timeout_s)
        except TimeoutError:
            await self._fail("boot_timeout", f"no READY from the guest within {self.spec.boot_timeout_s:g}s")
        self.boot_ms = (time.monotonic() - started) * 1000
        self.boot_breakdown = boot_breakdown(self.boot_ms, self.timings["spawn_ms"], stamps, self.vm.accel_probe_ms)
        self._to(VmState.RUNNING)

    async def _ready_or_exit(self) -> dict[str, float]:
        assert self.vm is not None
        try:
            return await self._channel.wait_ready(shared=self.vmm.shared_channel)
        except ChannelError as exc:
            await asyncio.sleep(0.2)
            await self._fail(exc.reason, exc.detail + _console_tail(self.workdir))

    def _before_run(self, what: str) -> None:
        if self.state is not VmState.RUNNING or self._run_started:
            raise InstanceError("illegal_state", f"{what} only while the guest waits for its workload "
                                                 f"(state {self.state}{', run started' if self._run_started else ''})")

    async def unlock_volume(self, dek: bytearray) -> str:
        """Give the guest its data-encryption key (32 bytes, over the channel only); the guest formats its
        volume as LUKS2 with it, opens it and mounts it at /data. Returns the LUKS UUID. The caller keeps
        and wipes `dek`; the channel zeroes the frame it built from it."""
        self._before_run("unlock_volume")
        if self._volume is None:
            raise InstanceError("no_volume", "this instance has no data volume (volume_mib=0)")
        if self.volume_uuid is not None:
            raise InstanceError("illegal_state", "the volume is already open")
        try:
            check_key(dek)
        except ChannelError as exc:
            raise InstanceError(exc.reason, exc.detail) from None
        started = time.monotonic()
        async with self._channel_lock:
            try:
                uuid = await asyncio.wait_for(self._channel.open_volume(dek), self.spec.volume_timeout_s)
            except TimeoutError:
                await self._fail("volume_failed", f"the guest did not open its volume within "
                                                  f"{self.spec.volume_timeout_s:g}s")
            except ChannelError as exc:
                await self._fail("volume_failed", f"{exc.reason}: {exc.detail}")
        self.timings["volume_ms"] = (time.monotonic() - started) * 1000
        self.volume_uuid = uuid
        return uuid

    async def deliver_secrets(self, files: Mapping[str, bytes]) -> None:
        """Write the client's secret files into the guest's tmpfs (/run/secrets/<name>, never on a disk).
        Every name and size is checked before the first one is sent."""
        self._before_run("deliver_secrets")
        if len(files) + len(self.secrets_delivered) > MAX_SECRET_FILES:
            raise InstanceError("secrets_too_many", f"{len(files) + len(self.secrets_delivered)} files "
                                                    f"(at most {MAX_SECRET_FILES})")
        total = 0
        try:
            for name, data in files.items():
                check_secret(name, data)
                total += len(data)
        except ChannelError as exc:
            raise InstanceError(exc.reason, exc.detail) from None
        if total + self._secret_bytes > MAX_SECRETS_BYTES:
            raise InstanceError("secret_too_large", f"{total + self._secret_bytes} bytes of secrets (at most "
                                                    f"{MAX_SECRETS_BYTES} in all)")
        started = time.monotonic()
        async with self._channel_lock:
            for name, data in files.items():
                try:
                    await asyncio.wait_for(self._channel.put_secret(name, data), self.spec.boot_timeout_s)
                except TimeoutError:
                    await self._fail("secret_rejected", f"{name}: no answer from the guest")
                except ChannelError as exc:
                    await self._fail("secret_rejected", f"{name}: {exc.reason}: {exc.detail}")
                self.secrets_delivered.append(name)
                self._secret_bytes += len(data)
        self.timings["secrets_ms"] = (time.monotonic() - started) * 1000

    async def run(self, on_output: Callable[[bytes], Awaitable[None]] | None = None) -> RunOutput:
        """Run the job's command in the guest; returns its exit code and output (streamed to `on_output`)."""
        script = shlex.join(self.spec.command) if self.spec.command else "true"
        self._run_started = True
        started = time.monotonic()
        try:
            async with self._channel_lock:
                out = await asyncio.wait_for(self._channel.run(script, on_output), self.spec.run_timeout_s)
        except TimeoutError:
            await self._fail("run_timeout", f"workload ran past {self.spec.run_timeout_s:g}s")
        except ChannelError as exc:
            await asyncio.sleep(0.2)  # let the VMM flush the console before reading its tail
            await self._fail(exc.reason, exc.detail + _console_tail(self.workdir))
        self.runtime_ms = (time.monotonic() - started) * 1000
        self._to(VmState.EXITED)
        if self.vm is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.vm.wait(), 15.0)  # the guest powers off by itself
        return out

    async def _fail(self, reason: str, detail: str) -> NoReturn:
        if self.vm is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.vm.wait(), 0.5)
            if self.vm.proc.returncode == -int(VIOLATION_SIGNAL):
                reason, detail = "seccomp_violation", "the VMM made a syscall outside its allow-list (audit log)"
        if self.state not in (VmState.FAILED, VmState.DESTROYED):
            self._to(VmState.FAILED)
        raise InstanceError(reason, detail)

    async def destroy(self) -> list[str]:
        """Stop the VMM, close every descriptor, wipe and remove what the instance held. Idempotent."""
        return (await self.tear_down()).removed

    async def tear_down(self, gpus: teardown.GpuRelease | None = None) -> teardown.Evidence:
        """`destroy()` with its evidence; `gpus`: the job's GPUs to give back and scrub after the VM is gone."""
        remains = teardown.Remains(self.workdir, stop=self._stop_vmm, net=self.net, volume=self._volume,
                                   cgroup=self.cgroup, gpus=gpus)
        evidence = await teardown.tear_down(remains)
        self.net, self._volume, self.cgroup = remains.net, remains.volume, remains.cgroup  # what is left, if any
        if evidence.ram is not None:
            self.ram_scrub = evidence.ram
        if evidence.volume is not None:
            self.volume_erasure = evidence.volume
        if self.state is not VmState.DESTROYED:
            if self.state in (VmState.CREATED, VmState.VERIFIED, VmState.EXITED, VmState.FAILED):
                self._to(VmState.DESTROYED)
            else:
                self.state = VmState.DESTROYED  # torn down mid-flight (cancellation, agent stop)
        return evidence

    async def _stop_vmm(self) -> teardown.Stopped:
        """The sequence's first step for a live instance: the VMM stopped, the channel and the image's
        descriptors closed, the guest RAM's memfd handed over for its scrub."""
        removed: list[str] = []
        if self.vm is not None:
            if self.vm.proc.returncode is None:
                removed.append(f"vmm:{self.vm.pid}")
            await self.vmm.stop(self.vm)  # also closes the control channel of a VMM that already exited
        if hasattr(self, "_channel"):
            self._channel.close()
        for f in self._files:
            f.close()
        self._files = []
        ram_fd, self._memfd = self._memfd, None
        return teardown.Stopped(tuple(removed), ram_fd, self.vm.volume_erasure if self.vm is not None else None)


async def _none() -> None:
    return None


def _make_disks(scratch: Path, scratch_mib: int, volume: Path | None, volume_mib: int) -> None:
    try:  # sparse and empty: the guest encrypts it under a key of its own and formats it inside
        with open(scratch, "wb") as f:
            f.truncate(scratch_mib << 20)
    except OSError as exc:
        raise InstanceError("scratch_failed", f"cannot create the scratch disk: {exc}") from None
    if volume is not None:
        try:
            make_volume(volume, volume_mib)  # sparse and empty: the guest formats it (LUKS2) itself
        except OSError as exc:
            raise InstanceError("volume_failed", f"cannot create the volume file: {exc}") from None


def _console_tail(workdir: Path) -> str:
    """The end of the guest console and of the VMM's own errors, for a failure report (no secrets there)."""
    parts = []
    for name in ("console.log", "vmm.log"):
        try:
            tail = (workdir / name).read_text(errors="replace")[-300:].strip()
        except OSError:
            continue
        if tail:
            parts.append(f"{name}: {tail}")
    return f" ({'; '.join(parts)})" if parts else ""
