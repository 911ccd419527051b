"""Draining a node: the agent's decision on a new assignment, its heartbeat, the scheduler's placement that
skips a draining node, and `qvm node drain / undrain` on the request file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from services.node_agent.drain import DRAINING, DrainWatch, drain_refusal
from services.node_agent.service import NodeAgent
from services.node_agent.settings import NodeAgentSettings
from services.scheduler.placement import NoFit, Placement, choose, claim_still_fits
from shared.cli.node_ops import drain, undrain
from shared.events import JobPlaced, JobRefused, JobSubmitted, NodeHeartbeat
from shared.identity import Identity, Role
from shared.models import ResourceClaim, TrustState
from shared.nodestatus import drain_path
from shared.registry import NodeRecord
from tests.framework.flow import gpu_inventory


def test_a_draining_node_refuses_every_new_assignment() -> None:
    assert drain_refusal(False) is None
    refusal = drain_refusal(True)
    assert refusal is not None and refusal.reason == DRAINING == "node_draining"
    assert len(refusal.reason) <= 64 and "qvm node drain" in refusal.detail


def test_the_watch_follows_the_request_file(tmp_path: Path) -> None:
    watch = DrainWatch(tmp_path)
    assert not watch.poll() and watch.since_ns == 0
    drain_path(tmp_path).write_text("{}")
    assert watch.poll() and watch.since_ns == drain_path(tmp_path).stat().st_mtime_ns
    drain_path(tmp_path).unlink()
    assert not watch.poll() and not watch.draining and watch.since_ns == 0


def test_heartbeat_carries_draining_and_old_producers_stay_valid() -> None:
    assert NodeHeartbeat(seq=1).draining is False
    assert NodeHeartbeat.model_validate({"seq": 1, "jobs": ["job-1"]}).draining is False
    assert NodeHeartbeat(seq=2, draining=True).draining is True


# ---------------------------------------------------------------- the agent


class FakeBus:
    """What the agent touches of a bus when it decides an assignment and beats."""

    def __init__(self) -> None:
        self.identity = Identity(Role.NODE_AGENT, "node-a")
        self.nc = SimpleNamespace(connected_url=None, is_connected=True)
        self.published: list[Any] = []

    async def publish(self, payload: Any, **kw: Any) -> bool:
        self.published.append(payload)
        return True


def _agent(tmp_path: Path) -> tuple[NodeAgent, FakeBus]:
    bus = FakeBus()
    inv = gpu_inventory("node-a", gpus=1, cores=4, ram_mib=4096)
    settings = NodeAgentSettings(state_dir=tmp_path, heartbeat_interval_s=0.05)
    return NodeAgent(bus, settings, inventory=inv, read_gpus=lambda: inv.gpus), bus  # type: ignore[arg-type]


def _placement(job_id: str, seq: int) -> Any:
    placed = JobPlaced(node_id="node-a", attempt=0, job=JobSubmitted(owner="o", image="img"),
                       claim=ResourceClaim(cpu_cores=1, ram_mib=64, gpu_uuids=("GPU-node-a-0",)))
    return SimpleNamespace(payload=placed, job_id=job_id, stream_seq=seq, id=f"0190c0de-0000-7000-8000-{seq:012d}")


async def test_the_agent_refuses_while_draining_and_accepts_after(tmp_path: Path) -> None:
    agent, bus = _agent(tmp_path)
    drain_path(tmp_path).write_text("{}")
    await agent.on_assignment(_placement("job-1", 1))
    assert [type(p).__name__ for p in bus.published] == ["JobRefused"]
    refused = bus.published[0]
    assert isinstance(refused, JobRefused) and refused.reason == "node_draining" and agent.held == {}
    drain_path(tmp_path).unlink()
    await agent.on_assignment(_placement("job-2", 2))
    assert type(bus.published[-1]).__name__ == "JobAccepted" and list(agent.held) == ["job-2"]


async def test_a_held_job_is_still_answered_while_draining(tmp_path: Path) -> None:
    agent, bus = _agent(tmp_path)
    await agent.on_assignment(_placement("job-1", 1))
    drain_path(tmp_path).write_text("{}")
    await agent.on_assignment(_placement("job-1", 1))  # a redelivery of what it took: answered the same way
    assert [type(p).__name__ for p in bus.published] == ["JobAccepted", "JobAccepted"]


async def test_heartbeats_say_draining(tmp_path: Path) -> None:
    agent, bus = _agent(tmp_path)
    drain_path(tmp_path).write_text("{}")
    stop = asyncio.Event()
    task = asyncio.create_task(agent._heartbeats(stop))
    for _ in range(100):
        if any(isinstance(p, NodeHeartbeat) for p in bus.published):
            break
        await asyncio.sleep(0.02)
    stop.set()
    await task
    beats = [p for p in bus.published if isinstance(p, NodeHeartbeat)]
    assert beats and all(b.draining for b in beats)


# ---------------------------------------------------------------- the scheduler


def _job() -> JobSubmitted:
    return JobSubmitted(owner="o", image="i")


def test_placement_never_picks_a_draining_node() -> None:
    a = NodeRecord(node_id="a", inventory=gpu_inventory("a", gpus=0), trust=TrustState.TRUSTED, draining=True)
    b = NodeRecord(node_id="b", inventory=gpu_inventory("b", gpus=0), trust=TrustState.TRUSTED)
    r = choose([a, b], _job(), TrustState.TRUSTED)
    assert isinstance(r, Placement) and r.node_id == "b"
    r = choose([a], _job(), TrustState.TRUSTED)
    assert isinstance(r, NoFit) and r.reason == "draining" and "1 node(s) draining" in r.detail
    assert not claim_still_fits(a, ResourceClaim(cpu_cores=1, ram_mib=64))
    assert claim_still_fits(b, ResourceClaim(cpu_cores=1, ram_mib=64))


def test_an_untrusted_node_is_reported_over_a_draining_one() -> None:
    a = NodeRecord(node_id="a", inventory=gpu_inventory("a", gpus=0), trust=TrustState.TRUSTED, draining=True)
    b = NodeRecord(node_id="b", inventory=gpu_inventory("b", gpus=0), trust=TrustState.UNVERIFIED)
    r = choose([a, b], _job(), TrustState.TRUSTED)
    assert isinstance(r, NoFit) and r.reason == "untrusted"


def test_a_record_without_draining_reads_as_not_draining() -> None:
    rec = NodeRecord.model_validate({"node_id": "a", "inventory": gpu_inventory("a").model_dump()})
    assert rec.draining is False


# ---------------------------------------------------------------- the CLI


def _cli(*commands: tuple[str, Any]) -> typer.Typer:
    app = typer.Typer()
    for name, fn in commands:
        app.command(name)(fn)
    return app


APP = _cli(("drain", drain), ("undrain", undrain))


def test_drain_writes_the_request_and_undrain_removes_it(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(APP, ["drain", "--state-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert drain_path(tmp_path).is_file() and "not running" in out.output  # no agent status here
    assert runner.invoke(APP, ["drain", "--state-dir", str(tmp_path)]).exit_code == 0  # again: no change
    out = runner.invoke(APP, ["undrain", "--state-dir", str(tmp_path)])
    assert out.exit_code == 0 and not drain_path(tmp_path).exists()
    out = runner.invoke(APP, ["undrain", "--state-dir", str(tmp_path)])
    assert out.exit_code == 0 and "not draining" in out.output


def test_drain_takes_the_state_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVM_STATE_DIR", str(tmp_path))
    assert CliRunner().invoke(APP, ["drain"]).exit_code == 0
    assert drain_path(tmp_path).is_file()


def test_drain_without_a_state_dir_or_a_status_to_wait_for_fails(tmp_path: Path) -> None:
    out = CliRunner().invoke(APP, ["drain", "--state-dir", str(tmp_path / "missing")])
    assert out.exit_code == 1 and "no node-agent state directory" in out.output
    out = CliRunner().invoke(APP, ["drain", "--wait", "--state-dir", str(tmp_path)])
    assert out.exit_code == 1 and "nothing to wait for" in out.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_drain_without_permission_says_so(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        out = CliRunner().invoke(APP, ["drain", "--state-dir", str(tmp_path)])
    finally:
        tmp_path.chmod(0o700)
    assert out.exit_code == 1 and "cannot write" in out.output
