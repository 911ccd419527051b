"""Fakes at the GPU hardware boundary, for tests on machines without an NVIDIA GPU or driver.

`FakeNvml` stands in for the `pynvml` module: the same function names, arguments and return shapes (the real
pynvml ctypes structures where pynvml returns one), and the real `pynvml.NVMLError_*` classes raised where a
GPU or driver would refuse a query (not supported, uninitialized, no driver).

`FakeLibcuda` stands in for `libcuda.so.1` as `ctypes.CDLL` exposes it: `cu*` functions that take ctypes
values (`c_uint64` device pointers, `c_size_t` sizes, `byref` out-parameters, an array of pointers for kernel
parameters), check their types, write results through the pointers and return CUresult codes. Device memory
is simulated as physical pages (`FakeDevice.physical`, a bytearray) handed out by `cuMemAlloc_v2` without
being cleared, the way VRAM keeps whatever the last owner left; out-of-memory when the free pages run out.
A `FakeDevice` outlives the `FakeLibcuda` instances that use it, so "one process fills VRAM and exits, the
next one allocates it" is two `FakeLibcuda` objects on one device, with `process_exit()` in between.

Kernel launches really look at the simulated bytes. By default (`kernel_mode="semantic"`) the fake runs a
Python model of each of qvm's kernels, found by its entry name and parameters in the PTX it was given. With
`kernel_mode="ptx"` it interprets the PTX itself, instruction by instruction, one thread at a time, over the
launch's real grid: this executes the hand-written kernels' address arithmetic, loop bounds and atomics on
small buffers. Neither replaces a run on a GPU (`deploy/gpu-check`): the driver's JIT, real concurrency and
memory behaviour are not modelled.

Faults to inject: `fail("cuName", code, after=N)` makes a call return `code` from its N+1-th call on;
`fault_memset(ptr, nbytes, call_index) -> bool` makes a memset report success without writing; `missing`
names symbols the library lacks.
"""

from __future__ import annotations

import array
import bisect
import ctypes
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pynvml

# ======================================================================================================= NVML


@dataclass
class FakeNvmlGpu:
    """One GPU as the fake NVML reports it; None for a query this GPU does not support."""

    uuid: str = "GPU-11111111-2222-3333-4444-555555555555"
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total: int = 81559 << 20
    pci_bus_id: str = "00000000:41:00.0"
    vbios: str | None = "96.00.74.00.01"
    ecc: tuple[int, int] | None = (1, 1)  # (current, pending), NVML_FEATURE_ENABLED = 1
    retired_pages: dict[int, list[int]] | None = None  # cause -> page addresses; None: no page retirement
    retired_pending: int | None = None
    remapped_rows: tuple[int, int, int, int] | None = (0, 0, 0, 0)  # corr, unc, pending, failure
    mig: tuple[int, int] | None = (0, 0)
    compute_capability: tuple[int, int] | None = (9, 0)
    lost: bool = False  # identity queries fail with NVMLError_GpuIsLost


@dataclass
class _NvmlHandle:
    index: int


class FakeNvml:
    """The `pynvml` module's surface for the calls qvm makes, over a list of `FakeNvmlGpu`."""

    NVMLError = pynvml.NVMLError

    def __init__(self, gpus: Iterable[FakeNvmlGpu] = (), driver: str | None = "550.54.15",
                 cc_state: tuple[int, int, int] | None = None, cc_gpus_capable: bool | None = None,
                 init_error: type[pynvml.NVMLError] | None = None, missing: Iterable[str] = ()) -> None:
        self.gpus = list(gpus)
        self.driver = driver
        self.cc_state = cc_state  # (environment, ccFeature, devToolsMode); None: not supported
        self.cc_gpus_capable = cc_gpus_capable  # None: capabilities query not supported
        self.init_error = init_error
        self.missing = set(missing)
        self.inits = 0
        self.shutdowns = 0

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml") and name in object.__getattribute__(self, "missing"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    # -- lifecycle --
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error()
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._live()
        self.shutdowns += 1

    def _live(self) -> None:
        if self.inits <= self.shutdowns:
            raise pynvml.NVMLError_Uninitialized()

    def _gpu(self, h: _NvmlHandle) -> FakeNvmlGpu:
        self._live()
        if not isinstance(h, _NvmlHandle) or not 0 <= h.index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        return self.gpus[h.index]

    @staticmethod
    def _supported(v: Any) -> Any:
        if v is None:
            raise pynvml.NVMLError_NotSupported()
        return v

    # -- system --
    def nvmlSystemGetDriverVersion(self) -> str:
        self._live()
        return self._supported(self.driver)  # type: ignore[no-any-return]

    def nvmlSystemGetConfComputeCapabilities(self) -> Any:
        self._live()
        self._supported(self.cc_gpus_capable)
        return pynvml.c_nvmlConfComputeSystemCaps_t(cpuCaps=0, gpusCaps=int(bool(self.cc_gpus_capable)))

    def nvmlSystemGetConfComputeState(self) -> Any:
        self._live()
        env, feature, devtools = self._supported(self.cc_state)
        return pynvml.c_nvmlConfComputeSystemState_t(environment=env, ccFeature=feature, devToolsMode=devtools)

    def nvmlDeviceGetCount(self) -> int:
        self._live()
        return len(self.gpus)

    # -- device identity --
    def nvmlDeviceGetHandleByIndex(self, index: int) -> _NvmlHandle:
        self._live()
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        return _NvmlHandle(index)

    def _identity(self, h: _NvmlHandle) -> FakeNvmlGpu:
        g = self._gpu(h)
        if g.lost:
            raise pynvml.NVMLError_GpuIsLost()
        return g

    def nvmlDeviceGetUUID(self, h: _NvmlHandle) -> str:
        return self._identity(h).uuid

    def nvmlDeviceGetName(self, h: _NvmlHandle) -> str:
        return self._identity(h).name

    def nvmlDeviceGetMemoryInfo(self, h: _NvmlHandle) -> Any:
        total = self._identity(h).memory_total
        return pynvml.c_nvmlMemory_t(total=total, free=total - (500 << 20), used=500 << 20)

    def nvmlDeviceGetPciInfo(self, h: _NvmlHandle) -> Any:
        info = pynvml.nvmlPciInfo_t()
        info.busId = self._identity(h).pci_bus_id.encode()
        return info

    # -- optional queries --
    def nvmlDeviceGetVbiosVersion(self, h: _NvmlHandle) -> str:
        return self._supported(self._gpu(h).vbios)  # type: ignore[no-any-return]

    def nvmlDeviceGetEccMode(self, h: _NvmlHandle) -> list[int]:
        return list(self._supported(self._gpu(h).ecc))

    def nvmlDeviceGetRetiredPages(self, h: _NvmlHandle, cause: int) -> list[int]:
        pages = self._supported(self._gpu(h).retired_pages)
        if cause not in (0, 1):
            raise pynvml.NVMLError_InvalidArgument()
        return list(pages.get(cause, []))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: _NvmlHandle) -> int:
        return self._supported(self._gpu(h).retired_pending)  # type: ignore[no-any-return]

    def nvmlDeviceGetRemappedRows(self, h: _NvmlHandle) -> tuple[int, int, int, int]:
        return self._supported(self._gpu(h).remapped_rows)  # type: ignore[no-any-return]

    def nvmlDeviceGetMigMode(self, h: _NvmlHandle) -> list[int]:
        return list(self._supported(self._gpu(h).mig))

    def nvmlDeviceGetCudaComputeCapability(self, h: _NvmlHandle) -> tuple[int, int]:
        return self._supported(self._gpu(h).compute_capability)  # type: ignore[no-any-return]


# ==================================================================================================== libcuda

CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_INVALID_DEVICE = 101
CUDA_ERROR_INVALID_CONTEXT = 201
CUDA_ERROR_INVALID_PTX = 218
CUDA_ERROR_INVALID_HANDLE = 400
CUDA_ERROR_NOT_FOUND = 500
CUDA_ERROR_ILLEGAL_ADDRESS = 700
CUDA_ERROR_LAUNCH_FAILED = 719
CUDA_ERROR_UNKNOWN = 999
ERROR_NAMES = {
    0: "CUDA_SUCCESS", 1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED", 100: "CUDA_ERROR_NO_DEVICE", 101: "CUDA_ERROR_INVALID_DEVICE",
    201: "CUDA_ERROR_INVALID_CONTEXT", 218: "CUDA_ERROR_INVALID_PTX", 400: "CUDA_ERROR_INVALID_HANDLE",
    500: "CUDA_ERROR_NOT_FOUND", 700: "CUDA_ERROR_ILLEGAL_ADDRESS", 719: "CUDA_ERROR_LAUNCH_FAILED",
    999: "CUDA_ERROR_UNKNOWN",
}
_ERROR_NAME_BYTES = {k: ctypes.create_string_buffer(v.encode()) for k, v in ERROR_NAMES.items()}
_NO_INIT_NEEDED = {"cuInit", "cuGetErrorName", "cuDriverGetVersion"}
_VA_BASE = 0x7F00_0000_0000
M64 = (1 << 64) - 1


class FakeArgumentError(ctypes.ArgumentError):
    """A call received an argument of the wrong ctypes type (what argtypes would refuse on a real CDLL)."""


@dataclass(eq=False)
class _Alloc:
    va: int
    size: int
    pages: list[int]
    owner: FakeLibcuda
    ctx: int


@dataclass(eq=False)
class FakeDevice:
    """One GPU's memory and identity. `reserved` bytes at the start are the driver's own and never handed
    out; the rest is allocated in `page`-byte pages, never cleared by the fake's allocator or free."""

    uuid: bytes = bytes(range(16))
    pci_bus_id: str = "0000:41:00.0"
    name: str = "Fake NVIDIA H100"
    total: int = 32 << 20
    reserved: int = 1 << 20
    page: int = 64 << 10
    sm_count: int = 4
    compute_capability: tuple[int, int] = (9, 0)
    physical: bytearray = field(init=False)
    free_pages: list[int] = field(init=False)
    allocations: dict[int, _Alloc] = field(init=False, default_factory=dict)
    _bases: list[int] = field(init=False, default_factory=list)
    _next_va: int = field(init=False, default=_VA_BASE)

    def __post_init__(self) -> None:
        assert self.total % self.page == 0 and self.reserved % self.page == 0
        self.physical = bytearray(self.total)
        self.free_pages = list(range(self.reserved // self.page, self.total // self.page))

    @property
    def free_bytes(self) -> int:
        return len(self.free_pages) * self.page

    def count_physical(self, word: bytes, include_reserved: bool = False) -> int:
        """Aligned 8-byte words equal to `word` in physical memory (what a scrub should leave none of)."""
        arr = array.array("Q")
        arr.frombytes(bytes(self.physical[0 if include_reserved else self.reserved:]))
        return arr.count(int.from_bytes(word, "little"))

    def fill_free(self, word: bytes) -> None:
        """Write `word` over every free page: a previous tenant's leftovers."""
        for p in self.free_pages:
            self.physical[p * self.page:(p + 1) * self.page] = word * (self.page // len(word))

    # -- allocation and address translation --
    def alloc(self, size: int, owner: FakeLibcuda, ctx: int) -> int | None:
        n = -(-size // self.page)
        if n > len(self.free_pages):
            return None
        pages, self.free_pages = self.free_pages[:n], self.free_pages[n:]
        va = self._next_va
        self._next_va += (n + 1) * self.page  # a guard page between allocations
        self.allocations[va] = _Alloc(va, size, pages, owner, ctx)
        bisect.insort(self._bases, va)
        return va

    def free(self, va: int) -> bool:
        a = self.allocations.pop(va, None)
        if a is None:
            return False
        self._bases.remove(va)
        self.free_pages = sorted(self.free_pages + a.pages)
        return True

    def segments(self, va: int, n: int) -> list[tuple[int, int]] | None:
        """Physical (offset, length) runs backing [va, va+n), or None when that is not inside one allocation."""
        i = bisect.bisect_right(self._bases, va) - 1
        if i < 0 or n < 0:
            return None
        a = self.allocations[self._bases[i]]
        off = va - a.va
        if off + n > a.size:
            return None
        runs: list[tuple[int, int]] = []
        while n > 0:
            page, within = divmod(off, self.page)
            take = min(n, self.page - within)
            phys = a.pages[page] * self.page + within
            if runs and runs[-1][0] + runs[-1][1] == phys:
                runs[-1] = (runs[-1][0], runs[-1][1] + take)
            else:
                runs.append((phys, take))
            off += take
            n -= take
        return runs

    def read(self, va: int, n: int) -> bytes | None:
        runs = self.segments(va, n)
        if runs is None:
            return None
        return b"".join(bytes(self.physical[o:o + k]) for o, k in runs)

    def write(self, va: int, data: bytes) -> bool:
        runs = self.segments(va, len(data))
        if runs is None:
            return False
        pos = 0
        for o, k in runs:
            self.physical[o:o + k] = data[pos:pos + k]
            pos += k
        return True


@dataclass(eq=False)
class _Ctx:
    handle: int
    device: FakeDevice
    reserve: list[int]


@dataclass(eq=False)
class _Module:
    handle: int
    ctx: int
    kernels: dict[str, PtxKernel]


def _target(arg: Any, ctype: type) -> Any:
    """What a `byref(x)` / `pointer(x)` argument points at, checked to be a `ctype`."""
    obj = getattr(arg, "_obj", None)
    if obj is None and isinstance(arg, ctypes._Pointer):
        obj = arg.contents
    if not isinstance(obj, ctype):
        raise FakeArgumentError(f"expected a pointer to {ctype.__name__}, got {arg!r}")
    return obj


def _val(arg: Any, ctype: type) -> Any:
    if not isinstance(arg, ctype):
        raise FakeArgumentError(f"expected {ctype.__name__}, got {arg!r}")
    return arg.value


class FakeLibcuda:
    """One process's libcuda over shared `FakeDevice`s (see the module docstring)."""

    def __init__(self, devices: Iterable[FakeDevice] | None = None, kernel_mode: str = "semantic",
                 fault_memset: Callable[[int, int, int], bool] | None = None, missing: Iterable[str] = (),
                 ctx_reserve: int = 0, driver_version: int = 12040) -> None:
        self.devices = list(devices) if devices is not None else [FakeDevice()]
        self.kernel_mode = kernel_mode
        self.fault_memset = fault_memset
        self.missing = set(missing)
        self.ctx_reserve = ctx_reserve  # bytes a context takes from free memory for itself
        self.driver_version = driver_version
        self.initialized = False
        self.calls: dict[str, int] = {}
        self.failures: dict[str, tuple[int, int]] = {}
        self.contexts: dict[int, _Ctx] = {}
        self.stack: list[int] = []
        self.modules: dict[int, _Module] = {}
        self.functions: dict[int, tuple[int, str]] = {}
        self.memsets = 0
        self.launches: list[tuple[str, int, int, tuple[int, ...]]] = []
        self.executed_instructions = 0
        self._handles = itertools.count(0x1000)

    def fail(self, name: str, code: int, after: int = 0) -> None:
        """Make `name` return `code` once it has been called `after` times (and from then on)."""
        self.failures[name] = (code, after)

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if not name.startswith("cu"):
            return attr
        if name in object.__getattribute__(self, "missing"):
            raise AttributeError(name)
        return object.__getattribute__(self, "_entry")(name, attr)

    def _entry(self, name: str, fn: Callable[..., int]) -> Callable[..., int]:
        def call(*args: Any) -> int:
            n = self.calls.get(name, 0)
            self.calls[name] = n + 1
            if name in self.failures and n >= self.failures[name][1]:
                return self.failures[name][0]
            if name not in _NO_INIT_NEEDED and not self.initialized:
                return CUDA_ERROR_NOT_INITIALIZED
            return fn(*args)
        return call

    def process_exit(self) -> None:
        """The process ends: the driver takes back its contexts and memory without clearing anything."""
        for handle in list(self.contexts):
            self._destroy(handle)
        self.stack.clear()

    # -- helpers --
    def _ctx(self) -> _Ctx | None:
        return self.contexts.get(self.stack[-1]) if self.stack else None

    def _device(self, ordinal: int) -> FakeDevice | None:
        return self.devices[ordinal] if 0 <= ordinal < len(self.devices) else None

    def _destroy(self, handle: int) -> None:
        ctx = self.contexts.pop(handle)
        for va, a in list(ctx.device.allocations.items()):
            if a.owner is self and a.ctx == handle:
                ctx.device.free(va)
        ctx.device.free_pages = sorted(ctx.device.free_pages + ctx.reserve)
        for m in [m for m in self.modules.values() if m.ctx == handle]:
            del self.modules[m.handle]
        if handle in self.stack:
            self.stack.remove(handle)

    # -- driver and devices --
    def cuInit(self, flags: Any) -> int:
        if _val(flags, ctypes.c_uint) != 0:
            return CUDA_ERROR_INVALID_VALUE
        if not self.devices:
            return CUDA_ERROR_NO_DEVICE
        self.initialized = True
        return CUDA_SUCCESS

    def cuDriverGetVersion(self, out: Any) -> int:
        _target(out, ctypes.c_int).value = self.driver_version
        return CUDA_SUCCESS

    def cuGetErrorName(self, code: Any, out: Any) -> int:
        target = _target(out, ctypes.c_char_p)
        buf = _ERROR_NAME_BYTES.get(_val(code, ctypes.c_int))
        if buf is None:
            return CUDA_ERROR_INVALID_VALUE
        target.value = buf.value
        return CUDA_SUCCESS

    def cuDeviceGetCount(self, out: Any) -> int:
        _target(out, ctypes.c_int).value = len(self.devices)
        return CUDA_SUCCESS

    def cuDeviceGet(self, out: Any, ordinal: Any) -> int:
        i = _val(ordinal, ctypes.c_int)
        if self._device(i) is None:
            return CUDA_ERROR_INVALID_DEVICE
        _target(out, ctypes.c_int).value = i
        return CUDA_SUCCESS

    def _string_out(self, buf: Any, length: Any, text: str) -> int:
        if not isinstance(buf, ctypes.Array):
            raise FakeArgumentError(f"expected a char buffer, got {buf!r}")
        n = _val(length, ctypes.c_int)
        data = text.encode()[:max(0, n - 1)] + b"\0"
        if n > len(buf):
            raise FakeArgumentError("length larger than the buffer")
        ctypes.memmove(ctypes.addressof(buf), data, len(data))
        return CUDA_SUCCESS

    def cuDeviceGetName(self, buf: Any, length: Any, dev: Any) -> int:
        d = self._device(_val(dev, ctypes.c_int))
        return CUDA_ERROR_INVALID_DEVICE if d is None else self._string_out(buf, length, d.name)

    def cuDeviceGetPCIBusId(self, buf: Any, length: Any, dev: Any) -> int:
        d = self._device(_val(dev, ctypes.c_int))
        return CUDA_ERROR_INVALID_DEVICE if d is None else self._string_out(buf, length, d.pci_bus_id)

    def cuDeviceGetUuid(self, out: Any, dev: Any) -> int:
        d = self._device(_val(dev, ctypes.c_int))
        obj = _target(out, ctypes.Structure)
        if ctypes.sizeof(obj) != 16:
            raise FakeArgumentError("CUuuid must be 16 bytes")
        if d is None:
            return CUDA_ERROR_INVALID_DEVICE
        ctypes.memmove(ctypes.addressof(obj), d.uuid, 16)
        return CUDA_SUCCESS

    def cuDeviceGetByPCIBusId(self, out: Any, bus_id: Any) -> int:
        want = (_val(bus_id, ctypes.c_char_p) or b"").decode().lower()

        def norm(s: str) -> tuple[int, ...]:
            parts = re.split(r"[:.]", s)
            return tuple(int(p, 16) for p in parts)
        try:
            key = norm(want)
        except ValueError:
            return CUDA_ERROR_INVALID_VALUE
        for i, d in enumerate(self.devices):
            if norm(d.pci_bus_id) == key:
                _target(out, ctypes.c_int).value = i
                return CUDA_SUCCESS
        return CUDA_ERROR_INVALID_DEVICE

    def cuDeviceTotalMem_v2(self, out: Any, dev: Any) -> int:
        d = self._device(_val(dev, ctypes.c_int))
        if d is None:
            return CUDA_ERROR_INVALID_DEVICE
        _target(out, ctypes.c_size_t).value = d.total
        return CUDA_SUCCESS

    def cuDeviceGetAttribute(self, out: Any, attribute: Any, dev: Any) -> int:
        d = self._device(_val(dev, ctypes.c_int))
        if d is None:
            return CUDA_ERROR_INVALID_DEVICE
        values = {16: d.sm_count, 75: d.compute_capability[0], 76: d.compute_capability[1]}
        a = _val(attribute, ctypes.c_int)
        if a not in values:
            return CUDA_ERROR_INVALID_VALUE
        _target(out, ctypes.c_int).value = values[a]
        return CUDA_SUCCESS

    # -- contexts --
    def cuCtxCreate_v2(self, out: Any, flags: Any, dev: Any) -> int:
        target = _target(out, ctypes.c_void_p)
        _val(flags, ctypes.c_uint)
        d = self._device(_val(dev, ctypes.c_int))
        if d is None:
            return CUDA_ERROR_INVALID_DEVICE
        n = -(-self.ctx_reserve // d.page)
        if n > len(d.free_pages):
            return CUDA_ERROR_OUT_OF_MEMORY
        reserve, d.free_pages = d.free_pages[:n], d.free_pages[n:]
        handle = next(self._handles)
        self.contexts[handle] = _Ctx(handle, d, reserve)
        self.stack.append(handle)
        target.value = handle
        return CUDA_SUCCESS

    def cuCtxDestroy_v2(self, ctx: Any) -> int:
        handle = _val(ctx, ctypes.c_void_p)
        if handle not in self.contexts:
            return CUDA_ERROR_INVALID_CONTEXT
        self._destroy(handle)
        return CUDA_SUCCESS

    def cuCtxSynchronize(self) -> int:
        return CUDA_SUCCESS if self._ctx() else CUDA_ERROR_INVALID_CONTEXT

    # -- memory --
    def cuMemGetInfo_v2(self, free: Any, total: Any) -> int:
        ctx = self._ctx()
        f, t = _target(free, ctypes.c_size_t), _target(total, ctypes.c_size_t)
        if ctx is None:
            return CUDA_ERROR_INVALID_CONTEXT
        f.value, t.value = ctx.device.free_bytes, ctx.device.total
        return CUDA_SUCCESS

    def cuMemAlloc_v2(self, out: Any, size: Any) -> int:
        target = _target(out, ctypes.c_uint64)
        n = _val(size, ctypes.c_size_t)
        ctx = self._ctx()
        if ctx is None:
            return CUDA_ERROR_INVALID_CONTEXT
        if n == 0:
            return CUDA_ERROR_INVALID_VALUE
        va = ctx.device.alloc(n, self, ctx.handle)
        if va is None:
            return CUDA_ERROR_OUT_OF_MEMORY
        target.value = va
        return CUDA_SUCCESS

    def cuMemFree_v2(self, ptr: Any) -> int:
        va = _val(ptr, ctypes.c_uint64)
        ctx = self._ctx()
        if ctx is None:
            return CUDA_ERROR_INVALID_CONTEXT
        return CUDA_SUCCESS if ctx.device.free(va) else CUDA_ERROR_INVALID_VALUE

    def _memset(self, ptr: int, word: bytes, count: int) -> int:
        ctx = self._ctx()
        if ctx is None:
            return CUDA_ERROR_INVALID_CONTEXT
        index, self.memsets = self.memsets, self.memsets + 1
        nbytes = count * len(word)
        if ctx.device.segments(ptr, nbytes) is None or ptr % len(word):
            return CUDA_ERROR_INVALID_VALUE
        if self.fault_memset is not None and self.fault_memset(ptr, nbytes, index):
            return CUDA_SUCCESS  # the fault: success reported, nothing written
        ctx.device.write(ptr, word * count)
        return CUDA_SUCCESS

    def cuMemsetD8_v2(self, ptr: Any, value: Any, count: Any) -> int:
        return self._memset(_val(ptr, ctypes.c_uint64), bytes([_val(value, ctypes.c_ubyte)]),
                            _val(count, ctypes.c_size_t))

    def cuMemsetD32_v2(self, ptr: Any, value: Any, count: Any) -> int:
        return self._memset(_val(ptr, ctypes.c_uint64), _val(value, ctypes.c_uint).to_bytes(4, "little"),
                            _val(count, ctypes.c_size_t))

    def cuMemcpyDtoH_v2(self, dst: Any, src: Any, n: Any) -> int:
        ctx = self._ctx()
        host, size = _val(dst, ctypes.c_void_p), _val(n, ctypes.c_size_t)
        if ctx is None:
            return CUDA_ERROR_INVALID_CONTEXT
        data = ctx.device.read(_val(src, ctypes.c_uint64), size)
        if data is None or not host:
            return CUDA_ERROR_INVALID_VALUE
        ctypes.memmove(host, data, size)
        return CUDA_SUCCESS

    def cuMemcpyHtoD_v2(self, dst: Any, src: Any, n: Any) -> int:
        ctx = self._ctx()
        host, size = _val(src, ctypes.c_void_p), _val(n, ctypes.c_size_t)
        if ctx is None:
            return CUDA_ERROR_INVALID_CONTEXT
        if not host:
            return CUDA_ERROR_INVALID_VALUE
        ok = ctx.device.write(_val(dst, ctypes.c_uint64), ctypes.string_at(host, size))
        return CUDA_SUCCESS if ok else CUDA_ERROR_INVALID_VALUE

    # -- modules and launches --
    def cuModuleLoadDataEx(self, out: Any, image: Any, num_options: Any, options: Any, values: Any) -> int:
        target = _target(out, ctypes.c_void_p)
        text = (_val(image, ctypes.c_char_p) or b"").decode(errors="replace")
        log_addr, log_size = None, 0
        for i in range(_val(num_options, ctypes.c_uint)):
            if options[i] == 5:
                log_addr = values[i]
            elif options[i] == 6:
                log_size = int(values[i] or 0)
        ctx = self._ctx()
        if ctx is None:
            return CUDA_ERROR_INVALID_CONTEXT
        try:
            kernels = parse_ptx(text, decode_bodies=self.kernel_mode == "ptx")
        except PtxError as exc:
            if log_addr and log_size:
                msg = f"ptxas fatal (fake): {exc}".encode()[:log_size - 1] + b"\0"
                ctypes.memmove(log_addr, msg, len(msg))
            return CUDA_ERROR_INVALID_PTX
        handle = next(self._handles)
        self.modules[handle] = _Module(handle, ctx.handle, kernels)
        target.value = handle
        return CUDA_SUCCESS

    def cuModuleGetFunction(self, out: Any, module: Any, name: Any) -> int:
        target = _target(out, ctypes.c_void_p)
        m = self.modules.get(_val(module, ctypes.c_void_p))
        entry = (_val(name, ctypes.c_char_p) or b"").decode()
        if m is None:
            return CUDA_ERROR_INVALID_HANDLE
        if entry not in m.kernels:
            return CUDA_ERROR_NOT_FOUND
        handle = next(self._handles)
        self.functions[handle] = (m.handle, entry)
        target.value = handle
        return CUDA_SUCCESS

    def cuModuleUnload(self, module: Any) -> int:
        handle = _val(module, ctypes.c_void_p)
        if self.modules.pop(handle, None) is None:
            return CUDA_ERROR_INVALID_HANDLE
        return CUDA_SUCCESS

    def cuLaunchKernel(self, f: Any, gx: Any, gy: Any, gz: Any, bx: Any, by: Any, bz: Any, shared: Any,
                       stream: Any, params: Any, extra: Any) -> int:
        grid = [_val(v, ctypes.c_uint) for v in (gx, gy, gz)]
        block = [_val(v, ctypes.c_uint) for v in (bx, by, bz)]
        _val(shared, ctypes.c_uint)
        _val(stream, ctypes.c_void_p)
        ctx = self._ctx()
        if ctx is None:
            return CUDA_ERROR_INVALID_CONTEXT
        fn = self.functions.get(_val(f, ctypes.c_void_p))
        if fn is None or fn[0] not in self.modules:
            return CUDA_ERROR_INVALID_HANDLE
        if min(grid + block) < 1 or block[0] * block[1] * block[2] > 1024 or extra is not None:
            return CUDA_ERROR_INVALID_VALUE
        kernel = self.modules[fn[0]].kernels[fn[1]]
        if not isinstance(params, ctypes.Array) or len(params) < len(kernel.params):
            raise FakeArgumentError(f"{kernel.name} takes {len(kernel.params)} parameters")
        args: dict[str, int] = {}
        for i, (pname, ptype) in enumerate(kernel.params):
            if ptype != ".u64" or not params[i]:
                raise FakeArgumentError(f"{kernel.name}: parameter {pname} {ptype}")
            args[pname] = ctypes.c_uint64.from_address(params[i]).value
        self.launches.append((kernel.name, grid[0], block[0], tuple(args.values())))
        if grid[1:] != [1, 1] or block[1:] != [1, 1]:
            return CUDA_ERROR_INVALID_VALUE  # qvm's kernels are 1-D
        try:
            if self.kernel_mode == "ptx":
                self.executed_instructions += kernel.run(ctx.device, args, grid[0], block[0])
            else:
                _semantic(kernel, ctx.device, list(args.values()))
        except _IllegalAddress:
            return CUDA_ERROR_ILLEGAL_ADDRESS
        return CUDA_SUCCESS


# ======================================================================================= kernels: semantics

class _IllegalAddress(Exception):
    pass


def _words(device: FakeDevice, ptr: int, n16: int) -> array.array[int]:
    data = device.read(ptr, n16 * 16)
    if data is None:
        raise _IllegalAddress()
    arr = array.array("Q")
    arr.frombytes(data)
    return arr


def _atomic_add(device: FakeDevice, ptr: int, value: int) -> None:
    old = device.read(ptr, 8)
    if old is None or ptr % 8:
        raise _IllegalAddress()
    device.write(ptr, ((int.from_bytes(old, "little") + value) & M64).to_bytes(8, "little"))


def _semantic(kernel: PtxKernel, device: FakeDevice, args: list[int]) -> None:
    """What each of qvm's kernels must do, checked against its declared parameters."""
    sig = {"qvm_count_ne": 4, "qvm_count_eq": 4, "qvm_fill": 3}
    if sig.get(kernel.name) != len(kernel.params):
        raise _IllegalAddress()
    if kernel.name == "qvm_fill":
        ptr, n16, value = args
        if not device.write(ptr, value.to_bytes(8, "little") * (2 * n16)):
            raise _IllegalAddress()
        return
    ptr, n16, value, result = args
    words = _words(device, ptr, n16)
    hits = words.count(value)
    n = hits if kernel.name == "qvm_count_eq" else len(words) - hits
    if n:
        _atomic_add(device, result, n)


# ============================================================================ kernels: a small PTX interpreter

class PtxError(Exception):
    """PTX the fake cannot accept (a structural error, or an instruction the interpreter does not know)."""


_Insn = tuple[str | None, bool, str, list[str]]
_OPS = {
    "ld.param.u64", "cvta.to.global.u64", "mov.u32", "mov.u64", "cvt.u64.u32", "mad.wide.u32", "mul.wide.u32",
    "mul.lo.u64", "shl.b64", "add.s64", "setp.ge.u64", "setp.lt.u64", "setp.ne.u64", "setp.eq.u64", "selp.u64",
    "bra", "bra.uni", "ld.global.v2.u64", "st.global.v2.u64", "atom.global.add.u64", "ret",
}
_SPECIAL = ("%tid.x", "%ntid.x", "%ctaid.x", "%nctaid.x")


@dataclass
class PtxKernel:
    name: str
    params: list[tuple[str, str]]
    code: list[_Insn] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def run(self, device: FakeDevice, args: dict[str, int], grid: int, block: int,
            max_steps: int = 50_000_000) -> int:
        """Execute every thread of a 1-D launch in turn; returns the number of instructions executed."""
        if not self.code:
            raise PtxError(f"{self.name}: body not decoded (load the module with kernel_mode='ptx')")
        steps = 0
        for ctaid in range(grid):
            for tid in range(block):
                steps += self._thread(device, args, {"%tid.x": tid, "%ntid.x": block, "%ctaid.x": ctaid,
                                                     "%nctaid.x": grid}, max_steps - steps)
        return steps

    def _thread(self, device: FakeDevice, args: dict[str, int], special: dict[str, int], budget: int) -> int:
        regs: dict[str, int] = {}

        def v(x: str) -> int:
            if x in regs:
                return regs[x]
            if x in special:
                return special[x]
            if x.startswith("%"):
                raise PtxError(f"{self.name}: register {x} read before it was written")
            return int(x, 0) & M64

        def addr(x: str) -> int:
            return v(x.strip("[]"))

        pc, steps = 0, 0
        while True:
            steps += 1
            if steps > budget:
                raise PtxError(f"{self.name}: instruction budget exhausted (a loop that does not end?)")
            pred, neg, op, a = self.code[pc]
            pc += 1
            if pred is not None and bool(v(pred)) == neg:
                continue
            if op == "ret":
                return steps
            if op in ("bra", "bra.uni"):
                pc = self.labels[a[0]]
            elif op == "ld.param.u64":
                regs[a[0]] = args[a[1].strip("[]")]
            elif op in ("cvta.to.global.u64", "mov.u64"):
                regs[a[0]] = v(a[1])
            elif op in ("mov.u32", "cvt.u64.u32"):
                regs[a[0]] = v(a[1]) & 0xFFFFFFFF
            elif op == "mad.wide.u32":
                regs[a[0]] = ((v(a[1]) & 0xFFFFFFFF) * (v(a[2]) & 0xFFFFFFFF) + v(a[3])) & M64
            elif op == "mul.wide.u32":
                regs[a[0]] = (v(a[1]) & 0xFFFFFFFF) * (v(a[2]) & 0xFFFFFFFF)
            elif op == "mul.lo.u64":
                regs[a[0]] = (v(a[1]) * v(a[2])) & M64
            elif op == "shl.b64":
                regs[a[0]] = (v(a[1]) << v(a[2])) & M64
            elif op == "add.s64":
                regs[a[0]] = (v(a[1]) + v(a[2])) & M64
            elif op.startswith("setp."):
                x, y = v(a[1]), v(a[2])
                regs[a[0]] = int({"ge": x >= y, "lt": x < y, "ne": x != y, "eq": x == y}[op.split(".")[1]])
            elif op == "selp.u64":
                regs[a[0]] = v(a[1]) if v(a[3]) else v(a[2])
            elif op == "ld.global.v2.u64":
                p = addr(a[1])
                data = device.read(p, 16)
                if data is None or p % 16:
                    raise _IllegalAddress()
                dst = a[0].strip("{}").split(",")
                regs[dst[0].strip()] = int.from_bytes(data[:8], "little")
                regs[dst[1].strip()] = int.from_bytes(data[8:], "little")
            elif op == "st.global.v2.u64":
                p = addr(a[0])
                src = [s.strip() for s in a[1].strip("{}").split(",")]
                if p % 16 or not device.write(p, b"".join(v(s).to_bytes(8, "little") for s in src)):
                    raise _IllegalAddress()
            elif op == "atom.global.add.u64":
                p = addr(a[1])
                old = device.read(p, 8)
                if old is None or p % 8:
                    raise _IllegalAddress()
                regs[a[0]] = int.from_bytes(old, "little")
                _atomic_add(device, p, v(a[2]))
            else:  # pragma: no cover - parse_ptx refuses unknown opcodes
                raise PtxError(f"unsupported instruction {op}")


def _split_operands(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_ptx(text: str, decode_bodies: bool = False) -> dict[str, PtxKernel]:
    """The module's entries with their parameters (and, with `decode_bodies`, their instructions).

    Structural checks a driver would also make: `.version`, `.target`, `.address_size 64`, balanced braces,
    each entry's parameters declared; branch targets defined; registers used only as declared kinds.
    """
    src = re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))
    for directive in (r"\.version\s+\d+\.\d+", r"\.target\s+sm_\d+", r"\.address_size\s+64"):
        if not re.search(r"^\s*" + directive + r"\s*$", src, re.M):
            raise PtxError(f"missing or malformed directive {directive}")
    if src.count("{") != src.count("}"):
        raise PtxError("unbalanced braces")
    kernels: dict[str, PtxKernel] = {}
    for m in re.finditer(r"\.visible\s+\.entry\s+(\w+)\s*\(([^)]*)\)\s*\{(.*?)\n\}", src, re.S):
        name, plist, body = m.group(1), m.group(2), m.group(3)
        params = []
        for p in filter(None, (x.strip() for x in plist.split(","))):
            pm = re.fullmatch(r"\.param\s+(\.\w+)\s+(\w+)", p)
            if not pm:
                raise PtxError(f"{name}: malformed parameter {p!r}")
            params.append((pm.group(2), pm.group(1)))
        k = PtxKernel(name, params)
        if decode_bodies:
            _decode(k, body)
        kernels[name] = k
    if not kernels:
        raise PtxError("no .entry")
    return kernels


def _decode(k: PtxKernel, body: str) -> None:
    pnames = {p for p, _ in k.params}
    for raw in body.splitlines():
        line = raw.strip()
        if not line or line.startswith(".reg"):
            continue
        lm = re.fullmatch(r"(\$?\w+):", line)
        if lm:
            k.labels[lm.group(1)] = len(k.code)
            continue
        if not line.endswith(";"):
            raise PtxError(f"{k.name}: statement without ';': {line!r}")
        line = line[:-1].strip()
        pred, neg = None, False
        pm = re.match(r"@(!?)(%\w+)\s+", line)
        if pm:
            neg, pred, line = pm.group(1) == "!", pm.group(2), line[pm.end():]
        op, _, rest = line.partition(" ")
        op = op.strip()
        if op not in _OPS:
            raise PtxError(f"{k.name}: instruction {op!r} is not supported by the fake's interpreter")
        args = _split_operands(rest.strip())
        if op == "ld.param.u64" and args[1].strip("[]") not in pnames:
            raise PtxError(f"{k.name}: ld.param of undeclared parameter {args[1]}")
        for x in args:
            for reg in re.findall(r"%[a-z]+\d*(?:\.[xyz])?", x):
                if reg not in _SPECIAL and not re.fullmatch(r"%(p|r|rd)\d+", reg):
                    raise PtxError(f"{k.name}: unknown register {reg}")
        k.code.append((pred, neg, op, args))
    for _, _, op, args in k.code:
        if op.startswith("bra") and args[0] not in k.labels:
            raise PtxError(f"{k.name}: branch to undefined label {args[0]}")
    if not any(op == "ret" for _, _, op, _ in k.code):
        raise PtxError(f"{k.name}: no ret")
