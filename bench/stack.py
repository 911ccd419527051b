"""An embedded NATS (TLS, generated permissions, JetStream) with provisioned streams, for one benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from services.node_agent.settings import NodeAgentSettings
from services.scheduler.settings import SchedulerSettings
from shared.bus import Bus
from shared.identity import Identity, Role
from shared.natsserver import EmbeddedCluster, EmbeddedNats
from shared.pki import Pki
from shared.provision import provision

__all__ = ["BenchSettings", "BenchStack", "bench_stack", "scheduler_process", "service_process"]


class BenchSettings(NodeAgentSettings, SchedulerSettings):
    """What the benchmarks configure: node-agents run in-process, schedulers get `offline_after_s`."""


@dataclass
class BenchStack:
    root: Path
    pki: Pki
    server: EmbeddedNats | EmbeddedCluster
    settings: BenchSettings
    buses: list[Bus] = field(default_factory=list)

    @property
    def server_pid(self) -> int | None:
        """The nats-server's process id (a single server; None for a cluster)."""
        proc = getattr(self.server, "proc", None)
        return int(proc.pid) if proc is not None else None

    async def bus(self, role: Role) -> Bus:
        b = await Bus.connect(self.server.url, self.pki, Identity(role))
        self.buses.append(b)
        return b


@contextlib.asynccontextmanager
async def bench_stack(pki: Pki, root: Path, *, offline_after_s: float = 3600.0, servers: int = 1
                      ) -> AsyncIterator[BenchStack]:
    """Start nats-server under `root` for the identities in `pki` (`servers` > 1: a local cluster, every stream
    and bucket with that many replicas); stop it and close every bus on exit."""
    server: EmbeddedNats | EmbeddedCluster = (EmbeddedCluster(pki, root, size=servers) if servers > 1
                                              else EmbeddedNats(pki, root))
    url = server.start()
    stack: BenchStack | None = None
    try:
        settings = BenchSettings(state_dir=root, nats_url=url, pki_dir=pki.root, offline_after_s=offline_after_s,
                                 stream_replicas=servers)
        stack = BenchStack(root, pki, server, settings)
        admin = await stack.bus(Role.ADMIN)
        await provision(admin.js, settings)
        yield stack
    finally:
        if stack is not None:
            for b in stack.buses:
                await b.close()
        server.stop()


@contextlib.asynccontextmanager
async def service_process(stack: BenchStack, module: str, ready: bytes, name: str,
                          env: dict[str, str] | None = None) -> AsyncIterator[Path]:
    """Run `python -m <module>` as its own process (as deployed) against the bench stack; yields its log file.

    Waits for `ready` in its log, and stops it with SIGTERM (then SIGKILL) on exit. `QVM_BENCH_PROFILE` (a
    path prefix) runs it under cProfile.
    """
    log = stack.root / f"{name}.log"
    full = dict(os.environ)
    full.update({"QVM_NATS_URL": stack.server.url, "QVM_PKI_DIR": str(stack.pki.root),
                 "QVM_STATE_DIR": str(stack.root), "QVM_OFFLINE_AFTER_S": str(stack.settings.offline_after_s),
                 "QVM_LOG_LEVEL": "INFO", **(env or {})})
    with open(log, "wb") as out:
        profile = os.environ.get("QVM_BENCH_PROFILE")
        prefix = ["-m", "cProfile", "-o", f"{profile}.{name}.{int(time.time())}"] if profile else []
        proc = subprocess.Popen([sys.executable, *prefix, "-m", module], env=full, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while ready not in log.read_bytes():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was not ready within 60 s: {log.read_text()[-500:]}")
            await asyncio.sleep(0.05)
        yield log
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def scheduler_process(stack: BenchStack, name: str = "scheduler") -> contextlib.AbstractAsyncContextManager[Path]:
    """`python -m services.scheduler`, ready once it loaded the registry."""
    return service_process(stack, "services.scheduler", b"registry loaded", name)


def log_problems(log: Path) -> str:
    """Count warning/error lines in a service's JSON log."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            counts["non-JSON line"] = counts.get("non-JSON line", 0) + 1
            continue
        if rec.get("level") in ("warning", "error"):
            key = f"{rec['level']}: {rec.get('msg', '')}"
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return "scheduler warnings/errors logged: none"
    return "scheduler warnings/errors logged: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
