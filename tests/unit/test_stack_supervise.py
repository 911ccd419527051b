"""`qvm up`'s supervisor: a child that died is respawned, and what is reported is how the dead one ended
(issue #14: it read the new process's returncode, `exit None`)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from shared.cli.stack import Child, LocalStack
from shared.config import StackSettings
from shared.models import TrustState


class _Stack(LocalStack):
    def _spawn(self, child: Child, url: str) -> None:  # a tiny child instead of a service
        child.proc = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL)
        child.started = time.monotonic()


def test_a_killed_child_is_reported_with_its_signal(tmp_path: Path) -> None:
    stack = _Stack(StackSettings(state_dir=tmp_path), node_id="node-a", min_trust=TrustState.TRUSTED)
    child = Child("node-agent", "services.node_agent", tmp_path / "node-agent.log")
    stack._spawn(child, "")
    stack.children.append(child)
    first = child.proc
    assert first is not None
    try:
        assert stack.supervise_once() == []  # alive: nothing to do
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        child.started -= 5  # past the first back-off
        assert stack.supervise_once() == ["node-agent (signal 9 (SIGKILL))"]
        assert child.last_exit == -signal.SIGKILL and child.restarts == 1
        assert child.proc is not first and child.proc is not None and child.proc.poll() is None
    finally:
        for proc in (first, child.proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_exit_statuses_read_as_people_read_them() -> None:
    assert Child.describe_exit(0) == "exit 0"
    assert Child.describe_exit(3) == "exit 3"
    assert Child.describe_exit(-15) == "signal 15 (SIGTERM)"
    assert Child.describe_exit(-200) == "signal 200"
    assert Child.describe_exit(None) == "exit status unknown"
