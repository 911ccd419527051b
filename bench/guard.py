"""10. The eBPF runtime guard: its cost on a VMM (boot to READY and a syscall-heavy guest workload, with and
without the guard watching it) and the time from an offending syscall to the job's VMM stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from bench.common import Figure, say, section
from services.node_agent.guard import RuntimeGuard, available, build_guard
from services.node_agent.instance import Instance, InstanceSpec
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from shared.image.build import BuildRequest, build_image, guest_kernel
from shared.image.manifest import generate_publisher_key, load_public_keys

__all__ = ["run"]

OVERHEAD_TARGET = 1.05  # with / without: <= 5 %
STOP_TARGET_MS = 100.0
RUNS = 3
TRIES = 30
# a syscall-heavy guest workload: small file writes and reads in the guest (each disk round trip exits to the VMM)
WORKLOAD = ("sh", "-c", "i=0; while [ $i -lt 600 ]; do echo $i > /tmp/f; cat /tmp/f > /dev/null; i=$((i+1)); done")


async def _boot_and_work(images: Path, keys: dict[str, object], tmp: Path, guard: RuntimeGuard | None,
                         i: int) -> tuple[float, float]:
    inst = Instance(InstanceSpec(f"guard-{i}", "bench", images / "bench", WORKLOAD, memory_mib=256),
                    tmp / f"inst-{'g' if guard else 'n'}-{i}", QemuMicrovm(), keys)
    try:
        await inst.verify()
        t0 = time.perf_counter()
        await inst.launch()
        boot = (time.perf_counter() - t0) * 1000
        assert inst.vm is not None
        if guard is not None:
            await guard.watch(inst.spec.instance_id, inst.vm.pid, [])
        t1 = time.perf_counter()
        out = await inst.run()
        assert out.exit_code == 0
        work = (time.perf_counter() - t1) * 1000
    finally:
        if guard is not None:
            await guard.unwatch(inst.spec.instance_id)
        await inst.destroy()
    return boot, work


async def _stop_latency(guard: RuntimeGuard) -> list[float]:
    """A stand-in VMM (a sleeping child) watched; a host process opens its /proc/<pid>/mem, stamping the time
    just before the syscall; the finding arrives, the agent's answer kills the VMM: syscall -> VMM reaped."""
    out = []
    for i in range(TRIES):
        vmm = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
        await guard.watch(f"stop-{i}", vmm.pid, [])
        peek = await asyncio.create_subprocess_exec(
            sys.executable, "-c", f"import time; print(time.monotonic_ns(), flush=True); open('/proc/{vmm.pid}/mem')",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        pid = vmm.pid
        await guard.next_finding("host_ptrace_vmm", lambda f: f.target_pid == pid, timeout_s=10)  # noqa: B023 - awaited here
        os.kill(vmm.pid, signal.SIGKILL)  # what InstanceRuntime.stop_for ends in: the VMM stopped
        await vmm.wait()
        stopped = time.monotonic_ns()
        assert peek.stdout is not None
        t_syscall = int((await peek.stdout.readline()).strip() or 0)
        await peek.wait()
        await guard.unwatch(f"stop-{i}")
        if t_syscall:
            out.append((stopped - t_syscall) / 1e6)
    return out


async def run(tmp: Path) -> list[Figure]:
    section(
        "10. Runtime guard (eBPF)",
        f"QEMU microvm booted {RUNS} times without and {RUNS} times with the guard loaded and watching the VMM "
        "(boot = Instance.launch to the guest's READY; workload = 600 write+read rounds of a small file in the "
        "guest, RUN -> EXIT), medians, with/without; stop latency: a host process opens a watched stand-in "
        f"VMM's /proc/<pid>/mem, {TRIES} tries: its clock just before the syscall -> the finding in the agent's "
        "process -> the VMM killed and reaped (the bus events after it are not counted)",
    )
    mode, why = available()
    if mode is None:
        say(f"  skipped: {why}")
        return [Figure("runtime guard", None, "", note=why[:100])]
    say(f"  mode: {mode} ({why})")
    images = tmp / "images"
    priv, pub = generate_publisher_key(images)
    root = tmp / "root"
    root.mkdir()
    build_image(BuildRequest(name="bench", out=images / "bench", kernel=guest_kernel(), publisher_key=priv,
                             rootfs_dir=root, with_busybox=True))
    keys: dict[str, object] = dict(load_public_keys([pub]))
    guard = await RuntimeGuard.start(build_guard())
    try:
        plain = [await _boot_and_work(images, keys, tmp, None, i) for i in range(RUNS)]
        watched = [await _boot_and_work(images, keys, tmp, guard, i) for i in range(RUNS)]
        stops = await _stop_latency(guard)
    finally:
        await guard.close()
    boot_plain, boot_watched = statistics.median(b for b, _ in plain), statistics.median(b for b, _ in watched)
    work_plain, work_watched = statistics.median(w for _, w in plain), statistics.median(w for _, w in watched)
    boot, work = boot_watched / boot_plain, work_watched / work_plain
    stops.sort()
    figs = [
        Figure(f"guard overhead: boot to READY, with/without ({mode})", boot, "x", OVERHEAD_TARGET,
               note=f"{boot_plain:.0f} -> {boot_watched:.0f} ms (loaded during the boot; it watches the VMM once "
                    "started)"),
        Figure(f"guard overhead: syscall-heavy guest workload, with/without ({mode})", work, "x", OVERHEAD_TARGET,
               note=f"{work_plain:.0f} -> {work_watched:.0f} ms"),
        Figure("offending syscall -> VMM stopped, p50", stops[len(stops) // 2] if stops else None, "ms",
               STOP_TARGET_MS, note=f"p90 {stops[int(len(stops) * 0.9)]:.1f} ms, {len(stops)} tries" if stops else ""),
    ]
    for f in figs:
        say(f.line())
    return figs
