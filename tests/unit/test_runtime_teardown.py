"""A teardown request that reaches a job before its instance task began: nothing of it exists, and the
runtime forgets the job (it used to stay in `jobs` forever, its claim held on the node)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from services.node_agent.runtime import InstanceRuntime
from services.node_agent.settings import NodeAgentSettings
from shared.events import JobSubmitted


async def test_a_teardown_before_the_instance_began_forgets_the_job(tmp_path: Path) -> None:
    released: list[str] = []
    bus: Any = SimpleNamespace(identity=SimpleNamespace(node_id="node-a"))
    runtime = InstanceRuntime(bus, NodeAgentSettings(state_dir=tmp_path), vmm=SimpleNamespace(name="none"),  # type: ignore[arg-type]
                              on_destroyed=released.append)
    cause: Any = SimpleNamespace(id="0190c0de-0000-7000-8000-000000000001", payload=None)
    runtime.start("job-1", JobSubmitted(owner="o", image="img"), cause)
    assert "job-1" in runtime.jobs
    assert await runtime.teardown("job-1")  # before the event loop ever ran the instance's task
    assert runtime.jobs == {} and released == ["job-1"]
    assert not await runtime.teardown("job-1")  # gone: a second request finds nothing
    assert not (tmp_path / "instances").exists()
