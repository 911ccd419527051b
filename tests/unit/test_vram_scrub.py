"""The VRAM scrub against a fake libcuda (tests/framework/fake_gpu.py: simulated device memory at the driver
boundary, kernels that really read the simulated bytes). What runs only on a GPU: the driver's JIT of the
PTX, real allocation behaviour and speed (`deploy/gpu-check`)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.node_agent.gpu import check as gpu_check
from services.node_agent.gpu import cuda as cuda_mod
from services.node_agent.gpu import nvml as nvml_mod
from services.node_agent.gpu import session as session_mod
from services.node_agent.gpu import vram as vram_mod
from services.node_agent.gpu.cuda import CudaDriver, CudaError, format_uuid, load_libcuda
from services.node_agent.gpu.nvml import read_inventory
from services.node_agent.gpu.ptx import KERNELS, PTX
from services.node_agent.gpu.vram import (
    SCRUB_METHOD,
    fill_vram,
    scrub_vram,
    scrub_vram_report,
    survey_vram,
)
from shared.errors import ReasonedError
from tests.framework.fake_gpu import (
    CUDA_ERROR_ILLEGAL_ADDRESS,
    CUDA_ERROR_NO_DEVICE,
    CUDA_ERROR_OUT_OF_MEMORY,
    FakeDevice,
    FakeLibcuda,
    FakeNvml,
    FakeNvmlGpu,
    parse_ptx,
)

PATTERN = 0xDEADBEEFCAFEF00D
WORD = PATTERN.to_bytes(8, "little")
MiB = 1 << 20
KiB = 1 << 10
# A 32 MiB device in 64 KiB pages; chunks of 4 MiB down to a 256 KiB floor.
SIZES = {"chunk_bytes": 4 * MiB, "min_chunk_bytes": 256 * KiB}
# For the PTX interpreter: a small device and an odd launch geometry (8 blocks x 24 threads).
SMALL = {"chunk_bytes": 128 * KiB, "min_chunk_bytes": 32 * KiB, "block_threads": 24}


def small_device() -> FakeDevice:
    return FakeDevice(total=512 * KiB, reserved=64 * KiB, page=16 * KiB, sm_count=1)


def skip_nth_large_memset(n: int, at_least: int = MiB) -> Callable[[int, int, int], bool]:
    """A memset fault: the n-th memset of at least `at_least` bytes reports success and writes nothing."""
    seen = [0]

    def fault(ptr: int, nbytes: int, index: int) -> bool:
        if nbytes < at_least:
            return False
        seen[0] += 1
        return seen[0] == n + 1
    return fault


# ------------------------------------------------------------------------------------------------- scrubbing

def test_scrub_claims_all_free_memory_and_verifies_it() -> None:
    dev = FakeDevice()
    dev.fill_free(WORD)
    lib = FakeLibcuda([dev])
    report = scrub_vram_report(0, lib=lib, **SIZES)
    s = report.scrub
    assert s.verified and s.method == SCRUB_METHOD, s.detail
    assert s.gpu_uuid == format_uuid(dev.uuid) and s.pci_bus_id == dev.pci_bus_id
    assert s.bytes_total == dev.total
    free = dev.total - dev.reserved
    assert report.bytes_free == free
    assert s.bytes_scrubbed == free - report.bytes_unclaimed and report.bytes_unclaimed < SIZES["min_chunk_bytes"]
    assert s.rate_gbps > 0 and s.duration_ms > 0 and report.zero_verify_gbps > 0
    assert report.nonzero_words == 0 and report.bad_chunks == () and report.selftest_problem == ""
    # every allocation freed, module unloaded, context destroyed, and the bytes really are zero
    assert dev.allocations == {} and lib.contexts == {} and lib.modules == {}
    assert dev.count_physical(WORD) == 0
    assert not any(dev.physical[dev.reserved:])
    # verified on the GPU, chunk by chunk: one count launch per chunk (plus the self-test's)
    verify_launches = [x for x in lib.launches if x[0] == "qvm_count_ne" and x[3][2] == 0 and x[3][1] > 0]
    assert len(verify_launches) >= report.chunks + 1


def test_chunks_shrink_on_out_of_memory_down_to_the_floor() -> None:
    dev = FakeDevice(total=32 * MiB, reserved=1 * MiB + 192 * KiB)  # free is not a multiple of the chunk
    lib = FakeLibcuda([dev])
    report = scrub_vram_report(0, lib=lib, chunk_bytes=8 * MiB, min_chunk_bytes=256 * KiB)
    assert report.scrub.verified
    assert report.bytes_unclaimed < 256 * KiB
    assert lib.calls["cuMemAlloc_v2"] > report.chunks + 2  # some attempts failed and were halved


def test_scrub_removes_what_the_previous_process_left() -> None:
    dev = FakeDevice()
    previous = FakeLibcuda([dev])
    fill = fill_vram(0, PATTERN, lib=previous, release=False, **SIZES)
    assert fill.ok and fill.pattern_words == fill.bytes_filled // 8
    assert dev.allocations  # still held: the process exits without freeing
    previous.process_exit()
    # what a new tenant would read without a scrub: the pattern, almost all of the free memory
    before = survey_vram(0, PATTERN, lib=FakeLibcuda([dev]), **SIZES)
    assert before.pattern_words == fill.bytes_filled // 8 and before.sample.startswith(WORD)
    assert scrub_vram(0, lib=FakeLibcuda([dev]), **SIZES).verified
    after = survey_vram(0, PATTERN, lib=FakeLibcuda([dev]), **SIZES)
    assert after.pattern_words == 0 and after.nonzero_words == 0 and after.sample == b""
    assert dev.count_physical(WORD) == 0


def test_a_memset_that_skips_one_chunk_is_caught() -> None:
    dev = FakeDevice()
    dev.fill_free(WORD)
    lib = FakeLibcuda([dev], fault_memset=skip_nth_large_memset(1))  # the second chunk keeps the old data
    report = scrub_vram_report(0, lib=lib, **SIZES)
    s = report.scrub
    assert not s.verified
    assert report.selftest_problem == ""
    assert len(report.bad_chunks) == 1
    index, size, nonzero = report.bad_chunks[0]
    assert nonzero == size // 8  # every word of that chunk, counted on the "GPU"
    assert f"chunk {index}" in s.detail and "NOT ZERO" in s.detail
    assert s.bytes_scrubbed == report.bytes_free - report.bytes_unclaimed - size
    assert dev.count_physical(WORD) == size // 8
    assert dev.allocations == {} and lib.contexts == {}


def test_a_memset_that_writes_nothing_fails_the_self_test_and_the_scrub() -> None:
    dev = FakeDevice()
    dev.fill_free(WORD)
    report = scrub_vram_report(0, lib=FakeLibcuda([dev], fault_memset=lambda *_: True), **SIZES)
    assert not report.scrub.verified
    assert "self-test failed" in report.scrub.detail and report.selftest_problem
    assert report.scrub.bytes_scrubbed < report.bytes_free // 2


def test_fill_keeps_memory_until_the_process_exits() -> None:
    dev = FakeDevice()
    lib = FakeLibcuda([dev])
    fill = fill_vram(0, PATTERN, lib=lib, release=False, **SIZES)
    assert not fill.released and fill.nonzero_words == fill.bytes_filled // 8
    assert lib.contexts and dev.free_bytes < SIZES["min_chunk_bytes"]
    lib.process_exit()
    assert dev.allocations == {} and dev.free_bytes == dev.total - dev.reserved
    assert dev.count_physical(WORD) == fill.bytes_filled // 8  # exit freed it; nothing cleared it
    released = fill_vram(0, PATTERN, lib=FakeLibcuda([dev]), **SIZES)
    assert released.released and released.ok and dev.allocations == {}


def test_device_chosen_by_uuid_or_pci_bus_id_leaves_the_others_alone() -> None:
    a = FakeDevice(uuid=b"\xaa" * 16, pci_bus_id="0000:41:00.0")
    b = FakeDevice(uuid=bytes(range(0x10, 0x20)), pci_bus_id="0000:c1:00.0")
    a.fill_free(WORD)
    b.fill_free(WORD)
    s = scrub_vram(format_uuid(b.uuid).upper(), lib=FakeLibcuda([a, b]), **SIZES)
    assert s.verified and s.gpu_uuid == "GPU-10111213-1415-1617-1819-1a1b1c1d1e1f"
    assert b.count_physical(WORD) == 0 and a.count_physical(WORD) > 0
    s = scrub_vram("00000000:41:00.0", lib=FakeLibcuda([a, b]), **SIZES)  # NVML's bus id form
    assert s.verified and s.pci_bus_id == "0000:41:00.0" and a.count_physical(WORD) == 0


# ----------------------------------------------------------------------------------------- errors are clean

@pytest.mark.parametrize(("setup", "reason"), [
    (lambda lib: lib.fail("cuInit", CUDA_ERROR_NO_DEVICE), "cuda_error_no_device"),
    (lambda lib: lib.fail("cuCtxCreate_v2", CUDA_ERROR_OUT_OF_MEMORY), "cuda_error_out_of_memory"),
    (lambda lib: lib.fail("cuMemsetD32_v2", CUDA_ERROR_ILLEGAL_ADDRESS, after=8), "cuda_error_illegal_address"),
    (lambda lib: lib.fail("cuLaunchKernel", 719, after=10), "cuda_error_launch_failed"),
    (lambda lib: lib.fail("cuMemGetInfo_v2", 12345), "cuda_error_12345"),
    (lambda lib: lib.missing.add("cuModuleLoadDataEx"), "cuda_symbol_missing"),
])
def test_cuda_errors_become_reason_codes_and_everything_is_released(
        setup: Callable[[FakeLibcuda], None], reason: str) -> None:
    dev = FakeDevice()
    lib = FakeLibcuda([dev])
    setup(lib)
    with pytest.raises(CudaError) as err:
        scrub_vram(0, lib=lib, **SIZES)
    assert isinstance(err.value, ReasonedError)
    assert err.value.reason == reason, err.value
    assert dev.allocations == {} and lib.contexts == {}


def test_error_names_fall_back_when_cuGetErrorName_is_missing() -> None:
    lib = FakeLibcuda([])
    lib.missing.add("cuGetErrorName")
    with pytest.raises(CudaError) as err:
        scrub_vram(0, lib=lib)
    assert err.value.reason == "cuda_error_no_device" and err.value.code == CUDA_ERROR_NO_DEVICE
    assert "CUDA_ERROR_NO_DEVICE" in err.value.detail


def test_invalid_ptx_carries_the_jit_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_mod, "PTX", ".version 6.0\n.target sm_50\n// no address size, no entry\n")
    lib = FakeLibcuda([FakeDevice()])
    with pytest.raises(CudaError) as err:
        scrub_vram(0, lib=lib, **SIZES)
    assert err.value.reason == "cuda_error_invalid_ptx"
    assert "address_size" in err.value.detail  # the JIT log made it into the error
    assert lib.contexts == {}


@pytest.mark.parametrize("device", [2, -1, "GPU-ffffffff-ffff-ffff-ffff-ffffffffffff", "0000:99:00.0"])
def test_unknown_device_is_gpu_not_found(device: int | str) -> None:
    with pytest.raises(CudaError) as err:
        scrub_vram(device, lib=FakeLibcuda([FakeDevice(), FakeDevice(uuid=b"\x01" * 16)]), **SIZES)
    assert err.value.reason == "gpu_not_found"


def test_bad_arguments_are_refused_before_touching_the_driver() -> None:
    lib = FakeLibcuda([FakeDevice()])
    with pytest.raises(CudaError) as err:
        scrub_vram(0, lib=lib, min_chunk_bytes=1000)
    assert err.value.reason == "invalid_argument" and lib.calls == {}


def test_no_libcuda_is_a_clean_error() -> None:
    with pytest.raises(CudaError) as err:
        load_libcuda("libcuda-qvm-does-not-exist.so.1")
    assert err.value.reason == "no_libcuda"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        with pytest.raises(CudaError) as err:
            scrub_vram(0)  # the production path on a machine without the driver
        assert err.value.reason == "no_libcuda"
    else:  # pragma: no cover - a machine with the NVIDIA driver
        pytest.skip("libcuda.so.1 is present here")


def test_isolated_scrub_runs_in_a_fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """`scrub_vram_isolated` hands the child's evidence or its reason code back; here the child really runs
    (`python -m services.node_agent.gpu scrub`), and on a machine without the driver answers no_libcuda."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        with pytest.raises(CudaError) as err:
            vram_mod.scrub_vram_isolated("GPU-00000000-0000-0000-0000-000000000000", timeout_s=120)
        assert err.value.reason == "no_libcuda"
    with pytest.raises(CudaError) as err:
        vram_mod.scrub_vram_isolated(0, timeout_s=0.001)
    assert err.value.reason == "scrub_timeout"
    # the success path: the child's JSON line becomes the same VramScrub
    dev = FakeDevice()
    expected = scrub_vram(0, lib=FakeLibcuda([dev]), **SIZES)
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="log line\n" + expected.model_dump_json() + "\n", stderr="")
    monkeypatch.setattr(vram_mod.subprocess, "run", fake_run)
    assert vram_mod.scrub_vram_isolated("GPU-x") == expected
    assert seen[0][1:5] == ["-m", "services.node_agent.gpu", "scrub", "GPU-x"]


def test_the_fake_refuses_wrongly_typed_arguments() -> None:
    """The fake checks ctypes types the way argtypes would: a binding that passed a bare int for a 64-bit
    device pointer or size would fail here, not silently truncate on a real driver."""
    lib = FakeLibcuda([FakeDevice()])
    assert lib.cuInit(ctypes.c_uint(0)) == 0
    ctx = ctypes.c_void_p()
    assert lib.cuCtxCreate_v2(ctypes.byref(ctx), ctypes.c_uint(0), ctypes.c_int(0)) == 0
    with pytest.raises(ctypes.ArgumentError):
        lib.cuMemFree_v2(0x7F0000000000)
    with pytest.raises(ctypes.ArgumentError):
        lib.cuMemsetD32_v2(ctypes.c_uint64(0x7F0000000000), 0, ctypes.c_size_t(4))
    with pytest.raises(ctypes.ArgumentError):
        lib.cuMemAlloc_v2(ctypes.byref(ctypes.c_uint32()), ctypes.c_size_t(16))


# --------------------------------------------------------------------------------------- the binding itself

def test_binding_and_fake_cover_the_same_calls() -> None:
    fake = {n for n in dir(FakeLibcuda) if n.startswith("cu")}
    assert set(cuda_mod._SIGNATURES) == fake


def _cuda_header() -> Path | None:
    for p in [*sorted(Path("/usr/local").glob("cuda*/include/cuda.h")), Path("/usr/include/cuda.h")]:
        if p.is_file():
            return p
    return None


@pytest.mark.skipif(_cuda_header() is None, reason="no cuda.h (CUDA toolkit headers) on this machine")
def test_signatures_match_cuda_h() -> None:
    """Every symbol the binding declares exists in cuda.h with as many parameters as its argtypes."""
    header = _cuda_header()
    assert header is not None
    text = re.sub(r"\s+", " ", header.read_text(errors="replace"))
    for name, argtypes in cuda_mod._SIGNATURES.items():
        protos = re.findall(r"CUresult CUDAAPI " + name + r"\s*\(([^)]*)\)", text)
        if not protos:  # declared under its unversioned name: `#define cuMemAlloc cuMemAlloc_v2`
            base = re.search(r"#define (\w+) (?:__CUDA_API_PTDS\()?" + name + r"\b", text)
            assert base, f"{name} is not in {header}"
            protos = re.findall(r"CUresult CUDAAPI " + base.group(1) + r"\s*\(([^)]*)\)", text)
        assert protos, name
        counts = {0 if p.strip() in ("", "void") else p.count(",") + 1 for p in protos}
        assert len(argtypes) in counts, (name, counts, len(argtypes))


# ------------------------------------------------------------------------------------------ the PTX kernels

def test_ptx_is_well_formed() -> None:
    assert re.search(r"^\.version 6\.0$", PTX, re.M) and re.search(r"^\.target sm_50$", PTX, re.M)
    assert re.search(r"^\.address_size 64$", PTX, re.M)
    kernels = parse_ptx(PTX, decode_bodies=True)  # every instruction known to the interpreter, labels defined
    assert set(kernels) == set(KERNELS)
    assert [t for _, t in kernels["qvm_count_ne"].params] == [".u64"] * 4
    assert [n for n, _ in kernels["qvm_fill"].params] == ["qvm_fill_buf", "qvm_fill_n16", "qvm_fill_value"]
    assert "atom.global.add.u64" in PTX and "ld.global.v2.u64" in PTX and "st.global.v2.u64" in PTX


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="no ptxas (CUDA toolkit) on this machine")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptx_assembles_with_ptxas(tmp_path: Path, arch: str) -> None:
    """Where the toolkit is installed, NVIDIA's own assembler accepts the PTX for Ampere and Hopper."""
    src = tmp_path / "qvm.ptx"
    src.write_text(PTX)
    r = subprocess.run(["ptxas", f"--gpu-name={arch}", str(src), "-o", str(tmp_path / "qvm.cubin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("n16", "grid", "block"), [(1, 1, 1), (7, 2, 3), (257, 3, 32), (1031, 8, 24),
                                                    (1024, 4, 64)])
def test_ptx_count_kernels_see_every_word_exactly_once(n16: int, grid: int, block: int) -> None:
    """The hand-written PTX, interpreted thread by thread: each planted non-zero word is counted once, for
    sizes and launch geometries that exercise both the unrolled loop and the tail loop."""
    rng = random.Random(n16 * 1000 + grid * 10 + block)
    lib = FakeLibcuda([small_device()], kernel_mode="ptx")
    drv = CudaDriver(lib)
    drv.init()
    drv.ctx_create(drv.device(0))
    fns = {k: drv.module_get_function(drv.module_load_data(PTX.encode()), k) for k in KERNELS}
    buf, result = drv.mem_alloc(n16 * 16), drv.mem_alloc(8)
    drv.memset_d32(buf, 0, n16 * 4)
    planted = sorted({*rng.sample(range(2 * n16), min(2 * n16, 5)), 2 * n16 - 1})
    for w in planted:
        drv.memcpy_htod(buf + 8 * w, rng.randrange(1, 1 << 64).to_bytes(8, "little"))

    def count(kernel: str, value: int) -> int:
        drv.memset_d32(result, 0, 2)
        drv.launch(fns[kernel], grid, block, [buf, n16, value, result])
        drv.ctx_synchronize()
        return int.from_bytes(drv.memcpy_dtoh(result, 8), "little")

    assert count("qvm_count_ne", 0) == len(planted)
    assert count("qvm_count_eq", 0) == 2 * n16 - len(planted)
    drv.launch(fns["qvm_fill"], grid, block, [buf, n16, PATTERN])
    assert count("qvm_count_eq", PATTERN) == 2 * n16
    assert drv.memcpy_dtoh(buf, n16 * 16) == WORD * (2 * n16)
    assert lib.executed_instructions > 0


def test_scrub_with_the_ptx_interpreted_end_to_end() -> None:
    """Fill (exit without freeing), survey, scrub, survey again, every kernel run as PTX."""
    dev = small_device()
    previous = FakeLibcuda([dev], kernel_mode="ptx")
    assert fill_vram(0, PATTERN, lib=previous, release=False, **SMALL).ok
    previous.process_exit()
    assert survey_vram(0, PATTERN, lib=FakeLibcuda([dev], kernel_mode="ptx"), **SMALL).pattern_words > 0
    report = scrub_vram_report(0, lib=FakeLibcuda([dev], kernel_mode="ptx"), **SMALL)
    assert report.scrub.verified and report.selftest_problem == "", report.scrub.detail
    assert dev.count_physical(WORD) == 0 and not any(dev.physical[dev.reserved:])


def test_ptx_interpreted_scrub_catches_a_skipped_memset() -> None:
    dev = small_device()
    dev.fill_free(WORD)
    lib = FakeLibcuda([dev], kernel_mode="ptx", fault_memset=skip_nth_large_memset(0, at_least=SMALL["chunk_bytes"]))
    report = scrub_vram_report(0, lib=lib, **SMALL)
    assert not report.scrub.verified and report.selftest_problem == ""
    assert [(size, n) for _, size, n in report.bad_chunks] == [(SMALL["chunk_bytes"], SMALL["chunk_bytes"] // 8)]


# ------------------------------------------------------------------------------------------ deploy/gpu-check

GPU_CHECK = Path(__file__).resolve().parents[2] / "deploy" / "gpu-check"


def test_gpu_check_without_a_driver_says_so() -> None:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        pass
    else:  # pragma: no cover - a machine with the NVIDIA driver runs the real thing instead
        pytest.skip("NVML is present here")
    r = subprocess.run([sys.executable, str(GPU_CHECK), "--max-seconds", "60"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "no GPU" in r.stdout, r.stdout + r.stderr


def test_gpu_check_runs_each_step_as_its_own_process() -> None:
    """A step is `python -m services.node_agent.gpu.check --child ...` from the repository root; without
    libcuda here it reports `no_libcuda`, and the parent records the failure with the child's result."""
    try:
        load_libcuda()
    except CudaError:
        pass
    else:  # pragma: no cover - a machine with the NVIDIA driver runs the real thing instead
        pytest.skip("libcuda is present here")
    chk = gpu_check.Check(60)
    args = argparse.Namespace(pattern=gpu_check.DEFAULT_PATTERN, chunk_mib=8)
    assert chk.run_child("info", None, args) is None
    (failure,) = chk.failures
    assert failure.startswith("info: child exited 3: {'error': 'no_libcuda'"), failure


@pytest.mark.parametrize("broken_memset", [False, True])
def test_gpu_check_end_to_end_over_the_fakes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path, broken_memset: bool) -> None:
    """The whole script, each child step run in-process over a fake libcuda on one shared FakeDevice (a
    child's exit is `process_exit()`), the NVML inventory from the fake NVML: sections, pass/fail, JSON."""
    mod = gpu_check
    dev = FakeDevice(total=64 * MiB, reserved=2 * MiB)
    nvml_gpu = FakeNvmlGpu(uuid=format_uuid(dev.uuid), memory_total=dev.total)
    monkeypatch.setattr(nvml_mod, "read_inventory", lambda _nvml: read_inventory(FakeNvml([nvml_gpu])))
    processes: list[FakeLibcuda] = []

    def new_process() -> FakeLibcuda:
        fault = skip_nth_large_memset(0) if broken_memset else None
        processes.append(FakeLibcuda([dev], fault_memset=fault))
        return processes[-1]
    monkeypatch.setattr(vram_mod, "load_libcuda", new_process)
    monkeypatch.setattr(cuda_mod, "load_libcuda", new_process)

    class Exited(Exception):
        pass

    def _exit(code: int) -> None:
        raise Exited(code)
    monkeypatch.setattr(mod.os, "_exit", _exit)

    def run_child(self: Any, kind: str, device: str | None, args: Any) -> dict[str, Any] | None:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(Exited):
            rc = mod.child(kind, device, args.pattern, args.chunk_mib << 20)
            assert rc == 0, buf.getvalue()
        for p in processes:
            p.process_exit()
        line = [x for x in buf.getvalue().splitlines() if x.startswith("RESULT ")][-1]
        result: dict[str, Any] = json.loads(line[7:])
        result["_wall_s"] = 0.0
        return result
    monkeypatch.setattr(mod.Check, "run_child", run_child)

    out = tmp_path / "summary.json"
    rc = mod.main(["--max-seconds", "60", "--chunk-mib", "8", "--json", str(out)])
    text = capsys.readouterr().out
    for title in ("== NVML inventory", "== CUDA driver", "-- 1. fill", "-- 2. a new tenant", "-- 3. scrub_vram",
                  "-- 4. a new tenant", "== summary"):
        assert title in text, text
    summary = json.loads(out.read_text())
    (gpu,) = summary["gpus"]
    if broken_memset:
        assert rc == 1 and "FAIL: scrub not verified" in text and "NOT ZERO" in text
        assert gpu["pattern_after_scrub"] > 0
    else:
        assert rc == 0 and text.rstrip().splitlines()[-2] == "PASS", text
        assert gpu["verified"] and gpu["pattern_after_scrub"] == 0 and gpu["leftover_without_scrub"] == "100.0%"
        assert "x the 1000 GB/s target" in text
