"""The node's local status report: its model, the agent's atomic writer, the reader, and `qvm node status`
and `qvm node drain --wait` reading it."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from services.node_agent.service import NodeAgent
from services.node_agent.settings import NodeAgentSettings
from services.node_agent.status import gpu_states, job_states, write_status
from shared.cli.node_ops import drain, status
from shared.identity import Identity, Role
from shared.models import ResourceClaim, TrustState
from shared.nodestatus import (
    GpuState,
    JobStatus,
    NodeStatusReport,
    StatusUnreadable,
    TrustStatus,
    drain_path,
    public_url,
    read_status,
    status_path,
)
from tests.framework.flow import gpu_inventory

APP = typer.Typer()
APP.command("status")(status)
APP.command("drain")(drain)


def _report(**kw: Any) -> NodeStatusReport:
    base: dict[str, Any] = {"node_id": "node-a", "agent_version": "0.1.0", "nats_url": "tls://nats:4222",
                            "connected": True, "heartbeat_interval_s": 5.0, "written_ns": time.time_ns()}
    return NodeStatusReport(**{**base, **kw})


def test_public_url_drops_credentials() -> None:
    assert public_url("tls://alice:s3cret@nats.example:4222/x?token=t") == "tls://nats.example:4222"
    assert public_url("nats://tok@10.0.0.1") == "nats://10.0.0.1"
    assert public_url("tls://[::1]:4222") == "tls://[::1]:4222"
    assert public_url("") == "" and public_url("not a url") == ""


def test_gpu_states_and_jobs() -> None:
    inv = gpu_inventory("node-a", gpus=3)
    sick = inv.gpus[2].model_copy(update={"remapped_rows_pending": True})
    gpus = gpu_states((inv.gpus[1], inv.gpus[0], sick),
                      {"job-1": ResourceClaim(cpu_cores=1, ram_mib=64, gpu_uuids=(inv.gpus[1].uuid,))})
    assert [(g.index, g.state, g.job_id) for g in gpus] == [
        (0, GpuState.FREE, None), (1, GpuState.ASSIGNED, "job-1"), (2, GpuState.UNHEALTHY, None)]
    jobs = job_states({"job-2", "job-1"}, {"job-1": 5}, {"job-2": ("i-2", "running")})
    assert jobs == (JobStatus(job_id="job-1", phase="accepted", since_ns=5),
                    JobStatus(job_id="job-2", instance_id="i-2", phase="running", since_ns=0))


def test_the_writer_replaces_the_file_atomically_world_readable(tmp_path: Path) -> None:
    path = status_path(tmp_path / "state")
    write_status(path, _report(draining=True))
    old = os.umask(0o077)
    try:
        write_status(path, _report(draining=False))  # the mode holds whatever the umask
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["node-status.json"]  # no temporary left behind
    got = read_status(tmp_path / "state")
    assert got is not None and got.draining is False and got.node_id == "node-a"


def test_the_reader(tmp_path: Path) -> None:
    assert read_status(tmp_path) is None
    status_path(tmp_path).write_text("{\"half\": ")
    with pytest.raises(StatusUnreadable):
        read_status(tmp_path)
    newer = {**json.loads(_report().model_dump_json()), "a_field_of_a_later_agent": 1}
    status_path(tmp_path).write_text(json.dumps(newer))
    assert read_status(tmp_path) is not None  # unknown fields are ignored, not refused


def test_staleness_and_trust_expiry() -> None:
    now = time.time_ns()
    assert not _report(written_ns=now - int(14e9)).stale(now)
    assert _report(written_ns=now - int(16e9)).stale(now)  # more than 3 beats of 5 s
    assert _report(stopped_ns=now).stale(now)
    trust = TrustStatus(state=TrustState.TRUSTED, expires_ns=now - 1)
    assert trust.at(now) is TrustState.UNVERIFIED and trust.at(now - 2) is TrustState.TRUSTED


class FakeNc:
    is_connected = True
    connected_url = SimpleNamespace(geturl=lambda: "tls://agent:pw@nats.internal:4222")


async def test_the_agents_report_holds_no_credentials(tmp_path: Path) -> None:
    bus: Any = SimpleNamespace(identity=Identity(Role.NODE_AGENT, "node-a"), nc=FakeNc())
    inv = gpu_inventory("node-a", gpus=2)
    agent = NodeAgent(bus, NodeAgentSettings(state_dir=tmp_path), inventory=inv, read_gpus=lambda: inv.gpus)
    agent.held["job-1"] = ResourceClaim(cpu_cores=1, ram_mib=64, gpu_uuids=(inv.gpus[0].uuid,))
    agent.held_since["job-1"] = 7
    drain_path(tmp_path).write_text("{}")
    agent.drain.poll()
    await agent.write_status()
    text = status_path(tmp_path).read_text()
    assert "pw" not in text and "agent:" not in text
    got = read_status(tmp_path)
    assert got is not None and got.nats_url == "tls://nats.internal:4222" and got.connected and got.draining
    assert got.trust.state is TrustState.UNVERIFIED and "no TPM" in got.trust.detail
    assert [(g.state, g.job_id) for g in got.gpus] == [(GpuState.ASSIGNED, "job-1"), (GpuState.FREE, None)]
    assert got.jobs == (JobStatus(job_id="job-1", phase="accepted", since_ns=7),)
    await agent.write_status(stopped=True)
    assert (stopped := read_status(tmp_path)) is not None and stopped.stale()


# ---------------------------------------------------------------- the CLI


def test_status_without_a_report_exits_1(tmp_path: Path) -> None:
    out = CliRunner().invoke(APP, ["status", "--state-dir", str(tmp_path)])
    assert out.exit_code == 1 and "no node status" in out.output and "not running" in out.output


def test_status_shows_the_report(tmp_path: Path) -> None:
    inv = gpu_inventory("node-a", gpus=1)
    write_status(status_path(tmp_path), _report(
        draining=True, draining_since_ns=time.time_ns(), gpus=gpu_states(inv.gpus, {}),
        jobs=(JobStatus(job_id="job-1", instance_id="i-1", phase="running", since_ns=time.time_ns()),)))
    out = CliRunner().invoke(APP, ["status", "--state-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    for text in ("node-a", "tls://nats:4222", "connected", "yes", "unverified", "H100", "free", "job-1", "i-1",
                 "running"):
        assert text in out.output, text
    out = CliRunner().invoke(APP, ["status", "--json", "--state-dir", str(tmp_path)])
    data = json.loads(out.output)
    assert out.exit_code == 0 and data["draining"] is True and data["stale"] is False
    assert data["jobs"][0]["job_id"] == "job-1"


def test_a_stale_status_says_the_agent_is_down(tmp_path: Path) -> None:
    write_status(status_path(tmp_path), _report(written_ns=time.time_ns() - int(60e9)))
    out = CliRunner().invoke(APP, ["status", "--state-dir", str(tmp_path)])
    assert out.exit_code == 1 and "down" in out.output
    out = CliRunner().invoke(APP, ["status", "--json", "--state-dir", str(tmp_path)])
    assert out.exit_code == 1 and json.loads(out.output)["stale"] is True


def test_drain_wait_returns_once_the_agent_lists_no_job(tmp_path: Path) -> None:
    write_status(status_path(tmp_path), _report(jobs=(JobStatus(job_id="job-1", phase="running", since_ns=1),)))

    def agent_finishes() -> None:  # the agent sees the request, then its last job ends
        time.sleep(0.3)
        write_status(status_path(tmp_path), _report(draining=True, jobs=(
            JobStatus(job_id="job-1", phase="running", since_ns=1),)))
        time.sleep(0.6)
        write_status(status_path(tmp_path), _report(draining=True))

    t = threading.Thread(target=agent_finishes)
    t.start()
    out = CliRunner().invoke(APP, ["drain", "--wait", "--timeout", "20", "--state-dir", str(tmp_path)])
    t.join()
    assert out.exit_code == 0, out.output
    assert "waiting for 1 job(s): job-1" in out.output and "is drained" in out.output


def test_drain_wait_gives_up_at_its_timeout(tmp_path: Path) -> None:
    write_status(status_path(tmp_path), _report(draining=True, jobs=(
        JobStatus(job_id="job-1", phase="running", since_ns=1),)))
    out = CliRunner().invoke(APP, ["drain", "--wait", "--timeout", "0.6", "--state-dir", str(tmp_path)])
    assert out.exit_code == 1 and "1 job(s) still on the node" in out.output
    assert drain_path(tmp_path).exists()  # the drain stands; only the wait ended
