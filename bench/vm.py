"""4. Micro VM runtime: image verification rate, agent overhead to VMM start, boot to READY with qvm's minimal
guest kernel next to the distribution's cloud kernel (and where the time goes), the minimal kernel's build
time, workload round trip, teardown."""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time
from pathlib import Path

from bench.common import Figure, say, section
from bench.limits import bare_qemu_boot_ms, sha256_in_memory_gbs
from services.node_agent.instance import Instance, InstanceSpec
from services.node_agent.vmm.base import LaunchSpec
from services.node_agent.vmm.qemu_microvm import QemuMicrovm, detect_accel
from shared.events import BootBreakdown
from shared.image.build import BuildRequest, build_image
from shared.image.kernel import fetch_kernel
from shared.image.kernel_build import build_guest_kernel
from shared.image.manifest import ImageManifest, generate_publisher_key, load_public_keys
from shared.image.verify import verify_bundle
from shared.models import MemoryScrub

__all__ = ["run"]

VERIFY_TARGET_RATIO = 0.9  # of hashlib SHA-256 over the same bytes in memory
OVERHEAD_TARGET_MS = 50.0
BOOT_SPEEDUP_TARGET = 3.0  # minimal kernel vs cloud kernel, boot to READY
BOOT_TARGET_RATIO = 1.1  # the agent's launch vs bare QEMU booting the same kernel, initramfs and disks
RUNS = 5
PAIRS = 10  # agent launch and bare QEMU boot, in A-B-B-A order: single TCG boots here vary by +-20 %


async def run(tmp: Path) -> list[Figure]:
    section(
        "4. Micro VM runtime (QEMU microvm)",
        "image: qvm's minimal kernel + qvm initramfs + ext4 root holding 256 MiB of random data, signed; verification"
        " = signature + streamed SHA-256 of every part (verify_bundle, best of 3 as its limit, files in the page "
        "cache); agent overhead = Instance.launch from the verified image to the VMM process started (scratch disk, "
        "netns + tap + nftables, cgroup, memfd RAM, channels, seccomp, exec), median of 10, image hashing excluded; "
        "boot = VMM start to the guest init's READY (as instance.booted reports it, less the VMM's start), median of "
        "10 (5 for the cloud kernel), for the minimal kernel and for the distribution's cloud kernel (a second image,"
        " same init); the agent's launch (verified image to READY: Instance.launch) alternates (A-B-B-A) with a bare "
        "QEMU boot of the same kernel, initramfs, disks and command line (exec to READY, no namespace, cgroup, "
        "seccomp or agent RAM); workload = RUN `true` to EXIT, teardown = Instance.destroy after the guest powered "
        "off (guest RAM overwritten and read back, netns, cgroup, work directory), median of 10",
    )
    t0 = time.perf_counter()
    minimal, build = build_guest_kernel()
    fetched_s = time.perf_counter() - t0
    cloud = fetch_kernel()
    images = tmp / "images"
    priv, pub = generate_publisher_key(images)
    root = tmp / "root"
    (root / "data").mkdir(parents=True)
    with open(root / "data" / "blob", "wb") as blob:
        for _ in range(64):
            blob.write(os.urandom(4 << 20))
    manifest = build_image(BuildRequest(name="bench", out=images / "bench", kernel=minimal,
                                        publisher_key=priv, rootfs_dir=root, with_busybox=True, with_vmlinux=True))
    small = tmp / "small-root"
    (small / "etc").mkdir(parents=True)
    build_image(BuildRequest(name="bench-cloud", out=images / "bench-cloud", kernel=cloud, publisher_key=priv,
                             rootfs_dir=small, with_busybox=True, with_vmlinux=True))
    build_image(BuildRequest(name="bench-cloud-bz", out=images / "bench-cloud-bz", kernel=cloud, publisher_key=priv,
                             rootfs_dir=small, with_busybox=True))
    keys = load_public_keys([pub])
    size = sum(p.size for p in manifest.parts())
    hash_before = sha256_in_memory_gbs([images / "bench" / part.file for part in manifest.parts()])
    secs = []
    for _ in range(3):
        t0 = time.perf_counter()
        verify_bundle(images / "bench", keys)
        secs.append(time.perf_counter() - t0)
    rate = size / min(secs) / 1e9
    hash_limit = (hash_before + sha256_in_memory_gbs([images / "bench" / p.file for p in manifest.parts()])) / 2
    say(f"  image: {size / 1e6:,.0f} MB in {len(manifest.parts())} parts; verification {min(secs):.3f} s (best of 3)")

    accel, why = await detect_accel(images / "bench" / "vmlinuz")
    overhead, boot, work, teardown, launch, bare = [], [], [], [], [], []
    scrubbed = []
    stages: list[BootBreakdown] = []
    cmdline = ""
    for i in range(PAIRS):
        if i % 2 and cmdline:  # every other pair boots bare first, so neither side always goes first
            bare.append(await _bare_boot(images / "bench", manifest, cmdline, accel, tmp / f"bare-{i}"))
        inst = Instance(InstanceSpec(f"bench-{i}", "bench", images / "bench", ("true",), memory_mib=256),
                        tmp / f"inst-{i}", QemuMicrovm(), dict(keys))
        try:
            await inst.verify()
            await inst.launch()
            overhead.append(inst.timings["prepare_ms"] + inst.timings["spawn_ms"])
            boot.append(inst.boot_ms - inst.timings["spawn_ms"])
            launch.append(inst.timings["prepare_ms"] + inst.boot_ms)
            if inst.boot_breakdown is not None:
                stages.append(inst.boot_breakdown)
            out = await inst.run()
            assert out.exit_code == 0
            work.append(inst.runtime_ms)
        finally:
            t0 = time.perf_counter()
            await inst.destroy()
            teardown.append((time.perf_counter() - t0) * 1000)
            if inst.ram_scrub is not None:
                scrubbed.append(inst.ram_scrub)
        if not (i % 2 and cmdline):
            cmdline = inst.guest_cmdline()
            bare.append(await _bare_boot(images / "bench", manifest, cmdline, accel, tmp / f"bare-{i}"))
    cloud_boot, cloud_stages = await _boots(images / "bench-cloud", tmp, dict(keys))
    cloud_bz_boot, _ = await _boots(images / "bench-cloud-bz", tmp, dict(keys))
    say(f"  minimal kernel {minimal.release}: {_stages_text(stages)}")
    say(f"  cloud kernel {cloud.release}: {_stages_text(cloud_stages)}")
    minimal_ms, cloud_ms = statistics.median(boot), statistics.median(cloud_boot)
    figs = [
        Figure("image verification rate", rate, "GB/s", VERIFY_TARGET_RATIO, higher_is_better=True,
               note=f"{size / 1e6:,.0f} MB", limit=hash_limit, limit_of="hashlib SHA-256, same bytes in memory"),
        Figure(f"agent launch: verified image -> READY ({accel})", statistics.median(launch), "ms",
               BOOT_TARGET_RATIO, limit=statistics.median(bare), limit_of="bare QEMU, same kernel+disks",
               note=f"medians of {PAIRS} each, A-B-B-A; the agent's own share is the ratio"),
        Figure("agent overhead: verified image -> VMM started", statistics.median(overhead), "ms", OVERHEAD_TARGET_MS,
               note=f"max {max(overhead):.1f} ms"),
        Figure(f"boot to guest READY, minimal kernel ({accel})", minimal_ms, "ms", note=" ".join(why.split())[:90]),
        Figure(f"boot to guest READY, cloud kernel ({accel})", cloud_ms, "ms", note=f"{cloud.release}, PVH too"),
        Figure(f"boot to guest READY, cloud kernel's bzImage ({accel})", statistics.median(cloud_bz_boot), "ms",
               note="as qvm booted every guest before: real-mode setup and self-decompression"),
        Figure("boot speed-up, minimal vs cloud kernel (both PVH)", cloud_ms / minimal_ms, "x", BOOT_SPEEDUP_TARGET,
               higher_is_better=True, note=f"medians of {RUNS} boots each; same init, RTC, initramfs"),
        Figure("boot speed-up, minimal vs cloud kernel's bzImage", statistics.median(cloud_bz_boot) / minimal_ms, "x",
               BOOT_SPEEDUP_TARGET, higher_is_better=True),
        Figure("minimal kernel build (first time; cached after)", build.build_s, "s",
               note=f"{build.source}, {_kernel_note(fetched_s, build.build_s)}"),
        Figure(f"workload round trip, RUN `true` -> EXIT ({accel})", statistics.median(work), "ms"),
        Figure("teardown on the node (Instance.destroy)", statistics.median(teardown), "ms",
               note=_scrub_note(teardown, scrubbed)),
    ]
    for f in figs:
        say(f.line())
    return figs


async def _bare_boot(bundle: Path, manifest: ImageManifest, cmdline: str, accel: str, workdir: Path) -> float:
    """QEMU started directly with the argv the agent's driver would give it (same kernel, initramfs, root and
    scratch disks, channel, command line), with none of what the agent adds: no network namespace, cgroup,
    seccomp filter or agent-owned RAM. Milliseconds from exec to the guest's READY."""
    workdir.mkdir(parents=True)
    scratch = workdir / "scratch.img"
    with open(scratch, "wb") as f:
        f.truncate(InstanceSpec.scratch_mib << 20)  # the agent's default scratch disk, sparse
    parts = manifest.parts()
    with contextlib.ExitStack() as opened:
        fds = [opened.enter_context(open(bundle / part.file, "rb")).fileno() for part in parts]
        kernel = fds[3] if len(fds) > 3 else fds[0]
        spec = LaunchSpec(instance_id=workdir.name, workdir=workdir, kernel_fd=kernel, initrd_fd=fds[1],
                          rootfs_fd=fds[2], scratch=scratch, cmdline=cmdline, vcpus=1, memory_mib=256)
        control, qmp_end = socket.socketpair()
        channel, guest_end = socket.socketpair()
        opened.callback(control.close)
        opened.callback(qmp_end.close)
        opened.callback(guest_end.close)
        argv = QemuMicrovm().argv(spec, accel, qmp_end.fileno(), guest_end.fileno())
        return await bare_qemu_boot_ms(argv, channel, [*fds, qmp_end.fileno(), guest_end.fileno()])


async def _boots(bundle: Path, tmp: Path, keys: dict[str, object]) -> tuple[list[float], list[BootBreakdown]]:
    """RUNS boots of `bundle` to READY (then torn down): the boot figures and their breakdowns."""
    boot: list[float] = []
    stages: list[BootBreakdown] = []
    for i in range(RUNS):
        inst = Instance(InstanceSpec(f"bench-{bundle.name}-{i}", "bench", bundle, ("true",), memory_mib=256),
                        tmp / f"{bundle.name}-{i}", QemuMicrovm(), keys)
        try:
            await inst.verify()
            await inst.launch()
            boot.append(inst.boot_ms - inst.timings["spawn_ms"])
            if inst.boot_breakdown is not None:
                stages.append(inst.boot_breakdown)
        finally:
            await inst.destroy()
    return boot, stages


def _stages_text(stages: list[BootBreakdown]) -> str:
    """The median of each boot stage, in ms."""
    if not stages:
        return "no breakdown"
    names = list(BootBreakdown.model_fields)
    medians = {n: statistics.median(getattr(b, n) for b in stages) for n in names}
    return ", ".join(f"{n.removesuffix('_ms')} {v:,.0f}" for n, v in medians.items() if v >= 0.5) + " (ms, medians)"


def _kernel_note(fetched_s: float, build_s: float) -> str:
    return "built in this run" if fetched_s >= build_s * 0.5 else f"cached: this run took {fetched_s:.1f} s"


def _scrub_note(teardown: list[float], scrubbed: list[MemoryScrub]) -> str:
    if not scrubbed:
        return f"max {max(teardown):.0f} ms; no RAM scrub reported"
    mib = statistics.median(s.bytes_scrubbed for s in scrubbed) / 2**20
    return (f"max {max(teardown):.0f} ms; guest RAM: {mib:.0f} of 256 MiB held data, overwritten and verified "
            f"({'all' if all(s.verified for s in scrubbed) else 'NOT all'})")
