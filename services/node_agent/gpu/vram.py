"""Wipe a GPU's free memory after a job, and prove it on the GPU itself; fill and survey it for checks.

Why: VRAM is not cleared between CUDA processes by any documented guarantee, and none of the GPU
marketplaces documents a scrub (see the reference notes): whatever a job leaves in device memory may be
handed to the next tenant's first `cudaMalloc`. The node-agent therefore claims all free VRAM itself,
zeroes it and checks it before the GPU takes another job.

How (`scrub_vram`): cuInit, the device (by ordinal, UUID or PCI bus id: NVML and CUDA ordinals can differ,
so callers pass the UUID NVML reported), a fresh context, the PTX kernels (`gpu.ptx`), their self-test,
then all free memory claimed in chunks (a chunk that does not fit is halved, down to a floor, so all but
less than one floor of free memory is claimed), each chunk zeroed with cuMemsetD32, then every 8-byte word
of every chunk counted on the GPU by a kernel (`qvm_count_ne` against 0) with one counter per chunk: not a
sample, and a chunk the memset missed is named in the evidence. Then everything is freed and the context
destroyed. The kernels' own answers are checked first on a buffer with known contents (all 0xA5, three
planted bytes including the last one, a filled pattern, zeros), so a kernel that could not see non-zero
data would fail the self-test rather than certify a dirty GPU.

The scrub's own two buffers (counters, self-test scratch) are whole granules of the same free memory and
are zeroed too. What it cannot reach: memory other processes hold, the driver's own reservations (including
the context and module of the scrub itself), and the remainder below the chunk floor.
`VramScrub.bytes_scrubbed` against `bytes_total` says how much was covered; it counts only memory that was
claimed, zeroed and verified zero.

`scrub_vram_isolated` runs the same scrub in a fresh process (see its docstring for why a long-lived
agent should prefer it).

`fill_vram` and `survey_vram` exist for `deploy/gpu-check`: fill all free VRAM with an 8-byte pattern (and
optionally keep it claimed so the process exits without freeing it), and claim all free VRAM raw (no
memset) to count, on the GPU, how much of a pattern a new tenant would read.

This module holds the operations and their evidence; the device work under them (context, claim in
chunks, counts on the GPU, the kernels' self-test, release) is `gpu.session`, the kernels' text `gpu.ptx`.
All of it is blocking driver work: the node-agent calls it off the event loop, on one thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.node_agent.gpu.cuda import CudaDriver, CudaError, load_libcuda
from services.node_agent.gpu.session import BLOCK_THREADS, Session
from shared.models import VramScrub
from shared.telemetry import get_logger

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "SCRUB_METHOD",
    "ScrubReport",
    "VramFill",
    "VramSurvey",
    "fill_vram",
    "scrub_vram",
    "scrub_vram_isolated",
    "scrub_vram_report",
    "survey_vram",
]

log = get_logger("qvm.node_agent.gpu.vram")

SCRUB_METHOD = "cuda-memset-verify"
DEFAULT_CHUNK_BYTES = 1 << 30
MIN_CHUNK_BYTES = 2 << 20  # the driver's large-page granularity: smaller chunks would not claim more


@dataclass(frozen=True)
class ScrubReport:
    """The evidence (`scrub`) plus what an operator or the check script wants to see behind it."""

    scrub: VramScrub
    device_name: str
    bytes_free: int  # free when the claim began (after this scrub's own context and buffers)
    chunks: int
    bytes_unclaimed: int
    nonzero_words: int
    bad_chunks: tuple[tuple[int, int, int], ...]  # (chunk index, size, non-zero words after the memset)
    selftest_problem: str  # "" when the kernels answered every self-test correctly
    setup_ms: float
    claim_ms: float
    zero_ms: float
    verify_ms: float
    release_ms: float

    @property
    def zero_verify_gbps(self) -> float:
        """GB/s of zeroing plus verifying alone (no allocation, context or module time)."""
        s = (self.zero_ms + self.verify_ms) / 1000
        return self.scrub.bytes_scrubbed / 1e9 / s if s > 0 else 0.0


@dataclass(frozen=True)
class VramFill:
    """All free VRAM filled with `pattern`, and counted back on the GPU (the kernels' positive control)."""

    gpu_uuid: str
    bytes_free: int
    bytes_filled: int
    chunks: int
    pattern: int
    pattern_words: int  # words equal to the pattern afterwards: bytes_filled / 8 when the fill worked
    nonzero_words: int  # words not zero afterwards: the same number for a non-zero pattern
    duration_ms: float
    released: bool  # False: still claimed, freed only when the process exits

    @property
    def ok(self) -> bool:
        words = self.bytes_filled // 8
        return self.bytes_filled > 0 and self.pattern_words == words and (
            self.pattern == 0 or self.nonzero_words == words)


@dataclass(frozen=True)
class VramSurvey:
    """What a new tenant's raw allocations of all free VRAM contain: pattern and non-zero words, counted on
    the GPU, and the first bytes of the first chunk that holds anything."""

    gpu_uuid: str
    bytes_free: int
    bytes_claimed: int
    chunks: int
    pattern: int
    pattern_words: int
    nonzero_words: int
    sample: bytes
    duration_ms: float


def scrub_vram(device: int | str, lib: Any = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               min_chunk_bytes: int = MIN_CHUNK_BYTES, block_threads: int = BLOCK_THREADS) -> VramScrub:
    """Claim, zero and verify all free memory of `device` (CUDA ordinal, `GPU-…` UUID or PCI bus id).

    `lib`: the libcuda object (default: load `libcuda.so.1`). Raises `CudaError` (a `ReasonedError`) when
    the driver fails; a scrub that ran but found non-zero memory returns `verified=False` with the reason.
    """
    return scrub_vram_report(device, lib, chunk_bytes, min_chunk_bytes, block_threads).scrub


def scrub_vram_report(device: int | str, lib: Any = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                      min_chunk_bytes: int = MIN_CHUNK_BYTES, block_threads: int = BLOCK_THREADS) -> ScrubReport:
    """`scrub_vram` with the phase timings and per-chunk findings behind the evidence.

    The scrub's own buffers are whole granules taken from the same free memory, so they are covered too:
    the self-test buffer is zeroed and verified with the chunks, the counter buffer is zeroed last and read
    back to the host (it holds the verification's own answers until then).
    """
    t0 = time.monotonic()
    with _session(lib, device, min_chunk_bytes, block_threads) as s:
        selftest = s.selftest()
        t1 = time.monotonic()
        chunks = [s.scratch, *s.claim_all(chunk_bytes, min_chunk_bytes)]
        t2 = time.monotonic()
        for c in chunks:
            s.drv.memset_d32(c.ptr, 0, c.size // 4)
        s.drv.ctx_synchronize()
        t3 = time.monotonic()
        counts = s.count("qvm_count_ne", chunks, 0)
        s.drv.memset_d32(s.counters.ptr, 0, s.counters.size // 4)
        s.drv.ctx_synchronize()
        counters_zero = s.drv.memcpy_dtoh(s.counters.ptr, s.counters.size) == bytes(s.counters.size)
        t4 = time.monotonic()
        s.release(chunks[1:])
    t5 = time.monotonic()
    free = s.free_at_open
    claimed = sum(c.size for c in chunks) + s.counters.size
    bad = tuple((i, c.size, n) for i, (c, n) in enumerate(zip(chunks, counts, strict=True)) if n)
    scrubbed = sum(c.size for c, n in zip(chunks, counts, strict=True) if n == 0)
    scrubbed += s.counters.size if counters_zero else 0
    verified = not selftest and len(chunks) > 1 and not bad and counters_zero
    duration = t5 - t0
    zv = (t4 - t2) or 1e-9
    problems = []
    if selftest:
        problems.append(f"verify kernel self-test failed: {selftest}")
    if bad:
        problems.append("NOT ZERO after memset: " + ", ".join(
            f"chunk {i} ({_human(size)}): {n} non-zero words" for i, size, n in bad[:4])
            + (f" and {len(bad) - 4} more chunks" if len(bad) > 4 else ""))
    if not counters_zero:
        problems.append("the counter buffer did not read back as zero")
    if len(chunks) == 1:
        problems.append("no free memory could be claimed")
    detail = "; ".join([*problems,
                        f"claimed {_human(claimed)} of {_human(free)} free in {len(chunks) + 1} allocations "
                        f"({_human(max(0, free - claimed))} unclaimed, floor {_human(min_chunk_bytes)}); "
                        f"zero {(t3 - t2) * 1000:.1f} ms + verify {(t4 - t3) * 1000:.1f} ms "
                        f"= {scrubbed / 1e9 / zv:.1f} GB/s"])
    scrub = VramScrub(gpu_uuid=s.uuid[:96], pci_bus_id=s.pci_bus_id[:32], method=SCRUB_METHOD,
                      bytes_total=s.total, bytes_scrubbed=scrubbed, verified=verified,
                      duration_ms=round(duration * 1000, 3),
                      rate_gbps=round(scrubbed / 1e9 / duration, 3) if duration > 0 else 0.0,
                      detail=detail[:512])
    log.info("vram scrubbed" if verified else "vram scrub NOT verified",
             extra={"gpu": s.uuid, "bytes_scrubbed": scrubbed, "bytes_total": s.total, "detail": detail[:300]})
    return ScrubReport(scrub=scrub, device_name=s.name, bytes_free=free, chunks=len(chunks) - 1,
                       bytes_unclaimed=max(0, free - claimed), nonzero_words=sum(counts), bad_chunks=bad,
                       selftest_problem=selftest, setup_ms=(t1 - t0) * 1000, claim_ms=(t2 - t1) * 1000,
                       zero_ms=(t3 - t2) * 1000, verify_ms=(t4 - t3) * 1000, release_ms=(t5 - t4) * 1000)


def scrub_vram_isolated(device: int | str, timeout_s: float = 600.0,
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> VramScrub:
    """`scrub_vram` in a fresh Python process (`python -m services.node_agent.gpu scrub`), for a long-lived
    caller such as the node-agent. Why: CUDA enumerates GPUs once per process, at the first cuInit, so a
    GPU that was on vfio-pci then is invisible to that process for good; a sticky CUDA error (an illegal
    address) poisons the process's contexts; a hung GPU must not hang the agent (`timeout_s`). Raises
    `CudaError`: the child's own reason, `scrub_timeout`, or `scrub_process_failed`."""
    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "services.node_agent.gpu", "scrub", str(device), "--chunk-mib",
           str(max(1, chunk_bytes >> 20))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CudaError("scrub_timeout", f"the scrub of {device} did not finish in {timeout_s:.0f} s") from exc
    except OSError as exc:
        raise CudaError("scrub_process_failed", f"cannot start {sys.executable}: {exc}") from exc
    last = (r.stdout.strip().splitlines() or [""])[-1]
    try:
        data = json.loads(last)
    except ValueError:
        data = None
    if r.returncode == 0 and isinstance(data, dict):
        return VramScrub.model_validate(data)
    if r.returncode == 3 and isinstance(data, dict) and "reason" in data:
        raise CudaError(str(data["reason"])[:64], str(data.get("detail", "")))
    tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
    raise CudaError("scrub_process_failed", f"exit {r.returncode}: {tail}")


def fill_vram(device: int | str, pattern: int, lib: Any = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
              min_chunk_bytes: int = MIN_CHUNK_BYTES, block_threads: int = BLOCK_THREADS,
              release: bool = True) -> VramFill:
    """Fill all free VRAM with the 8-byte little-endian `pattern` and count it back on the GPU.

    `release=False` keeps the memory claimed and the context alive: the caller (a check's child process) then
    exits without freeing anything, the way a job's process ends, and the driver reclaims it on exit.
    """
    t0 = time.monotonic()
    s = Session.open(_driver(lib), device, min_chunk_bytes, block_threads)
    try:
        chunks = [s.scratch, *s.claim_all(chunk_bytes, min_chunk_bytes)]
        for c in chunks:
            s.launch("qvm_fill", c.ptr, c.size // 16, pattern)
        s.drv.ctx_synchronize()
        pattern_words = sum(s.count("qvm_count_eq", chunks, pattern))
        nonzero = sum(s.count("qvm_count_ne", chunks, 0))
        if release:
            s.release(chunks[1:])
    except BaseException:
        s.close(quiet=True)
        raise
    if release:
        s.close()
    return VramFill(gpu_uuid=s.uuid, bytes_free=s.free_at_open, bytes_filled=sum(c.size for c in chunks),
                    chunks=len(chunks), pattern=pattern, pattern_words=pattern_words, nonzero_words=nonzero,
                    duration_ms=(time.monotonic() - t0) * 1000, released=release)


def survey_vram(device: int | str, pattern: int, lib: Any = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                min_chunk_bytes: int = MIN_CHUNK_BYTES, block_threads: int = BLOCK_THREADS) -> VramSurvey:
    """Claim all free VRAM without writing to it and count, on the GPU, the words equal to `pattern` and the
    non-zero words: what a new tenant would read there (all but the survey's own counter buffer)."""
    t0 = time.monotonic()
    with _session(lib, device, min_chunk_bytes, block_threads) as s:
        chunks = [s.scratch, *s.claim_all(chunk_bytes, min_chunk_bytes)]
        matches = s.count("qvm_count_eq", chunks, pattern)
        nonzero = s.count("qvm_count_ne", chunks, 0)
        first = next((c for c, n in zip(chunks, nonzero, strict=True) if n), None)
        sample = s.drv.memcpy_dtoh(first.ptr, min(64, first.size)) if first is not None else b""
        s.release(chunks[1:])
    return VramSurvey(gpu_uuid=s.uuid, bytes_free=s.free_at_open, bytes_claimed=sum(c.size for c in chunks),
                      chunks=len(chunks), pattern=pattern, pattern_words=sum(matches), nonzero_words=sum(nonzero),
                      sample=sample, duration_ms=(time.monotonic() - t0) * 1000)


def _driver(lib: Any) -> CudaDriver:
    return CudaDriver(lib if lib is not None else load_libcuda())


@contextlib.contextmanager
def _session(lib: Any, device: int | str, min_chunk_bytes: int, block_threads: int) -> Iterator[Session]:
    s = Session.open(_driver(lib), device, min_chunk_bytes, block_threads)
    try:
        yield s
    except BaseException:
        s.close(quiet=True)
        raise
    s.close()


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
