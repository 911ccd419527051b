"""gpu-check: qvm's VRAM scrub on a real NVIDIA machine, shown end to end, time-boxed.

    .venv/bin/python deploy/gpu-check [--gpu N] [--max-seconds 420] [--chunk-mib 1024] [--json PATH]
    python3 deploy/gpu-check ...        (with qvm's dependencies on PYTHONPATH, e.g. the wheels of
                                         deploy/device/backbone-check.sh installed under /tmp/site)
    python3 -m services.node_agent.gpu.check ...     (the same, from the repository root)

Needs only this repository, its Python dependencies (pydantic, nvidia-ml-py, opentelemetry via
shared.telemetry) and the NVIDIA driver (libnvidia-ml, libcuda): no CUDA toolkit, no numpy, no network.

Sections, for each GPU NVML lists (or only `--gpu N`, an NVML index; CUDA devices are chosen by UUID, since
CUDA's ordinals need not follow NVML's):
  1. fill       a child process claims all free VRAM, fills it with an 8-byte pattern on the GPU, counts
                the pattern back on the GPU (the count kernels' positive control) and exits WITHOUT freeing.
  2. no scrub   a new child claims all free VRAM raw (no memset) and counts, on the GPU, the pattern words
                and non-zero words it can read: what the next tenant would see without a scrub.
  3. scrub      a child runs `scrub_vram` (claim all, zero, verify every word on the GPU, release) and
                reports the evidence, the phase times, GB/s and the ratio to a 1 TB/s target.
  4. after      a new child claims all free VRAM raw again and counts the pattern: it must find 0.
Each step runs in its own process, as tenants do, with a timeout from what is left of --max-seconds.

Exit status: 0 every check passed; 1 a check failed or the time ran out; 2 no GPU to check (no driver).
Findings that are not failures (the driver already cleared memory between processes; the scrub below the
1 TB/s target) are printed as such. With --json (default $OUT/gpu-check.json when $OUT is set) a summary
is written as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[3]  # the repository: each step runs this module from there
MODULE = "services.node_agent.gpu.check"

DEFAULT_PATTERN = 0x214D562D4D5651A5  # in memory (little-endian): a5 51 56 4d 2d 56 4d 21, "\xa5QVM-VM!"
TARGET_GBPS = 1000.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", type=int, action="append", help="NVML index of a GPU to check (repeatable; "
                                                            "default: all)")
    p.add_argument("--max-seconds", type=float, default=420.0, help="time box for the whole check")
    p.add_argument("--chunk-mib", type=int, default=1024, help="allocation chunk size, MiB (halved on OOM)")
    p.add_argument("--pattern", type=lambda s: int(s, 0), default=DEFAULT_PATTERN, help="8-byte fill pattern")
    p.add_argument("--json", default=None, help="write a JSON summary here (default $OUT/gpu-check.json)")
    p.add_argument("--child", choices=["info", "fill", "survey", "scrub"], help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.pattern == 0 or not 0 < a.pattern < 1 << 64:
        p.error("--pattern must be a non-zero 64-bit value")
    if a.child:
        return child(a.child, a.device, a.pattern, a.chunk_mib << 20)
    return parent(a)


# ------------------------------------------------------------------------------------------------- children

def child(kind: str, device: str | None, pattern: int, chunk: int) -> int:
    """One step, in its own process; prints one `RESULT {json}` line. The fill step exits without freeing."""
    from services.node_agent.gpu.cuda import CudaDriver, CudaError, load_libcuda
    from services.node_agent.gpu.vram import fill_vram, scrub_vram_report, survey_vram

    try:
        if kind == "info":
            drv = CudaDriver(load_libcuda())
            drv.init()
            out: dict[str, Any] = {"cuda_driver_version": drv.driver_version(), "devices": []}
            for i in range(drv.device_count()):
                d = drv.device(i)
                out["devices"].append({"ordinal": i, "name": drv.device_name(d), "uuid": drv.device_uuid(d),
                                       "pci_bus_id": drv.device_pci_bus_id(d), "total": drv.device_total_mem(d),
                                       "sms": drv.device_attribute(16, d),
                                       "cc": f"{drv.device_attribute(75, d)}.{drv.device_attribute(76, d)}"})
        elif kind == "fill":
            assert device
            r = fill_vram(device, pattern, chunk_bytes=chunk, release=False)
            emit({**dataclasses.asdict(r), "ok": r.ok})
            os._exit(0)  # no cuMemFree, no context destroy: the process just ends, as a job's would
        elif kind == "survey":
            assert device
            s = survey_vram(device, pattern, chunk_bytes=chunk)
            out = {**dataclasses.asdict(s), "sample": s.sample.hex()}
        else:
            assert device
            rep = scrub_vram_report(device, chunk_bytes=chunk)
            out = {"scrub": rep.scrub.model_dump(), "device_name": rep.device_name, "bytes_free": rep.bytes_free,
                   "chunks": rep.chunks, "bytes_unclaimed": rep.bytes_unclaimed, "bad_chunks": rep.bad_chunks,
                   "selftest_problem": rep.selftest_problem, "zero_verify_gbps": rep.zero_verify_gbps,
                   **{k: getattr(rep, k) for k in ("setup_ms", "claim_ms", "zero_ms", "verify_ms", "release_ms")}}
    except CudaError as exc:
        emit({"error": exc.reason, "detail": exc.detail})
        return 3
    emit(out)
    return 0


def emit(obj: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(obj, default=str), flush=True)


# --------------------------------------------------------------------------------------------------- parent

class Check:
    def __init__(self, max_seconds: float) -> None:
        self.deadline = time.monotonic() + max_seconds
        self.failures: list[str] = []
        self.summary: dict[str, Any] = {"gpus": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"   FAIL: {what}")

    def run_child(self, kind: str, device: str | None, args: argparse.Namespace) -> dict[str, Any] | None:
        left = self.left() - 2
        if left < 5:
            self.fail(f"{kind}: time budget (--max-seconds) exhausted before it could start")
            return None
        cmd = [sys.executable, "-m", MODULE, "--child", kind, "--pattern", hex(args.pattern),
               "--chunk-mib", str(args.chunk_mib)] + (["--device", device] if device else [])
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=ROOT)
        except subprocess.TimeoutExpired:
            self.fail(f"{kind}: timed out after {left:.0f} s (time budget)")
            return None
        wall = time.monotonic() - t0
        result: dict[str, Any] | None = next((json.loads(line[7:]) for line in reversed(r.stdout.splitlines())
                                              if line.startswith("RESULT ")), None)
        if result is None or "error" in result or r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-8:]
            self.fail(f"{kind}: child exited {r.returncode}: {result or ''} {' | '.join(tail)}"[:800])
            return None
        result["_wall_s"] = round(wall, 3)
        return result


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def parent(args: argparse.Namespace) -> int:
    import pynvml

    from services.node_agent.gpu.nvml import read_inventory

    chk = Check(args.max_seconds)
    section("machine")
    print(f"python {sys.version.split()[0]}, pattern {args.pattern:#018x}, chunk {args.chunk_mib} MiB, "
          f"time box {args.max_seconds:.0f} s")
    section("NVML inventory (as the node-agent reads it)")
    gpus = read_inventory(pynvml)
    if not gpus:
        print("no GPU: NVML is not available on this machine (no NVIDIA driver)")
        return 2
    for g in gpus:
        print(json.dumps(g.model_dump(), indent=1))
        notes = [n for cond, n in ((g.remapped_rows_failure, "a row remap FAILED"),
                                   (g.remapped_rows_pending, "a row remap is pending (reset needed)"),
                                   (g.retired_pages_pending, "a page retirement is pending"),
                                   (g.mig_enabled, "MIG is on: a whole-GPU CUDA context cannot be created"),
                                   (g.cc_mode == "devtools", "CC devtools mode: not a trusted CC state"))
                 if cond]
        for n in notes:
            print(f"   note: GPU {g.index}: {n}")
    chk.summary["inventory"] = [g.model_dump() for g in gpus]
    section("CUDA driver (libcuda, through the qvm binding)")
    info = chk.run_child("info", None, args)
    if info is not None:
        print(f"CUDA driver API version {info['cuda_driver_version']}")
        for d in info["devices"]:
            print(f"  CUDA ordinal {d['ordinal']}: {d['name']} {d['uuid']} pci {d['pci_bus_id']} "
                  f"{gib(d['total'])} {d['sms']} SMs cc {d['cc']}")
        chk.summary["cuda"] = info
    selected = [g for g in gpus if args.gpu is None or g.index in args.gpu]
    if not selected:
        print(f"no GPU with NVML index {args.gpu}")
        return 2
    for g in selected:
        chk.summary["gpus"].append(check_gpu(chk, g.index, g.uuid, g.name, args))
    section("summary")
    for s in chk.summary["gpus"]:
        print(f"GPU {s['index']} {s['uuid']}: " + ", ".join(f"{k}={v}" for k, v in s.items()
                                                             if k not in ("index", "uuid", "steps")))
    print("PASS" if not chk.failures else f"FAILED ({len(chk.failures)}): " + "; ".join(chk.failures))
    chk.summary["failures"] = chk.failures
    out = args.json or (os.path.join(os.environ["OUT"], "gpu-check.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(chk.summary, indent=1, default=str))
        print(f"summary written to {out}")
    return 0 if not chk.failures else 1


def check_gpu(chk: Check, index: int, uuid: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    s: dict[str, Any] = {"index": index, "uuid": uuid, "steps": {}}
    word_bytes = args.pattern.to_bytes(8, "little").hex()
    section(f"GPU {index}: {name} {uuid}")

    print(f"-- 1. fill all free VRAM with {word_bytes} (bytes in memory order), exit without freeing")
    fill = chk.run_child("fill", uuid, args)
    s["steps"]["fill"] = fill
    if fill is not None:
        words = fill["bytes_filled"] // 8
        print(f"   free {gib(fill['bytes_free'])}, filled {gib(fill['bytes_filled'])} in {fill['chunks']} "
              f"allocations, {fill['duration_ms']:.0f} ms (process {fill['_wall_s']:.1f} s)")
        print(f"   counted on the GPU: {fill['pattern_words']} pattern words, {fill['nonzero_words']} non-zero "
              f"words, of {words}")
        if not fill["ok"]:
            chk.fail("fill: the GPU counts do not match the fill (count or fill kernel wrong on this GPU)")
        s["filled_gib"] = round(fill["bytes_filled"] / (1 << 30), 2)

    print("-- 2. a new tenant claims all free VRAM raw (no scrub): what can it read?")
    before = chk.run_child("survey", uuid, args)
    s["steps"]["no_scrub"] = before
    if before is not None:
        print(f"   claimed {gib(before['bytes_claimed'])} of {gib(before['bytes_free'])} free; on the GPU: "
              f"{before['pattern_words']} pattern words, {before['nonzero_words']} non-zero words")
        if before["sample"]:
            print(f"   first non-zero bytes: {before['sample'][:64]}")
        if fill is not None and fill["bytes_filled"]:
            share = before["pattern_words"] * 8 / fill["bytes_filled"]
            print(f"   => {share:.1%} of the previous process's pattern is readable by the next one"
                  + ("" if before["pattern_words"] else " (the driver cleared it between processes)"))
            s["leftover_without_scrub"] = f"{share:.1%}"

    print("-- 3. scrub_vram: claim all free VRAM, zero it, verify every word on the GPU, release")
    scrub = chk.run_child("scrub", uuid, args)
    s["steps"]["scrub"] = scrub
    if scrub is not None:
        ev = scrub["scrub"]
        print("   evidence: " + json.dumps(ev))
        print(f"   {scrub['chunks']} chunks, {gib(scrub['bytes_unclaimed'])} unclaimed; "
              f"setup {scrub['setup_ms']:.0f} ms, claim {scrub['claim_ms']:.0f} ms, zero {scrub['zero_ms']:.1f} ms, "
              f"verify {scrub['verify_ms']:.1f} ms, release {scrub['release_ms']:.0f} ms "
              f"(process {scrub['_wall_s']:.1f} s)")
        zv = scrub["zero_verify_gbps"]
        print(f"   zero+verify: {zv:.0f} GB/s = {zv / TARGET_GBPS:.2f} x the {TARGET_GBPS:.0f} GB/s target; "
              f"end to end (context, claim, release included): {ev['rate_gbps']:.0f} GB/s "
              f"= {ev['rate_gbps'] / TARGET_GBPS:.2f} x")
        if zv < TARGET_GBPS:
            print("   note: zero+verify below the 1 TB/s target")
        if not ev["verified"]:
            chk.fail(f"scrub not verified: {ev['detail']}")
        elif scrub["bytes_free"] and ev["bytes_scrubbed"] < 0.95 * scrub["bytes_free"]:
            chk.fail(f"scrub covered only {ev['bytes_scrubbed'] / scrub['bytes_free']:.1%} of free memory")
        s.update(verified=ev["verified"], scrubbed_gib=round(ev["bytes_scrubbed"] / (1 << 30), 2),
                 zero_verify_gbps=round(zv), end_to_end_gbps=round(ev["rate_gbps"]),
                 ratio_to_1tbs=round(zv / TARGET_GBPS, 2))

    print("-- 4. a new tenant claims all free VRAM raw after the scrub: the pattern must be gone")
    after = chk.run_child("survey", uuid, args)
    s["steps"]["after_scrub"] = after
    if after is not None:
        print(f"   claimed {gib(after['bytes_claimed'])}; on the GPU: {after['pattern_words']} pattern words, "
              f"{after['nonzero_words']} non-zero words")
        if after["pattern_words"]:
            chk.fail(f"{after['pattern_words']} pattern words readable after the scrub")
        s["pattern_after_scrub"] = after["pattern_words"]
    return s


if __name__ == "__main__":
    sys.exit(main())
