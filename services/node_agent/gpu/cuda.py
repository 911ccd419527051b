"""A small, typed ctypes binding to the CUDA driver API (libcuda.so.1): only the calls the VRAM scrub needs.

Why the driver API through ctypes: libcuda ships with the NVIDIA driver, so a host (or guest) with the
driver can scrub VRAM without the CUDA toolkit, a runtime library or a framework; the kernels are PTX text
that the driver itself JIT-compiles for whatever GPU is present.

Every call goes through `CudaDriver._call`, which turns a non-zero CUresult into a `CudaError` whose
reason is the driver's own error name in lower case (`cuda_error_out_of_memory`, `cuda_error_no_device`…);
a missing library is `no_libcuda`, a missing symbol `cuda_symbol_missing`. No raw ctypes or OS error leaves
this module.

`lib` is whatever object exposes the `cu*` functions: the real `ctypes.CDLL` (with argtypes set here), or in
tests a fake at this hardware boundary (`tests/framework/fake_gpu.py`). Arguments are always passed as
explicit ctypes values (`c_uint64` for device pointers, `c_size_t` for sizes, `byref` for out-parameters),
so the same call is correct with or without argtypes and a fake can check the types it receives.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from shared.errors import ReasonedError

__all__ = [
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR",
    "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR",
    "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT",
    "CUuuid",
    "CudaDriver",
    "CudaError",
    "format_uuid",
    "load_libcuda",
]

LIBCUDA = "libcuda.so.1"

CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2
CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
CU_JIT_ERROR_LOG_BUFFER = 5
CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6
_JIT_LOG_BYTES = 4096

# Names for the codes this module meets, for when cuGetErrorName itself is unavailable (cuda.h, CUresult).
_ERROR_NAMES = {
    1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY", 3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED", 34: "CUDA_ERROR_STUB_LIBRARY", 35: "CUDA_ERROR_INSUFFICIENT_DRIVER",
    46: "CUDA_ERROR_DEVICES_UNAVAILABLE", 100: "CUDA_ERROR_NO_DEVICE", 101: "CUDA_ERROR_INVALID_DEVICE",
    201: "CUDA_ERROR_INVALID_CONTEXT", 209: "CUDA_ERROR_NO_BINARY_FOR_GPU", 218: "CUDA_ERROR_INVALID_PTX",
    222: "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", 500: "CUDA_ERROR_NOT_FOUND", 700: "CUDA_ERROR_ILLEGAL_ADDRESS",
    701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", 702: "CUDA_ERROR_LAUNCH_TIMEOUT", 719: "CUDA_ERROR_LAUNCH_FAILED",
    802: "CUDA_ERROR_SYSTEM_NOT_READY", 999: "CUDA_ERROR_UNKNOWN",
}


class CUuuid(ctypes.Structure):
    """cuda.h `CUuuid`: 16 raw bytes."""

    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


_P = ctypes.POINTER
_U, _I, _SZ, _U64, _VP = ctypes.c_uint, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_void_p
# cuda.h prototypes (the _v2 names are the 64-bit ABI every driver since CUDA 3.2 exports).
_SIGNATURES: dict[str, list[Any]] = {
    "cuInit": [_U],
    "cuDriverGetVersion": [_P(_I)],
    "cuGetErrorName": [_I, _P(ctypes.c_char_p)],
    "cuDeviceGetCount": [_P(_I)],
    "cuDeviceGet": [_P(_I), _I],
    "cuDeviceGetName": [ctypes.c_char_p, _I, _I],
    "cuDeviceGetUuid": [_P(CUuuid), _I],
    "cuDeviceGetPCIBusId": [ctypes.c_char_p, _I, _I],
    "cuDeviceGetByPCIBusId": [_P(_I), ctypes.c_char_p],
    "cuDeviceTotalMem_v2": [_P(_SZ), _I],
    "cuDeviceGetAttribute": [_P(_I), _I, _I],
    "cuCtxCreate_v2": [_P(_VP), _U, _I],
    "cuCtxDestroy_v2": [_VP],
    "cuCtxSynchronize": [],
    "cuMemGetInfo_v2": [_P(_SZ), _P(_SZ)],
    "cuMemAlloc_v2": [_P(_U64), _SZ],
    "cuMemFree_v2": [_U64],
    "cuMemsetD8_v2": [_U64, ctypes.c_ubyte, _SZ],
    "cuMemsetD32_v2": [_U64, _U, _SZ],
    "cuMemcpyDtoH_v2": [_VP, _U64, _SZ],
    "cuMemcpyHtoD_v2": [_U64, _VP, _SZ],
    "cuModuleLoadDataEx": [_P(_VP), ctypes.c_char_p, _U, _P(_I), _P(_VP)],
    "cuModuleGetFunction": [_P(_VP), _VP, ctypes.c_char_p],
    "cuModuleUnload": [_VP],
    "cuLaunchKernel": [_VP, _U, _U, _U, _U, _U, _U, _U, _VP, _P(_VP), _P(_VP)],
}


class CudaError(ReasonedError):
    """A CUDA driver call failed, or there is no driver: `reason` is stable (`no_libcuda`,
    `cuda_symbol_missing`, `cuda_error_<name>`, `gpu_not_found`), `code` the CUresult if there was one."""

    def __init__(self, reason: str, detail: str, code: int | None = None) -> None:
        super().__init__(reason, detail[:500])
        self.code = code


def load_libcuda(path: str = LIBCUDA) -> Any:
    """The driver library with its prototypes set; `CudaError("no_libcuda")` when it cannot be loaded
    (no NVIDIA driver on this machine, or a driver without CUDA)."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise CudaError("no_libcuda", f"cannot load {path}: {exc}") from exc
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
    return lib


def format_uuid(raw: bytes) -> str:
    """16 UUID bytes as NVML and nvidia-smi print them: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class CudaDriver:
    """Typed calls into `lib`; handles (contexts, modules, functions) are `c_void_p`, device pointers ints.

    Not thread-safe by design: a CUDA context is current on one thread, so one scrub runs on one thread.
    """

    def __init__(self, lib: Any) -> None:
        self.lib = lib

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _fn(self, name: str) -> Any:
        fn = getattr(self.lib, name, None)
        if fn is None:
            raise CudaError("cuda_symbol_missing", f"libcuda has no {name} (driver too old?)")
        return fn

    def _call(self, name: str, *args: Any) -> None:
        rc = self._rc(name, *args)
        if rc != CUDA_SUCCESS:
            raise self.error(name, rc)

    def _rc(self, name: str, *args: Any) -> int:
        try:
            return int(self._fn(name)(*args))
        except (ctypes.ArgumentError, TypeError, OSError) as exc:  # a binding fault, never a driver answer
            raise CudaError("cuda_call_failed", f"{name}: {exc}") from exc

    def error_name(self, code: int) -> str:
        """The driver's name for a CUresult (`CUDA_ERROR_OUT_OF_MEMORY`), or a fallback."""
        fn = getattr(self.lib, "cuGetErrorName", None)
        if fn is not None:
            out = ctypes.c_char_p()
            try:
                if int(fn(ctypes.c_int(code), ctypes.byref(out))) == CUDA_SUCCESS and out.value:
                    return out.value.decode(errors="replace")
            except (ctypes.ArgumentError, TypeError, OSError):
                pass
        return _ERROR_NAMES.get(code, f"CUDA_ERROR_{code}")

    def error(self, call: str, code: int, extra: str = "") -> CudaError:
        name = self.error_name(code)
        reason = name.lower() if name.startswith("CUDA_ERROR_") else f"cuda_error_{code}"
        return CudaError(reason, f"{call} returned {name} ({code}){': ' + extra if extra else ''}", code)

    # -- driver and devices -----------------------------------------------------------------------------------
    def init(self) -> None:
        self._call("cuInit", ctypes.c_uint(0))

    def driver_version(self) -> int:
        """CUDA version the driver supports, e.g. 12040 for 12.4."""
        v = ctypes.c_int()
        self._call("cuDriverGetVersion", ctypes.byref(v))
        return v.value

    def device_count(self) -> int:
        n = ctypes.c_int()
        self._call("cuDeviceGetCount", ctypes.byref(n))
        return n.value

    def device(self, ordinal: int) -> int:
        d = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(d), ctypes.c_int(ordinal))
        return d.value

    def device_by_pci_bus_id(self, bus_id: str) -> int:
        d = ctypes.c_int()
        self._call("cuDeviceGetByPCIBusId", ctypes.byref(d), ctypes.c_char_p(bus_id.encode()))
        return d.value

    def device_name(self, dev: int) -> str:
        buf = ctypes.create_string_buffer(256)
        self._call("cuDeviceGetName", buf, ctypes.c_int(len(buf)), ctypes.c_int(dev))
        return buf.value.decode(errors="replace")

    def device_uuid(self, dev: int) -> str:
        u = CUuuid()
        self._call("cuDeviceGetUuid", ctypes.byref(u), ctypes.c_int(dev))
        return format_uuid(bytes(u.bytes))

    def device_pci_bus_id(self, dev: int) -> str:
        buf = ctypes.create_string_buffer(32)
        self._call("cuDeviceGetPCIBusId", buf, ctypes.c_int(len(buf)), ctypes.c_int(dev))
        return buf.value.decode(errors="replace")

    def device_total_mem(self, dev: int) -> int:
        n = ctypes.c_size_t()
        self._call("cuDeviceTotalMem_v2", ctypes.byref(n), ctypes.c_int(dev))
        return n.value

    def device_attribute(self, attribute: int, dev: int) -> int:
        v = ctypes.c_int()
        self._call("cuDeviceGetAttribute", ctypes.byref(v), ctypes.c_int(attribute), ctypes.c_int(dev))
        return v.value

    # -- context ----------------------------------------------------------------------------------------------
    def ctx_create(self, dev: int) -> ctypes.c_void_p:
        """A new context on `dev`, current on this thread; it owns every allocation made while current."""
        ctx = ctypes.c_void_p()
        self._call("cuCtxCreate_v2", ctypes.byref(ctx), ctypes.c_uint(0), ctypes.c_int(dev))
        return ctx

    def ctx_destroy(self, ctx: ctypes.c_void_p) -> None:
        self._call("cuCtxDestroy_v2", ctx)

    def ctx_synchronize(self) -> None:
        self._call("cuCtxSynchronize")

    # -- memory -----------------------------------------------------------------------------------------------
    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current context's device."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def mem_alloc(self, size: int) -> int:
        ptr = ctypes.c_uint64()
        self._call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(size))
        return ptr.value

    def try_mem_alloc(self, size: int) -> int | None:
        """Like `mem_alloc`, but None when the device has no room for `size` bytes."""
        ptr = ctypes.c_uint64()
        rc = self._rc("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(size))
        if rc == CUDA_ERROR_OUT_OF_MEMORY:
            return None
        if rc != CUDA_SUCCESS:
            raise self.error("cuMemAlloc_v2", rc, f"{size} bytes")
        return ptr.value

    def mem_free(self, ptr: int) -> None:
        self._call("cuMemFree_v2", ctypes.c_uint64(ptr))

    def memset_d8(self, ptr: int, value: int, count: int) -> None:
        self._call("cuMemsetD8_v2", ctypes.c_uint64(ptr), ctypes.c_ubyte(value), ctypes.c_size_t(count))

    def memset_d32(self, ptr: int, value: int, count: int) -> None:
        """`count` 32-bit words (not bytes) set to `value`; `ptr` must be 4-byte aligned."""
        self._call("cuMemsetD32_v2", ctypes.c_uint64(ptr), ctypes.c_uint(value), ctypes.c_size_t(count))

    def memcpy_dtoh(self, ptr: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        self._call("cuMemcpyDtoH_v2", ctypes.cast(buf, ctypes.c_void_p), ctypes.c_uint64(ptr), ctypes.c_size_t(size))
        return buf.raw

    def memcpy_htod(self, ptr: int, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        self._call("cuMemcpyHtoD_v2", ctypes.c_uint64(ptr), ctypes.cast(buf, ctypes.c_void_p),
                   ctypes.c_size_t(len(data)))

    # -- modules and kernels ----------------------------------------------------------------------------------
    def module_load_data(self, image: bytes) -> ctypes.c_void_p:
        """Load a PTX (or cubin) image; a JIT failure carries the driver's compile log in its detail."""
        module = ctypes.c_void_p()
        log = ctypes.create_string_buffer(_JIT_LOG_BYTES)
        options = (ctypes.c_int * 2)(CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES)
        values = (ctypes.c_void_p * 2)(ctypes.cast(log, ctypes.c_void_p).value, _JIT_LOG_BYTES)
        rc = self._rc("cuModuleLoadDataEx", ctypes.byref(module), ctypes.c_char_p(image), ctypes.c_uint(2),
                      options, values)
        if rc != CUDA_SUCCESS:
            raise self.error("cuModuleLoadDataEx", rc, log.value.decode(errors="replace").strip()[:300])
        return module

    def module_get_function(self, module: ctypes.c_void_p, name: str) -> ctypes.c_void_p:
        fn = ctypes.c_void_p()
        self._call("cuModuleGetFunction", ctypes.byref(fn), module, ctypes.c_char_p(name.encode()))
        return fn

    def module_unload(self, module: ctypes.c_void_p) -> None:
        self._call("cuModuleUnload", module)

    def launch(self, function: ctypes.c_void_p, grid: int, block: int, args: Sequence[int]) -> None:
        """Launch a 1-D grid on the context's default stream; every kernel parameter is a 64-bit value
        (pointers, counts, patterns), passed the driver's way: an array of pointers to the values."""
        values = [ctypes.c_uint64(a) for a in args]
        params = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        self._call("cuLaunchKernel", function, ctypes.c_uint(grid), ctypes.c_uint(1), ctypes.c_uint(1),
                   ctypes.c_uint(block), ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(0),
                   ctypes.c_void_p(None), params, None)
