"""The machine's own limits, measured in the same run as the figures held against them.

Absolute figures move with the machine (another host of the same kind, or the same host while something
else runs, gave 30-45% less on the same commit), so each figure that has a physical or library bound is
printed beside that bound, measured here and now, and judged by the ratio. Each function below measures
the bare work a figure cannot beat: the signature checks an audit must do, the bytes a scrub must write and
read, the hashing an image check must do, the crypto a key release must do, the publishes the bus can
store for one client, a guest booted by QEMU with nothing of qvm around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import mmap
import multiprocessing as mp
import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from nats.js import JetStreamContext

from bench.common import windowed
from shared.codec import Outgoing
from shared.crypto import hpke
from shared.crypto.kek import KekRing
from shared.crypto.secret import zeroize

__all__ = [
    "CpuMeter", "bare_qemu_boot_ms", "best_seconds", "cores", "ed25519_sign_s", "ed25519_verify_rate_all_cores",
    "ed25519_verify_s", "memset_memcmp_gbs",
    "nats_publish_rate", "release_crypto_s", "sha256_in_memory_gbs",
]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_libc.memcmp.restype = ctypes.c_int


class CpuMeter:
    """CPU seconds (user + system) that processes spent between `start()` and `stop()`: where a figure's
    time went, process by process (this process, a service's process found by its module, nats-server)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    @classmethod
    def with_server(cls, pids: dict[str, int], server_pid: int | None) -> CpuMeter:
        """`pids` and nats-server, where the stack has a single server (a cluster's are not counted)."""
        return cls({**pids, "nats-server": server_pid} if server_pid is not None else pids)

    @staticmethod
    def cpu_s(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    @staticmethod
    def children(module: str) -> list[int]:
        """This process's children running `python -m <module>`."""
        me, out = os.getpid(), []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == me and module.encode() in cmd:
                out.append(int(d.name))
        return sorted(out)

    def start(self) -> None:
        self._start = {k: self.cpu_s(pid) for k, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        for k, pid in self.pids.items():
            try:
                self.spent[k] = self.cpu_s(pid) - self._start[k]
            except OSError:
                self.spent[k] = float("nan")
        return self.spent

    def per(self, n: int, unit: str) -> str:
        """'broker 1,100 µs, nats-server 300 µs, ... per <unit>'."""
        parts = [f"{k} {v / n * 1e6:,.0f} µs" for k, v in self.spent.items()]
        return f"CPU per {unit}: " + ", ".join(parts) + f" (sum {sum(self.spent.values()) / n * 1e6:,.0f} µs)"


def cores() -> int:
    """The cores this process may run on (what a pool of workers can use)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def best_seconds(fn: Callable[[], object], n: int, rounds: int = 3) -> float:
    """Seconds per call of `fn`: the best of `rounds` loops of `n` calls (the least disturbed by others)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def ed25519_verify_s(key: ed25519.Ed25519PrivateKey, data: bytes, n: int = 2000) -> float:
    """One Ed25519 verification of `data` (an event as stored), by the library alone."""
    sig, pub = key.sign(data), key.public_key()
    return best_seconds(lambda: pub.verify(sig, data), n)


def _verify_for(barrier: object, seconds: float, public: bytes, sig: bytes, data: bytes, out: object) -> None:
    pub = ed25519.Ed25519PublicKey.from_public_bytes(public)
    barrier.wait()  # type: ignore[attr-defined]
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            pub.verify(sig, data)
        n += 50
    out.put(n)  # type: ignore[attr-defined]


def ed25519_verify_rate_all_cores(key: ed25519.Ed25519PrivateKey, data: bytes, seconds: float = 1.0) -> float:
    """Ed25519 verifications/s with every core verifying at once (one process each, started together): what
    `cores x 1 / one verification` comes to on this machine, where cores slow each other down (shared caches,
    a hypervisor's siblings)."""
    ctx = mp.get_context("forkserver")  # no fork of a process that runs an event loop and threads
    n = cores()
    barrier, out = ctx.Barrier(n), ctx.Queue()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    procs = [ctx.Process(target=_verify_for, args=(barrier, seconds, public, key.sign(data), data, out))
             for _ in range(n)]
    for proc in procs:
        proc.start()
    total: int = sum(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(10)
    return total / seconds


def ed25519_sign_s(key: ed25519.Ed25519PrivateKey, data: bytes, n: int = 2000) -> float:
    return best_seconds(lambda: key.sign(data), n)


def memset_memcmp_gbs(size: int, chunk: int = 256 << 10) -> float:
    """Bytes/s of a plain memset to zero of `size` bytes of resident memory, then a memcmp of all of it
    against a zero chunk (what a scrub must write and read back), best of 3; no mapping or faults timed."""
    zero = (ctypes.c_char * chunk)()
    with mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE,
                   mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        view = (ctypes.c_char * size).from_buffer(mm)
        try:
            base = ctypes.addressof(view)
            best = float("inf")
            for _ in range(3):
                ctypes.memset(base, 0xA5, size)  # data to overwrite, as a guest leaves it
                t0 = time.perf_counter()
                ctypes.memset(base, 0, size)
                bad = sum(1 for off in range(0, size, chunk) if _libc.memcmp(base + off, zero, chunk))
                best = min(best, time.perf_counter() - t0)
                assert bad == 0
        finally:
            del view
    return size / best / 1e9


def sha256_in_memory_gbs(paths: Sequence[Path]) -> float:
    """Bytes/s of hashlib SHA-256 over the files' bytes already in this process's memory, best of 3."""
    blobs = [p.read_bytes() for p in paths]
    size = sum(len(b) for b in blobs)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for b in blobs:
            hashlib.sha256(b).digest()
        best = min(best, time.perf_counter() - t0)
    return size / best / 1e9


def release_crypto_s(signed_result: bytes, released: bytes, key: ed25519.Ed25519PrivateKey, n: int = 500) -> float:
    """The CPU cost of one key release's own crypto, measured alone: verify the attestation result's
    signature, unwrap the DEK under the KEK (AES-256-GCM), seal it with HPKE to a fresh instance key, sign
    the `key.released` event."""
    sig, pub = key.sign(signed_result), key.public_key()
    ring = KekRing({1: bytearray(os.urandom(32))})
    aad = b"qvm-volume-dek\x00bench"
    wrapped = ring.wrap(os.urandom(32), aad)
    recipient = x25519.X25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    info = hpke.release_info("dek", "bench", "bench-instance")

    def one() -> None:
        pub.verify(sig, signed_result)
        dek = ring.unwrap(wrapped, aad)
        try:
            hpke.seal(dek, recipient, info)
        finally:
            zeroize(dek)
        key.sign(released)

    try:
        return best_seconds(one, n)
    finally:
        ring.close()


async def nats_publish_rate(js: JetStreamContext, outs: Sequence[Outgoing], window: int = 64) -> float:
    """Publishes/s that this machine's NATS stores and acknowledges for one client: `outs` (pre-signed)
    published with `window` in flight, each awaiting its JetStream ack, exactly as the placement bench
    submits jobs, with nothing consuming them (the bus floor of a placement)."""
    async def one(out: Outgoing) -> None:
        await js.publish(out.subject, out.data, headers={"Nats-Msg-Id": out.event_id})

    t0 = time.perf_counter()
    await windowed(list(outs), one, window)
    return len(outs) / (time.perf_counter() - t0)


async def bare_qemu_boot_ms(argv: list[str], channel: socket.socket, pass_fds: Sequence[int],
                            timeout_s: float = 120.0) -> float:
    """Milliseconds from exec of `argv` (QEMU with the same kernel, initramfs, disks and command line the
    agent would give it; no namespace, cgroup, seccomp or agent RAM) to the guest init's READY line on
    `channel`; QEMU is killed afterwards."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, pass_fds=tuple(pass_fds), stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                start_new_session=True)
    try:
        reader, writer = await asyncio.open_connection(sock=channel)
        try:
            async with asyncio.timeout(timeout_s):
                while not (line := await reader.readline()).startswith(b"READY"):
                    if not line:
                        raise RuntimeError("the bare guest closed its channel before READY")
            return (time.perf_counter() - t0) * 1000
        finally:
            writer.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
