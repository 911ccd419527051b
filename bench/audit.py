"""3. Audit replay rate: shared.audit.audit_replay over the placement stack, sharded over processes and inline."""

from __future__ import annotations

import os

from bench.common import Figure, say
from bench.limits import CpuMeter, cores, ed25519_verify_rate_all_cores, ed25519_verify_s
from shared.audit import AuditReport, AuditWorkers, audit_replay
from shared.bus import Bus
from shared.codec import Codec
from shared.events import JobSubmitted
from shared.identity import Identity, Role
from shared.pki import Pki

__all__ = ["TARGET_RATIO", "run"]

TARGET_RATIO = 0.85  # of every core verifying signatures: the audit cannot beat checking every signature once


def _line(label: str, r: AuditReport) -> str:
    streams = ", ".join(f"{k} {v:,}" for k, v in sorted(r.per_stream.items()))
    states = ", ".join(f"{k} {v:,}" for k, v in sorted(r.job_states.items()))
    return (f"  {label}: {r.events:,} events in {r.seconds:.2f} s; violations {len(r.violations)}, dead letters "
            f"{len(r.dead_letters)}; streams: {streams}; job states: {states}")


async def run(admin: Bus, pki: Pki, server_pid: int | None = None) -> list[Figure]:
    bundle, ca = pki.trust_bundle.read_bytes(), pki.ca_cert.read_bytes()
    signer = pki.signer(Identity(Role.MARKETPLACE))
    sample = Codec(signer, pki.load_trust()).encode(JobSubmitted(owner="bench-client", image="img"), job_id="a-1")
    n = cores()
    before = ed25519_verify_s(signer.key, sample.data)
    all_before = ed25519_verify_rate_all_cores(signer.key, sample.data)
    pool = AuditWorkers(bundle, ca)  # default: one shard process per core
    try:
        cold = await audit_replay(admin.js, pool)
        say(_line(f"pool of {pool.workers}, first run (includes worker start-up)", cold))
        pids = {"parent (fetch + route)": os.getpid(), **{f"shard-{i}": pid for i, pid in enumerate(pool.pids)}}
        meter = CpuMeter.with_server(pids, server_pid)
        meter.start()
        warm = await audit_replay(admin.js, pool)
        meter.stop()
        say(_line(f"pool of {pool.workers}, second run (warm workers)", warm))
    finally:
        pool.close()
    between = ed25519_verify_s(signer.key, sample.data)
    all_after = ed25519_verify_rate_all_cores(signer.key, sample.data)
    verify_s = (before + between) / 2  # measured on each side of the pooled runs: the machine's speed drifts
    limit = (all_before + all_after) / 2
    say(f"  limit: {n} cores verifying at once: {all_before:,.0f} Ed25519 verifications/s before, {all_after:,.0f} "
        f"after (one core alone: {1 / before:,.0f}/s and {1 / between:,.0f}/s, so {n} x one core would say "
        f"{n / verify_s:,.0f}/s)")
    say(f"  {meter.per(max(1, warm.events), 'event')}; Ed25519 verify alone {verify_s * 1e6:.0f} µs")
    inline_verifier = AuditWorkers(bundle, ca, workers=0)
    try:
        inline = await audit_replay(admin.js, inline_verifier)
        say(_line("inline (workers=0)", inline))
    finally:
        inline_verifier.close()
    inline_s = (between + ed25519_verify_s(signer.key, sample.data)) / 2
    of = f"{n} cores verifying Ed25519 at once"
    figs = [
        Figure(f"audit replay, {pool.workers} workers (cold pool)", cold.rate, "events/s",
               note="ok" if cold.ok else f"{len(cold.violations)} violations", limit=limit, limit_of=of),
        Figure(f"audit replay, {pool.workers} workers (warm pool)", warm.rate, "events/s", TARGET_RATIO,
               higher_is_better=True, note="ok" if warm.ok else f"{len(warm.violations)} violations", limit=limit,
               limit_of=of),
        Figure("audit replay, inline (workers=0)", inline.rate, "events/s", higher_is_better=True,
               note="ok" if inline.ok else f"{len(inline.violations)} violations", limit=1 / inline_s,
               limit_of="1 core / Ed25519 verify"),
    ]
    for f in figs:
        say(f.line())
    for v in (cold.violations or inline.violations)[:3]:
        say(f"  violation: {v}")
    return figs
