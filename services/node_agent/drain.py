"""Drain: the hoster takes this node out of the pool without stopping what runs on it.

Why a file, not an event: `qvm node drain` runs on the host, as root, beside the agent (a systemd service);
the hoster holds no bus identity of their own, and the request must outlive an agent restart (a drained
host being patched must not pick up work when the agent comes back). So the request is the file
`<state_dir>/draining` (`shared.nodestatus.drain_path`), and the agent looks at it with one `stat` on every
heartbeat tick and before deciding each assignment: a drain takes effect for the next placement, not the
next heartbeat.

While draining the agent
  - refuses each new assignment (`job.refused`, reason `node_draining`): the scheduler places the job
    elsewhere, or it stays pending;
  - says so in every `node.heartbeat` (`draining`), so the scheduler stops choosing this node at all (the
    refusals only cover the moments before it hears);
  - keeps running what it already accepted, to the end, and tears it down as always.
`qvm node drain --wait` then waits for `node-status.json` to list no job; removing the file
(`qvm node undrain`) ends the drain at the next tick.
"""

from __future__ import annotations

from pathlib import Path

from services.node_agent.hardware_check import Refusal
from shared.nodestatus import drain_path
from shared.telemetry import get_logger

__all__ = ["DRAINING", "DrainWatch", "drain_refusal"]

log = get_logger("qvm.node_agent.drain")
DRAINING = "node_draining"


def drain_refusal(draining: bool) -> Refusal | None:
    """The decision on a new assignment: a draining node takes none."""
    if not draining:
        return None
    return Refusal(DRAINING, "the hoster is draining this node (qvm node drain): it takes no new jobs and "
                             "finishes the ones it runs")


class DrainWatch:
    """The hoster's drain request, as last seen: `poll()` stats the file and logs a change."""

    def __init__(self, state_dir: Path) -> None:
        self.path = drain_path(state_dir)
        self.draining = False
        self.since_ns = 0

    def poll(self) -> bool:
        try:
            since, draining = self.path.stat().st_mtime_ns, True
        except FileNotFoundError:
            since, draining = 0, False
        except OSError as exc:  # unreadable state dir: keep the last answer rather than guess
            log.warning("cannot check the drain request", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
            return self.draining
        if draining != self.draining:
            log.warning("node draining: no new jobs" if draining else "drain ended: taking jobs again",
                        extra={"path": str(self.path)})
        self.draining, self.since_ns = draining, since
        return draining
