"""`python -m bench`: run every benchmark, print each figure with its method, then one summary table in which
every figure that has a physical or library limit stands beside that limit, measured on this machine in the
same run (`--json`: the table as a JSON document on stdout, progress on stderr; `--only`: some sections)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import attestation, audit, codec, cvm, guard, join, key_release, teardown, vm, warm
from bench.common import Figure, LogCounter, say, say_to, section
from bench.placement import bus_floor, check_claims, kv_sizes, node_ids, paced_line, report_run, run_jobs
from bench.report import summary, summary_json
from bench.stack import bench_stack
from shared.identity import Role
from shared.pki import Pki

NODES = 1000
BURST_JOBS = 10_000
PACED_JOBS = 3000
PACED_RATE = 800.0
PKI_LIMIT_S = 60.0
PKI_SAMPLE = 50
PLACEMENTS_TARGET_RATIO = 0.3  # of the bus floor: ack'd publishes/s that NATS stores for one client
P99_TARGET_MS = 50.0
CLUSTER_RATE = 200.0
CLUSTER_JOBS = 1200


async def _guarded(name: str, logs: LogCounter, body: Callable[[], Awaitable[list[Figure]]]) -> list[Figure]:
    """Run one benchmark; a failure is printed and the remaining benchmarks still run."""
    try:
        return await body()
    except Exception:
        say(f"  {name} FAILED:")
        say("  " + traceback.format_exc().rstrip().replace("\n", "\n  "))
        say("  " + logs.drain())
        return [Figure(f"{name}", None, "")]


def _fleet_pki(root: Path) -> tuple[Pki, list[str], str]:
    """A PKI with 1,000 node-agent identities when issuing them is projected to take <= 60 s."""
    nodes = node_ids(NODES)
    pki = Pki(root)
    t0 = time.perf_counter()
    pki.init()
    t1 = time.perf_counter()
    pki.init(nodes=nodes[:PKI_SAMPLE])
    per_node = (time.perf_counter() - t1) / PKI_SAMPLE
    projected = per_node * NODES
    if projected > PKI_LIMIT_S:
        return pki, nodes, (f"Pki.init projected {projected:.0f} s for {NODES:,} node identities "
                            f"({per_node * 1000:.1f} ms each, > {PKI_LIMIT_S:.0f} s): issued only {PKI_SAMPLE}")
    pki.init(nodes=nodes)
    total = time.perf_counter() - t0
    return pki, nodes, (f"Pki.init with {NODES:,} node identities (TLS + signing certificate each) took "
                        f"{total:.1f} s ({per_node * 1000:.1f} ms per node), under the {PKI_LIMIT_S:.0f} s limit")


async def _floor(pki: Pki, root: Path) -> float:
    """The placement's bus floor, on a fresh stack of its own (measured before and after each burst: the
    machine's speed drifts, and the figure is held against the mean of the two)."""
    async with bench_stack(pki, root) as stack:
        floor = await bus_floor(stack, BURST_JOBS, root.name)
    say(f"  limit: the bus floor, {BURST_JOBS:,} of the same job.submitted published by one client (64 in flight, "
        f"each ack awaited) on a fresh stack with no scheduler: {floor:,.0f}/s")
    return floor


async def _placement_and_audit(tmp: Path, logs: LogCounter) -> list[Figure]:
    figs: list[Figure] = []
    section(
        "2. Placement (burst)",
        f"{NODES:,} nodes (128 cores, 1 TiB, 8x H100 80GB each; trusted, online) written as NodeRecords into the "
        f"qvm_nodes KV bucket as `scheduler` (node.registered cannot make a node trusted: no attestation verifier "
        f"yet); one scheduler in its own process (python -m services.scheduler, as deployed); "
        f"{BURST_JOBS:,} job.submitted (50% CPU "
        "4c/8GiB, 40% 1x H100, 10% 2x H100) pre-signed as `marketplace` and published as fast as possible, 64 in "
        "flight awaiting acks; job.placed timed on arrival at an `admin` push consumer "
        "(qvm.jobs.*.placed.*, no acks); latency = publish call -> arrival",
    )
    pki, nodes, pki_note = _fleet_pki(tmp / "pki")
    say(f"  {pki_note}")
    floors = [await _floor(pki, tmp / "floor-0")]
    async with bench_stack(pki, tmp / "burst") as stack:
        res = await run_jobs(stack, nodes, BURST_JOBS, label="burst 10k", prefix="burst", rate=None,
                             deadline_s=150.0)
        floors.append(await _floor(pki, tmp / "floor-1"))
        figs += report_run(res, p99_target_ms=None, rate_target=PLACEMENTS_TARGET_RATIO,
                           bus_floor=sum(floors[-2:]) / 2)
        admin = await stack.bus(Role.ADMIN)
        chk = await check_claims(admin, nodes, res)
        say(f"  claim check: {chk.line()}")
        fig = Figure("burst: double-booked GPUs / claim errors", chk.problems, "", check=chk.ok, check_target="0",
                     note=f"{chk.claims:,} claims on {chk.nodes_read} nodes")
        say(fig.line())
        figs.append(fig)
        say("  " + await kv_sizes(admin))
        say("  " + logs.drain())

        section(
            "3. Audit replay",
            "shared.audit.audit_replay(admin js, AuditWorkers) over every stream of the burst stack above "
            "(job.submitted + job.placed): the parent fetches and routes raw bytes, shard processes verify every "
            "signature and fold each job's transitions (jobs partitioned by id); events/s = verified events / "
            "wall time; AuditWorkers() (one shard per core), run twice, then AuditWorkers(workers=0) (inline)",
        )
        figs += await audit.run(admin, pki, stack.server_pid)
        say("  " + logs.drain())

    section(
        "2d. Placement (burst, two scheduler replicas, fresh stack)",
        "as 2., with two `python -m services.scheduler` processes sharing the durable consumer; compare-and-set "
        "on the node records keeps them from double-booking",
    )
    async with bench_stack(pki, tmp / "burst-2") as stack:
        res2 = await run_jobs(stack, nodes, BURST_JOBS, label="burst 10k, 2 replicas", prefix="burst2", rate=None,
                              deadline_s=150.0, replicas=2)
        floors.append(await _floor(pki, tmp / "floor-2"))
        figs += report_run(res2, p99_target_ms=None, rate_target=PLACEMENTS_TARGET_RATIO,
                           bus_floor=sum(floors[-2:]) / 2)
        chk = await check_claims(await stack.bus(Role.ADMIN), nodes, res2)
        say(f"  claim check: {chk.line()}")
        fig = Figure("burst, 2 replicas: double-booked GPUs / claim errors", chk.problems, "", check=chk.ok,
                     check_target="0", note=f"{chk.claims:,} claims on {chk.nodes_read} nodes")
        say(fig.line())
        figs.append(fig)
    say("  " + logs.drain())

    # 800/s as asked; then half the burst throughput measured above, which this machine can sustain.
    sustainable = max(100.0, min(PACED_RATE, res.throughput() / 2) // 50 * 50)
    runs = [(PACED_RATE, PACED_JOBS)]
    if sustainable < PACED_RATE:
        runs.append((sustainable, int(min(PACED_JOBS, max(600, sustainable * 6)))))
    for i, (rate, jobs) in enumerate(runs):
        section(
            f"2{'bc'[i]}. Placement (paced at {rate:.0f}/s, fresh stack)",
            f"same fleet and job mix on a new NATS + scheduler; {jobs:,} jobs submitted at a fixed {rate:.0f}/s "
            "(publish i at t0 + i/rate, acks awaited concurrently); latency = publish call -> job.placed arrival"
            + ("; rate = half the burst throughput above, rounded down to 50/s" if i else ""),
        )
        async with bench_stack(pki, tmp / f"paced-{i}") as stack:
            half = rate <= res.throughput() / 2  # the p99 budget holds at half the measured capacity, not beyond
            label = f"paced {rate:.0f}/s" + (" (<= half capacity)" if half else " (over half capacity)")
            paced = await run_jobs(stack, nodes, jobs, label=label, prefix=f"paced{i}", rate=rate,
                                   deadline_s=60.0)
            say(paced_line(paced, rate))
            figs += report_run(paced, p99_target_ms=P99_TARGET_MS if half else None, rate_target=None)
            chk = await check_claims(await stack.bus(Role.ADMIN), nodes, paced)
            say(f"  claim check: {chk.line()}")
            fig = Figure(f"paced {rate:.0f}/s: double-booked GPUs / claim errors", chk.problems, "",
                         check=chk.ok, check_target="0", note=f"{chk.claims:,} claims on {chk.nodes_read} nodes")
            say(fig.line())
            figs.append(fig)
        say("  " + logs.drain())
    section(
        f"2e. Placement through a 3-server NATS cluster (paced at {CLUSTER_RATE:.0f}/s, fresh stack)",
        f"as 2b, {CLUSTER_JOBS:,} jobs, on three nats-server processes clustered on this machine (mutual TLS "
        "routes; every stream and bucket with 3 replicas, so each stored message is acknowledged by a quorum); "
        "clients given all three URLs; compare with the single server's paced run above (same rate: "
        f"{CLUSTER_RATE:.0f}/s is both)",
    )
    async with bench_stack(pki, tmp / "cluster", servers=3) as stack:
        clustered = await run_jobs(stack, nodes, CLUSTER_JOBS, label=f"3-server cluster, paced {CLUSTER_RATE:.0f}/s",
                                   prefix="cluster", rate=CLUSTER_RATE, deadline_s=90.0)
        say(paced_line(clustered, CLUSTER_RATE))
        figs += report_run(clustered, p99_target_ms=P99_TARGET_MS, rate_target=None)
    async with bench_stack(pki, tmp / "single-same-rate") as stack:
        single = await run_jobs(stack, nodes, CLUSTER_JOBS, label=f"1 server, paced {CLUSTER_RATE:.0f}/s",
                                prefix="single", rate=CLUSTER_RATE, deadline_s=90.0)
        say(paced_line(single, CLUSTER_RATE))
        figs += report_run(single, p99_target_ms=P99_TARGET_MS, rate_target=None)
    say("  " + logs.drain())
    return figs


async def _codec(tmp: Path, logs: LogCounter) -> list[Figure]:
    figs = await codec.run(tmp)
    say("  " + logs.drain())
    return figs


Body = Callable[[Path, LogCounter], Awaitable[list[Figure]]]
_RUNS: list[tuple[str, str, Body]] = [  # (--only key, heading, body(tmp, logs))
    ("codec", "1. per-event cost", lambda tmp, logs: _codec(tmp / "codec", logs)),
    ("placement", "2./3. placement + audit", lambda tmp, logs: _placement_and_audit(tmp / "fleet", logs)),
    ("vm", "4. micro VM runtime", lambda tmp, _: vm.run(tmp / "vm")),
    ("attestation", "5. attestation", lambda tmp, _: attestation.run(tmp / "attestation")),
    ("keys", "6. key release", lambda tmp, _: key_release.run(tmp / "key-release")),
    ("teardown", "7. teardown", lambda tmp, _: teardown.run(tmp / "teardown")),
    ("join", "8. joining", lambda tmp, _: join.run(tmp / "join")),
    ("cvm", "9. CVM evidence", lambda tmp, _: cvm.run(tmp / "cvm")),
    ("guard", "10. runtime guard", lambda tmp, _: guard.run(tmp / "guard")),
    ("warm", "11. warm instances", lambda tmp, _: warm.run(tmp / "warm")),
]
SECTIONS = tuple(key for key, _, _ in _RUNS)


async def _run_all(tmp: Path, logs: LogCounter, only: set[str]) -> list[Figure]:
    figs: list[Figure] = []
    for key, name, body in _RUNS:
        if key in only:
            figs += await _guarded(name, logs, functools.partial(body, tmp, logs))
    return figs


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--json", action="store_true", help="the summary as JSON on stdout (progress on stderr)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if unknown := only - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if args.json:
        say_to(sys.stderr)
    logs = LogCounter()
    logs.install()
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # ssl eof_received chatter when connections close
    started = time.perf_counter()
    load_at_start = _load()
    say(f"qvm benchmarks on {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"load average at start {load_at_start} (other processes on this machine skew every figure)")
    try:
        with tempfile.TemporaryDirectory(prefix="qvm-bench-") as d:
            figs = asyncio.run(_run_all(Path(d), logs, only))
    finally:
        logs.uninstall()
    seconds = time.perf_counter() - started
    if args.json:
        summary_json(figs, {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
                            "seconds": round(seconds, 1), "load_at_start": load_at_start, "load_at_end": _load(),
                            "sections": sorted(only)}, sys.stdout)
        return 0
    say()
    summary(figs, title=f"qvm benchmark summary ({seconds:.0f} s in all; load average at end {_load()}); ratio = "
                        "measured / limit, both from this run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
