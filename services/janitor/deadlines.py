"""What the janitor must do now, decided from the folded job book alone (pure, testable without a bus).

- A job in a phase past that phase's deadline fails with `deadline_exceeded` (phase recorded).
- A job on a node that went offline fails with `node_lost`.
- A job whose client asked to cancel is cancelled.
- A job whose instance was destroyed after it exited is done.
Every failed or cancelled job that holds a node gets a teardown request for that node.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.janitor.settings import JanitorSettings
from shared.lifecycle import JobBook, JobState, JobView

__all__ = ["Action", "due_actions", "jobs_on_node"]


@dataclass(frozen=True)
class Action:
    job: JobView
    kind: str  # "fail" | "cancel" | "done"
    reason: str
    detail: str = ""


def _deadline(job: JobView, settings: JanitorSettings) -> float | None:
    match job.state:
        case JobState.PENDING:
            return settings.deadline_pending_s
        case JobState.PLACED:
            return settings.deadline_placed_s
        case JobState.PROVISIONING | JobState.ATTESTING:
            return settings.deadline_provisioning_s
        case JobState.RUNNING:
            runtime = job.spec.max_runtime_s if job.spec else settings.deadline_provisioning_s
            return runtime + settings.deadline_run_grace_s
        case JobState.STOPPING | JobState.CLEANING:
            return settings.deadline_teardown_s
    return None


def due_actions(book: JobBook, now_ns: int, settings: JanitorSettings) -> list[Action]:
    out: list[Action] = []
    for job in book.active():
        if job.cancel_requested:
            out.append(Action(job, "cancel", job.reason or "client_request"))
            continue
        if job.state is JobState.CLEANING:
            out.append(Action(job, "done", "torn_down"))
            continue
        limit = _deadline(job, settings)
        if limit is not None and now_ns - job.since_ns > limit * 1e9:
            out.append(Action(job, "fail", "deadline_exceeded",
                              f"{job.state} for more than {limit:g}s"))
    return out


def jobs_on_node(book: JobBook, node_id: str) -> list[JobView]:
    return [j for j in book.active() if j.node_id == node_id]
