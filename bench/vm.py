"""4. Micro VM runtime: image verification rate, agent overhead to VMM start, boot-to-workload time."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from bench.common import Figure, say, section
from services.node_agent.instance import Instance, InstanceSpec
from services.node_agent.vmm.qemu_microvm import QemuMicrovm, detect_accel
from shared.image.build import BuildRequest, build_image
from shared.image.kernel import fetch_kernel
from shared.image.manifest import generate_publisher_key, load_public_keys
from shared.image.verify import verify_bundle
from shared.models import MemoryScrub

__all__ = ["run"]

VERIFY_TARGET_GBS = 1.0
OVERHEAD_TARGET_MS = 50.0
RUNS = 5


async def run(tmp: Path) -> list[Figure]:
    section(
        "4. Micro VM runtime (QEMU microvm)",
        "image: distribution kernel + qvm initramfs + ext4 root holding 256 MiB of random data, signed; "
        "verification = signature + streamed SHA-256 of every part (verify_bundle, median of 3, files in the page "
        "cache); agent overhead = Instance.launch from the verified image to the VMM process started (scratch disk, "
        "netns + tap + nftables, cgroup, memfd RAM, channels, seccomp, exec), median of 5, image hashing "
        "excluded; boot = VMM start to the "
        "guest init's READY, workload = RUN `true` to EXIT, teardown = Instance.destroy after the guest powered off "
        "(guest RAM overwritten and read back, netns, cgroup, work directory), median of 5",
    )
    images = tmp / "images"
    priv, pub = generate_publisher_key(images)
    root = tmp / "root"
    (root / "data").mkdir(parents=True)
    with open(root / "data" / "blob", "wb") as blob:
        for _ in range(64):
            blob.write(os.urandom(4 << 20))
    manifest = build_image(BuildRequest(name="bench", out=images / "bench", kernel=fetch_kernel(),
                                        publisher_key=priv, rootfs_dir=root, with_busybox=True))
    keys = load_public_keys([pub])
    size = sum(p.size for p in manifest.parts())
    secs = []
    for _ in range(3):
        t0 = time.perf_counter()
        verify_bundle(images / "bench", keys)
        secs.append(time.perf_counter() - t0)
    rate = size / statistics.median(secs) / 1e9
    say(f"  image: {size / 1e6:,.0f} MB in {len(manifest.parts())} parts; verification {statistics.median(secs):.3f} s")

    accel, why = await detect_accel(images / "bench" / "vmlinuz")
    overhead, boot, work, teardown = [], [], [], []
    scrubbed = []
    for i in range(RUNS):
        inst = Instance(InstanceSpec(f"bench-{i}", "bench", images / "bench", ("true",), memory_mib=256),
                        tmp / f"inst-{i}", QemuMicrovm(), dict(keys))
        try:
            await inst.verify()
            await inst.launch()
            overhead.append(inst.timings["prepare_ms"] + inst.timings["spawn_ms"])
            boot.append(inst.boot_ms - inst.timings["spawn_ms"])
            out = await inst.run()
            assert out.exit_code == 0
            work.append(inst.runtime_ms)
        finally:
            t0 = time.perf_counter()
            await inst.destroy()
            teardown.append((time.perf_counter() - t0) * 1000)
            if inst.ram_scrub is not None:
                scrubbed.append(inst.ram_scrub)
    figs = [
        Figure("image verification rate", rate, "GB/s", VERIFY_TARGET_GBS, higher_is_better=True,
               note=f"{size / 1e6:,.0f} MB"),
        Figure("agent overhead: verified image -> VMM started", statistics.median(overhead), "ms", OVERHEAD_TARGET_MS,
               note=f"max {max(overhead):.1f} ms"),
        Figure(f"boot to guest READY ({accel})", statistics.median(boot), "ms", note=" ".join(why.split())[:90]),
        Figure(f"workload round trip, RUN `true` -> EXIT ({accel})", statistics.median(work), "ms"),
        Figure("teardown on the node (Instance.destroy)", statistics.median(teardown), "ms",
               note=_scrub_note(teardown, scrubbed)),
    ]
    for f in figs:
        say(f.line())
    return figs


def _scrub_note(teardown: list[float], scrubbed: list[MemoryScrub]) -> str:
    if not scrubbed:
        return f"max {max(teardown):.0f} ms; no RAM scrub reported"
    mib = statistics.median(s.bytes_scrubbed for s in scrubbed) / 2**20
    return (f"max {max(teardown):.0f} ms; guest RAM: {mib:.0f} of 256 MiB held data, overwritten and verified "
            f"({'all' if all(s.verified for s in scrubbed) else 'NOT all'})")
