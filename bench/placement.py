"""2. Placement: one scheduler process (`python -m services.scheduler`, as deployed) over 1,000 registered
nodes; a burst and paced runs.

The fleet is written straight into the `qvm_nodes` KV bucket as the scheduler identity (trusted, online,
8 H100 each): registration events cannot make a node trusted while the attestation verifier does not
exist, and the scheduler's default minimum trust is `trusted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.common import Figure, fmt_rate, percentile, say, windowed
from bench.limits import CpuMeter, nats_publish_rate
from bench.stack import BenchStack, log_problems, scheduler_process
from services.scheduler.placement import NodeRecord, NodeStatus
from shared.bus import Bus
from shared.codec import Outgoing
from shared.events import JobPlaced, JobSubmitted
from shared.identity import Role
from shared.models import GpuInfo, GpuRequest, HardwareProfile, Inventory, ResourceClaim, TpmInfo, TrustState

__all__ = [
    "GPU_NAME", "ClaimCheck", "RunResult", "bus_floor", "check_claims", "job_payload", "kv_sizes", "node_ids",
    "paced_line", "register_nodes", "report_run", "run_jobs",
]

GPU_NAME = "NVIDIA H100 80GB HBM3"
GPUS_PER_NODE = 8
WINDOW = 64

_CPU_JOB = JobSubmitted(owner="bench-client", image="registry.example/qvm/batch:1", profile=HardwareProfile(
    cpu_cores=4, ram_mib=8 * 1024))
_GPU1_JOB = JobSubmitted(owner="bench-client", image="registry.example/qvm/pytorch:2.4", profile=HardwareProfile(
    cpu_cores=8, ram_mib=64 * 1024, gpus=GpuRequest(count=1, model="H100", min_vram_mib=80000)))
_GPU2_JOB = JobSubmitted(owner="bench-client", image="registry.example/qvm/pytorch:2.4", profile=HardwareProfile(
    cpu_cores=16, ram_mib=128 * 1024, gpus=GpuRequest(count=2, model="H100", min_vram_mib=80000)))


def node_ids(n: int) -> list[str]:
    return [f"node-{i:04d}" for i in range(n)]


def job_payload(i: int) -> JobSubmitted:
    """50% CPU-only (4 cores, 8 GiB), 40% one H100 (8 cores, 64 GiB), 10% two H100 (16 cores, 128 GiB)."""
    k = i % 10
    return _CPU_JOB if k < 5 else _GPU1_JOB if k < 9 else _GPU2_JOB


def node_record(node_id: str, now_ns: int) -> NodeRecord:
    inv = Inventory(
        hostname=node_id, cpu_model="AMD EPYC 9654 96-Core Processor", cpu_cores=128, ram_mib=1048576,
        gpus=tuple(GpuInfo(index=i, uuid=f"GPU-{node_id}-{i}", name=GPU_NAME, memory_mib=81559,
                           pci_bus_id=f"0000:{0x18 + i:02x}:00.0") for i in range(GPUS_PER_NODE)),
        vmms=("qemu-microvm",), kvm=True, tpm=TpmInfo(present=True, device="/dev/tpmrm0"),
    )
    return NodeRecord(node_id=node_id, inventory=inv, agent_version="bench", trust=TrustState.TRUSTED,
                      status=NodeStatus.ONLINE, last_seen_ns=now_ns)


async def register_nodes(bus: Bus, nodes: list[str]) -> float:
    """Write every node record into `qvm_nodes` (as the scheduler identity); returns seconds taken."""
    kv = await bus.js.key_value("qvm_nodes")
    now = time.time_ns()
    t0 = time.perf_counter()

    async def put(node_id: str) -> None:
        await kv.put(node_id, msgpack.packb(node_record(node_id, now).model_dump(mode="json"), use_bin_type=True))

    await windowed(nodes, put, WINDOW)
    return time.perf_counter() - t0


@dataclass
class RunResult:
    label: str
    jobs: int
    published_at: dict[str, float] = field(default_factory=dict)  # perf_counter at the publish call
    published_wall: dict[str, float] = field(default_factory=dict)  # time.time() at the publish call
    placed_at: dict[str, float] = field(default_factory=dict)  # perf_counter when admin received job.placed
    placed_stored: dict[str, float] = field(default_factory=dict)  # stream timestamp of job.placed (epoch s)
    placed_raw: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    duplicates: int = 0
    register_s: float = 0.0
    presign_s: float = 0.0
    publish_s: float = 0.0
    log_summary: str = ""
    error: str = ""
    cpu: str = ""  # CPU per placement, process by process, from first publish to last placement

    def latencies_ms(self) -> list[float]:
        return sorted((self.placed_at[j] - self.published_at[j]) * 1000 for j in self.placed_at
                      if j in self.published_at)

    def stored_latencies_ms(self) -> list[float]:
        return sorted((self.placed_stored[j] - self.published_wall[j]) * 1000 for j in self.placed_stored
                      if j in self.published_wall)

    def span_s(self) -> float:
        if not self.placed_at or not self.published_at:
            return 0.0
        return max(self.placed_at.values()) - min(self.published_at.values())

    def throughput(self) -> float:
        span = self.span_s()
        return len(self.placed_at) / span if span > 0 else 0.0


async def run_jobs(
    stack: BenchStack, nodes: list[str], jobs: int, *, label: str, prefix: str, rate: float | None,
    deadline_s: float, stall_s: float = 15.0, replicas: int = 1,
) -> RunResult:
    """Register `nodes`, start a scheduler, submit `jobs` (as fast as possible, or at `rate`/s) and
    wait until every job.placed arrived (or `deadline_s` / `stall_s` without progress)."""
    res = RunResult(label, jobs)
    admin = await stack.bus(Role.ADMIN)
    all_placed = asyncio.Event()

    async def on_placed(msg: Msg) -> None:
        now = time.perf_counter()
        job = msg.subject.split(".")[2]
        if job in res.placed_at:
            res.duplicates += 1
            return
        res.placed_at[job] = now
        res.placed_raw[job] = (msg.subject, msg.data)
        with contextlib.suppress(Exception):
            res.placed_stored[job] = msg.metadata.timestamp.timestamp()
        if len(res.placed_at) >= jobs:
            all_placed.set()

    async def on_pending(msg: Msg) -> None:
        res.pending.add(msg.subject.split(".")[2])

    # Ephemeral push consumers, no acks and no flow control: admin may create consumers and read its
    # inbox, but may not publish flow-control replies ($JS.FC), so ordered consumers are not an option.
    cfg = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
    subs = [
        await admin.js.subscribe("qvm.jobs.*.placed.*", stream="QVM_JOBS", cb=on_placed, config=cfg),
        await admin.js.subscribe("qvm.jobs.*.pending", stream="QVM_JOBS", cb=on_pending,
                                 config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)),
    ]

    res.register_s = await register_nodes(await stack.bus(Role.SCHEDULER), nodes)
    async with contextlib.AsyncExitStack() as running:
        sched_logs = [await running.enter_async_context(scheduler_process(stack, f"scheduler-{i}"))
                      for i in range(replicas)]

        market = await stack.bus(Role.MARKETPLACE)
        t0 = time.perf_counter()
        outs = [market.codec.encode(job_payload(i), job_id=f"{prefix}-{i:05d}") for i in range(jobs)]
        res.presign_s = time.perf_counter() - t0
        meter = _meter(stack)
        meter.start()

        async def publish(out: Outgoing) -> None:
            job = out.envelope.job_id or ""
            res.published_wall[job] = time.time()
            res.published_at[job] = time.perf_counter()
            await market.js.publish(out.subject, out.data, headers={"Nats-Msg-Id": out.event_id})

        t0 = time.perf_counter()
        if rate is None:
            await windowed(outs, publish, WINDOW)
        else:
            await _paced(outs, publish, rate)
        res.publish_s = time.perf_counter() - t0

        deadline = time.monotonic() + deadline_s
        last_n, last_change = -1, time.monotonic()
        while not all_placed.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_placed.wait(), 0.25)
            n = len(res.placed_at)
            if n != last_n:
                last_n, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                res.error = f"no placement for {stall_s:.0f} s"
                break
        else:
            if not all_placed.is_set():
                res.error = f"deadline of {deadline_s:.0f} s reached"
        meter.stop()
        res.cpu = meter.per(max(1, len(res.placed_at)), "placement")
        res.log_summary = "; ".join(log_problems(log) for log in sched_logs)
    for s in subs:
        with contextlib.suppress(Exception):
            await s.unsubscribe()
    return res


async def bus_floor(stack: BenchStack, jobs: int, prefix: str) -> float:
    """The placement's bus floor: job.submitted/s that this stack's NATS stores and acknowledges for one client
    (pre-signed, published as `run_jobs` publishes them), with no scheduler running."""
    market = await stack.bus(Role.MARKETPLACE)
    outs = [market.codec.encode(job_payload(i), job_id=f"{prefix}-{i:05d}") for i in range(jobs)]
    return await nats_publish_rate(market.js, outs, WINDOW)


def _meter(stack: BenchStack) -> CpuMeter:
    """The scheduler processes, nats-server (a single server) and this process (the marketplace's publisher
    and the admin's placement reader)."""
    pids = {f"scheduler-{i}": pid for i, pid in enumerate(CpuMeter.children("services.scheduler"))}
    return CpuMeter.with_server({**pids, "bench": os.getpid()}, stack.server_pid)


async def _paced(outs: list[Outgoing], publish: Callable[[Outgoing], Coroutine[Any, Any, None]], rate: float) -> None:
    """Start publish i at t0 + i/rate (each awaits its own ack concurrently); catch up when late."""
    pending: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()
    for i, out in enumerate(outs):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(publish(out))
        pending.add(t)
        t.add_done_callback(pending.discard)
    await asyncio.gather(*list(pending))


@dataclass
class ClaimCheck:
    nodes_read: int = 0
    claims: int = 0
    double_booked_gpus: int = 0
    foreign_gpus: int = 0
    overcommitted_nodes: int = 0
    placed_without_one_claim: int = 0
    placed_claim_mismatch: int = 0
    stray_claims: int = 0

    @property
    def problems(self) -> int:
        return (self.double_booked_gpus + self.foreign_gpus + self.overcommitted_nodes
                + self.placed_without_one_claim + self.placed_claim_mismatch + self.stray_claims)

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def line(self) -> str:
        return (f"{self.nodes_read} node records, {self.claims:,} claims: double-booked GPUs "
                f"{self.double_booked_gpus}, GPUs not on the claiming node {self.foreign_gpus}, over-committed "
                f"nodes {self.overcommitted_nodes}, placed jobs without exactly one claim "
                f"{self.placed_without_one_claim}, claim != job.placed {self.placed_claim_mismatch}, "
                f"claims without job.placed {self.stray_claims}")


async def check_claims(admin: Bus, nodes: list[str], res: RunResult) -> ClaimCheck:
    """Read every node record from KV (direct gets as admin) and cross-check with the job.placed events."""
    kv = await admin.js.key_value("qvm_nodes")
    records: dict[str, NodeRecord] = {}

    async def get(node_id: str) -> None:
        entry = await kv.get(node_id)
        if entry.value:
            records[node_id] = NodeRecord.model_validate(msgpack.unpackb(entry.value, raw=False))

    await windowed(nodes, get, WINDOW)
    chk = ClaimCheck(nodes_read=len(records))
    gpu_owner: dict[str, str] = {}
    claims_of: dict[str, list[tuple[str, ResourceClaim]]] = {}
    for node_id, rec in records.items():
        own = {g.uuid for g in rec.inventory.gpus}
        for job, c in rec.claims.items():
            chk.claims += 1
            claims_of.setdefault(job, []).append((node_id, c.claim))
            for u in c.claim.gpu_uuids:
                if u not in own:
                    chk.foreign_gpus += 1
                if u in gpu_owner:
                    chk.double_booked_gpus += 1
                gpu_owner[u] = job
        if rec.free_cpu() < 0 or rec.free_ram() < 0:
            chk.overcommitted_nodes += 1
    for job, (subject, data) in res.placed_raw.items():
        held = claims_of.get(job, [])
        if len(held) != 1:
            chk.placed_without_one_claim += 1
            continue
        placed = admin.codec.decode(subject, data).payload
        if not isinstance(placed, JobPlaced) or (placed.node_id, placed.claim) != held[0]:
            chk.placed_claim_mismatch += 1
    chk.stray_claims = sum(1 for job in claims_of if job not in res.placed_raw)
    return chk


def report_run(res: RunResult, *, p99_target_ms: float | None, rate_target: float | None,
               bus_floor: float | None = None) -> list[Figure]:
    """Print one run's figures; returns those for the summary. With `bus_floor` (ack'd publishes/s of one
    client, measured in this run), the placement rate is held against it and `rate_target` is the ratio."""
    lat = res.latencies_ms()
    stored = res.stored_latencies_ms()
    placed = len(res.placed_at)
    say(f"  nodes registered in {res.register_s:.2f} s; {res.jobs:,} job.submitted pre-signed in "
        f"{res.presign_s:.2f} s, published in {res.publish_s:.2f} s ({fmt_rate(res.jobs, res.publish_s)})")
    say(f"  placed {placed:,}/{res.jobs:,}, pending {len(res.pending)}, duplicate job.placed {res.duplicates}"
        + (f"; STOPPED: {res.error}" if res.error else ""))
    say(f"  {res.log_summary}")
    say(f"  {res.cpu}")
    if stored:
        say(f"  publish -> job.placed stored (server timestamp): p50 {percentile(stored, 50):.1f} ms, "
            f"p99 {percentile(stored, 99):.1f} ms")
    figs = [
        Figure(f"{res.label}: placements/s", res.throughput() if placed else None, "/s", rate_target,
               higher_is_better=True, note=f"{placed:,} jobs over {res.span_s():.2f} s, first publish -> last placed",
               limit=bus_floor, limit_of="NATS ack'd publishes/s, 1 client" if bus_floor else ""),
        Figure(f"{res.label}: submit->placed p50", percentile(lat, 50) if lat else None, "ms"),
        Figure(f"{res.label}: submit->placed p99", percentile(lat, 99) if lat else None, "ms", p99_target_ms,
               note=f"max {lat[-1]:.1f} ms" if lat else ""),
    ]
    for f in figs:
        say(f.line())
    return figs


async def kv_sizes(admin: Bus) -> str:
    """How many messages the scheduler's KV buckets hold (each bucket keeps one value per key)."""
    parts = []
    for bucket in ("qvm_nodes", "qvm_jobs"):
        info = await admin.js.stream_info(f"KV_{bucket}")
        parts.append(f"KV_{bucket}: {info.state.messages:,} messages, {info.state.bytes / 1e6:.1f} MB")
    return "; ".join(parts)


def paced_line(res: RunResult, rate: float) -> str:
    span = max(res.published_at.values()) - min(res.published_at.values()) if res.published_at else 0.0
    return f"  offered {res.jobs:,} jobs at {rate:.0f}/s target, achieved {fmt_rate(res.jobs - 1, span)}"
