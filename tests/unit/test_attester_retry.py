"""The node-agent keeps trying to start its attester (issue #14): back-off, then a steady pace, each failure
logged with its reason and shown in the status; once it works it asks to enroll."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from services.node_agent.attest.attester import AttestError
from services.node_agent.service import NodeAgent
from services.node_agent.settings import NodeAgentSettings
from shared.identity import Identity, Role
from tests.framework.flow import gpu_inventory


class _Bus:
    def __init__(self) -> None:
        self.identity = Identity(Role.NODE_AGENT, "node-a")
        self.published: list[Any] = []
        self.fail_publishes = 0

    async def publish(self, payload: Any, **_: Any) -> None:
        if self.fail_publishes:
            self.fail_publishes -= 1
            raise ConnectionError("no bus")
        self.published.append(payload)


class _Attester:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.starts = 0

    async def start(self, _: Any) -> None:
        self.starts += 1
        if self.starts <= self.failures:
            raise AttestError("tpm_command_failed", "key creation: out of memory for object contexts")

    def enroll_request(self) -> str:
        return "enroll"


def _agent(tmp_path: Path, attester: _Attester, bus: _Bus) -> NodeAgent:
    agent = NodeAgent(bus, NodeAgentSettings(state_dir=tmp_path), inventory=gpu_inventory("node-a", gpus=0),  # type: ignore[arg-type]
                      read_gpus=lambda: (), attester=attester)  # type: ignore[arg-type]
    agent.attest_backoff_s = (0.01, 0.02)
    agent.attest_retry_s = 0.03
    return agent


async def test_retries_until_the_tpm_works_then_enrolls(tmp_path: Path) -> None:
    attester, bus = _Attester(failures=4), _Bus()
    agent = _agent(tmp_path, attester, bus)
    assert await asyncio.wait_for(agent._start_attester(asyncio.Event()), 5)
    assert attester.starts == 5 and bus.published == ["enroll"]
    assert agent.trust.detail == "awaiting the first attestation result"


async def test_a_failed_enroll_request_is_retried_without_measuring_again(tmp_path: Path) -> None:
    attester, bus = _Attester(failures=0), _Bus()
    bus.fail_publishes = 2
    agent = _agent(tmp_path, attester, bus)
    assert await asyncio.wait_for(agent._start_attester(asyncio.Event()), 5)
    assert attester.starts == 1 and bus.published == ["enroll"]


async def test_never_gives_up_until_stopped_and_shows_why(tmp_path: Path) -> None:
    attester, bus = _Attester(failures=10**6), _Bus()
    agent = _agent(tmp_path, attester, bus)
    stop = asyncio.Event()
    task = asyncio.create_task(agent._start_attester(stop))
    await asyncio.sleep(0.5)
    assert not task.done() and attester.starts > 5  # past the back-off, still trying
    assert "tpm_command_failed" in agent.trust.detail and "retrying" in agent.trust.detail
    stop.set()
    assert await asyncio.wait_for(task, 5) is False
    assert bus.published == []
