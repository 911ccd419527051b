"""The teardown record of a finished job, decided from what the streams say (pure, testable without a bus).

The janitor folds, per job: the node's `instance.destroyed` (with the guest RAM, VRAM and volume wipe
evidence), the key-broker's `key.destroyed`, and the job's own view (its GPUs, whether it had a volume,
whether an instance ever started). A record is made when the job has ended and everything it needs has
been reported, or when the teardown deadline passed without it (then the missing steps say so and the
record is not complete). GPUs return to the pool only through a record: those scrubbed and verified, or
never handed to a VM; the others are quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.events import InstanceDestroyed, KeysDestroyed, TeardownRecord, TeardownStep
from shared.lifecycle import JobState, JobView

__all__ = ["TeardownFacts", "build_record"]


@dataclass
class TeardownFacts:
    """What the streams reported about one job's teardown so far."""

    destroyed: InstanceDestroyed | None = None
    destroyed_ns: int = 0
    exited_ns: int = 0
    keys_destroyed: KeysDestroyed | None = None
    recorded: bool = False


def _outcome(view: JobView) -> str:
    return "done" if view.state in (JobState.CLEANING, JobState.DONE) else str(view.state)


def build_record(view: JobView, facts: TeardownFacts, now_ns: int, deadline_passed: bool) -> TeardownRecord | None:
    """The job's record, or None while it waits for reports (and the deadline has not passed)."""
    if not (view.terminal or view.state is JobState.CLEANING) or facts.recorded:
        return None
    had_instance = bool(view.instance_id)
    needs_keys = bool(view.spec and view.spec.volume_mib)
    waiting = (had_instance and facts.destroyed is None) or (needs_keys and facts.keys_destroyed is None)
    if waiting and not deadline_passed:
        return None
    d = facts.destroyed
    steps: list[TeardownStep] = []
    if not had_instance:
        steps.append(TeardownStep(name="instance", status="not_needed", detail="no instance was started"))
    elif d is None:
        steps.append(TeardownStep(name="instance", status="missing", detail="the node never reported the "
                                                                           "instance destroyed"))
    else:
        steps.append(TeardownStep(name="instance", status="ok", detail=", ".join(d.removed)[:512]))
        ram = d.ram
        if ram is None:
            steps.append(TeardownStep(name="guest_ram", status="missing", detail="no scrub reported"))
        else:
            steps.append(TeardownStep(
                name="guest_ram", status="ok" if ram.verified else "failed",
                detail=f"{ram.method}: {ram.bytes_scrubbed} of {ram.bytes_total} bytes in {ram.duration_ms:g} ms "
                       f"({ram.rate_gbps:g} GB/s); {ram.detail}"[:512]))
    clean: list[str] = []
    quarantined: list[str] = []
    scrubs = {g.gpu_uuid: g for g in (d.gpus if d else ())}
    for uuid in view.gpu_uuids:
        scrub = scrubs.get(uuid)
        if not had_instance:
            clean.append(uuid)
            steps.append(TeardownStep(name=f"vram:{uuid}"[:128], status="not_needed", detail="never attached"))
        elif scrub is not None and scrub.verified:
            clean.append(uuid)
            steps.append(TeardownStep(name=f"vram:{uuid}"[:128], status="ok",
                                      detail=f"{scrub.method}: {scrub.bytes_scrubbed} of {scrub.bytes_total} bytes, "
                                             f"{scrub.rate_gbps:g} GB/s"[:512]))
        else:
            quarantined.append(uuid)
            steps.append(TeardownStep(name=f"vram:{uuid}"[:128], status="failed" if scrub else "missing",
                                      detail=(scrub.detail if scrub else "no verified scrub reported")[:512]))
    if view.spec and view.spec.volume_mib and had_instance:
        v = d.volume if d else None
        ok = v is not None and v.verified_zero and v.removed and v.luks_erase in ("ok", "no_header")
        steps.append(TeardownStep(
            name="volume", status="ok" if ok else ("failed" if v else "missing"),
            detail=(f"luks erase {v.luks_erase}, {v.overwritten_bytes} header bytes overwritten, verified zero "
                    f"{v.verified_zero}, removed {v.removed}" if v else "no erasure reported")[:512]))
    if needs_keys:
        k = facts.keys_destroyed
        steps.append(TeardownStep(name="keys", status="ok" if k else "missing",
                                  detail=f"key-broker: {k.reason}" if k else "the key-broker reported no destruction"))
    ended = view.since_ns
    start = facts.exited_ns or ended
    return TeardownRecord(
        node=view.node_id or "", instance_id=view.instance_id, outcome=_outcome(view), reason=view.reason[:64],
        complete=all(s.status in ("ok", "not_needed") for s in steps), steps=tuple(steps),
        ram=d.ram if d else None, gpus=d.gpus if d else (), volume=d.volume if d else None,
        keys=facts.keys_destroyed.volume if facts.keys_destroyed else None, removed=d.removed if d else (),
        gpus_clean=tuple(clean), gpus_quarantined=tuple(quarantined), ended_ns=ended, recorded_ns=now_ns,
        duration_ms=round(max(0, facts.destroyed_ns - start) / 1e6, 1) if facts.destroyed_ns else 0.0)
