"""One GPU opened for the VRAM operations in `gpu.vram`: a fresh context, the kernels (`gpu.ptx`) loaded and
warmed up, free memory claimed in chunks, counts taken on the GPU, the kernels self-tested, everything
freed again. `gpu.vram` decides what to do with the memory (scrub, fill, survey) and what the evidence
says; this module only drives the device.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.node_agent.gpu.cuda import CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, CudaDriver, CudaError
from services.node_agent.gpu.ptx import KERNELS, PTX
from shared.telemetry import get_logger

__all__ = ["BLOCK_THREADS", "SELFTEST_BYTES", "Chunk", "Session", "resolve_device"]

log = get_logger("qvm.node_agent.gpu.vram")  # one logger for all VRAM work, as before the split

BLOCK_THREADS = 256
BLOCKS_PER_SM = 8  # 8 x 256 threads: one full wave on every SM since Maxwell
SELFTEST_BYTES = 4097 * 16  # an odd number of 16-byte units, so the kernels' tail loops are exercised
_SELFTEST_BYTE = 0xA5
_SELFTEST_PATTERN = 0x0123456789ABCDEF


@dataclass(frozen=True)
class Chunk:
    ptr: int
    size: int


class Session:
    """One device, one context, the kernels loaded and warmed up, a counter buffer and a scratch buffer (for
    the self-test), both whole granules (`min_chunk_bytes`) so no one else's data shares their pages.

    Everything the claim needs on the device is set up before the claim: after it, the device is full, and
    lazy module loading (the default since CUDA 12.2) would fail at the first launch.
    """

    def __init__(self, drv: CudaDriver, dev: int, block_threads: int) -> None:
        self.drv = drv
        self.dev = dev
        self.block_threads = block_threads
        self.uuid = drv.device_uuid(dev)
        self.pci_bus_id = drv.device_pci_bus_id(dev)
        self.name = drv.device_name(dev)
        self.total = drv.device_total_mem(dev)
        self.max_blocks = max(1, drv.device_attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev) * BLOCKS_PER_SM)
        self.ctx: Any = None
        self.module: Any = None
        self.functions: dict[str, Any] = {}
        self.free_at_open = 0
        self.slots = 0
        self.counters = Chunk(0, 0)
        self.scratch = Chunk(0, 0)
        self.live: list[Chunk] = []

    @classmethod
    def open(cls, drv: CudaDriver, device: int | str, min_chunk_bytes: int, block_threads: int) -> Session:
        if min_chunk_bytes < 16 or min_chunk_bytes % 16 or not 1 <= block_threads <= 1024:
            raise CudaError("invalid_argument", f"chunk floor {min_chunk_bytes} (a multiple of 16 bytes), "
                                                f"block {block_threads} threads (1..1024)")
        drv.init()
        s = cls(drv, resolve_device(drv, device), block_threads)
        s.ctx = drv.ctx_create(s.dev)
        try:
            s.module = drv.module_load_data(PTX.encode())
            s.functions = {k: drv.module_get_function(s.module, k) for k in KERNELS}
            s.free_at_open, _ = drv.mem_get_info()
            s.slots = s.free_at_open // min_chunk_bytes + 16  # one counter per possible chunk
            s.counters = s.alloc(round_up(8 * s.slots, min_chunk_bytes))
            s.scratch = s.alloc(round_up(SELFTEST_BYTES, min_chunk_bytes))
            for k in KERNELS:  # warm-up: forces the lazy module load while there is room for it
                s.launch(k, s.scratch.ptr, 0, 0, s.counters.ptr)
            drv.ctx_synchronize()
        except BaseException:
            s.close(quiet=True)
            raise
        return s

    def alloc(self, size: int) -> Chunk:
        chunk = Chunk(self.drv.mem_alloc(size), size)
        self.live.append(chunk)
        return chunk

    def launch(self, kernel: str, ptr: int, n16: int, value: int, result: int | None = None) -> None:
        blocks = max(1, min(self.max_blocks, -(-n16 // self.block_threads)))
        args = [ptr, n16, value] + ([] if result is None else [result])
        self.drv.launch(self.functions[kernel], blocks, self.block_threads, args)

    def claim_all(self, chunk_bytes: int, floor: int) -> list[Chunk]:
        """Allocate until the device is full: chunks of `chunk_bytes`, halved on out-of-memory down to
        `floor` (all multiples of `floor`, hence of 16 bytes as the kernels need)."""
        size = max(floor, chunk_bytes // floor * floor)
        chunks: list[Chunk] = []
        while len(chunks) < self.slots - 1:
            ptr = self.drv.try_mem_alloc(size)
            if ptr is None:
                if size == floor:
                    break
                size = max(floor, size // 2 // floor * floor)
                continue
            chunk = Chunk(ptr, size)
            chunks.append(chunk)
            self.live.append(chunk)
        return chunks

    def count(self, kernel: str, chunks: Sequence[Chunk], value: int) -> list[int]:
        """Per-chunk counts from `kernel` (`qvm_count_ne` / `qvm_count_eq` against `value`)."""
        counts: list[int] = []
        for start in range(0, len(chunks), self.slots):
            batch = chunks[start:start + self.slots]
            self.drv.memset_d32(self.counters.ptr, 0, 2 * len(batch))
            for i, c in enumerate(batch):
                self.launch(kernel, c.ptr, c.size // 16, value, self.counters.ptr + 8 * i)
            self.drv.ctx_synchronize()
            raw = self.drv.memcpy_dtoh(self.counters.ptr, 8 * len(batch))
            counts.extend(struct.unpack(f"<{len(batch)}Q", raw))
        return counts

    def selftest(self) -> str:
        """Check the kernels on the scratch buffer with known contents; '' when every answer is right."""
        buf, size, words = self.scratch.ptr, SELFTEST_BYTES, SELFTEST_BYTES // 8
        test = [Chunk(buf, size)]
        d = self.drv
        problems = []

        def expect(what: str, kernel: str, value: int, want: int) -> None:
            got = self.count(kernel, test, value)[0]
            if got != want:
                problems.append(f"{what}: {kernel} counted {got}, expected {want}")

        d.memset_d8(buf, _SELFTEST_BYTE, size)
        expect("all 0xA5", "qvm_count_ne", 0, words)
        expect("all 0xA5", "qvm_count_eq", int.from_bytes(bytes([_SELFTEST_BYTE]) * 8, "little"), words)
        d.memset_d32(buf, 0, size // 4)
        for offset in (0, size // 2 + 3, size - 1):  # first, a middle and the very last byte
            d.memcpy_htod(buf + offset, b"\x01")
        expect("three planted bytes", "qvm_count_ne", 0, 3)
        self.launch("qvm_fill", buf, size // 16, _SELFTEST_PATTERN)
        expect("filled pattern", "qvm_count_eq", _SELFTEST_PATTERN, words)
        d.memset_d32(buf, 0, size // 4)
        expect("zeroed", "qvm_count_ne", 0, 0)
        return "; ".join(problems)

    def release(self, chunks: Sequence[Chunk]) -> None:
        for c in chunks:
            self.drv.mem_free(c.ptr)
            self.live.remove(c)

    def close(self, quiet: bool = False) -> None:
        """Free what is left and destroy the context (which would free it all anyway). With `quiet`, on an
        error path, cleanup failures are logged so the first error is the one raised."""
        steps: list[tuple[str, Any]] = [(f"free {c.ptr:#x}", lambda c=c: self.drv.mem_free(c.ptr))
                                        for c in self.live]
        if self.module is not None:
            steps.append(("unload module", lambda m=self.module: self.drv.module_unload(m)))
        if self.ctx is not None:
            steps.append(("destroy context", lambda c=self.ctx: self.drv.ctx_destroy(c)))
        self.live, self.module, self.ctx = [], None, None
        first: CudaError | None = None
        for name, step in steps:
            try:
                step()
            except CudaError as exc:
                log.warning("vram cleanup step failed", extra={"step": name, "error": str(exc)[:200]})
                first = first or exc
        if first is not None and not quiet:
            raise first


def resolve_device(drv: CudaDriver, device: int | str) -> int:
    """A CUDA device handle from an ordinal, an NVML-style UUID (`GPU-…`) or a PCI bus id."""
    if isinstance(device, int):
        n = drv.device_count()
        if not 0 <= device < n:
            raise CudaError("gpu_not_found", f"CUDA device {device} does not exist ({n} visible)")
        return drv.device(device)
    if device.upper().startswith("GPU-"):
        for i in range(drv.device_count()):
            dev = drv.device(i)
            if drv.device_uuid(dev).lower() == device.lower():
                return dev
        raise CudaError("gpu_not_found", f"no CUDA device has UUID {device}")
    try:
        return drv.device_by_pci_bus_id(device)
    except CudaError as exc:
        raise CudaError("gpu_not_found", f"no CUDA device at PCI {device}: {exc.reason}", exc.code) from exc


def round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule
