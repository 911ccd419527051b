"""An agent that crashed with a confidential instance running: its restart erases the volume it finds
(keyslots and header area, with evidence) before removing the work directory, and reports it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from services.node_agent.runtime import InstanceRuntime
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from services.node_agent.volume import LUKS2_MAGIC, VOLUME_FILE
from shared.events import InstanceDestroyed
from shared.ids import new_event_id
from tests.framework.flow import events_of, eventually
from tests.framework.stack import Stack

pytestmark = pytest.mark.nats


async def test_restart_erases_a_leftover_volume(stack: Stack, tmp_path: Path) -> None:
    if shutil.which("cryptsetup", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip("cryptsetup not installed (apt package cryptsetup-bin)")
    settings = stack.settings.model_copy(update={"instances_dir": tmp_path / "instances"})
    workdir = settings.instances_path / "i-leftover"
    workdir.mkdir(parents=True)
    (workdir / "instance.json").write_text(json.dumps(
        {"job_id": "crashed-job", "instance_id": "i-leftover", "node_id": "node-a", "cause": new_event_id()}))
    volume = workdir / VOLUME_FILE
    with open(volume, "wb") as f:
        f.truncate(16 << 20)
    await asyncio.to_thread(subprocess.run, ["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "16k", "--luks2-keyslots-size",
                    "1m", "--key-file", "-", "--keyfile-size", "64", str(volume)],
                            input=os.urandom(32).hex().encode(), check=True, capture_output=True)
    assert volume.read_bytes()[:6] == LUKS2_MAGIC

    runtime = InstanceRuntime(await stack.bus("node-agent", "node-a"), settings, QemuMicrovm())
    assert await runtime.reclaim() == ["i-leftover"]
    assert not workdir.exists()
    admin = await stack.bus("admin")

    async def reported() -> list[InstanceDestroyed]:
        return [e.payload for e in await events_of(admin, subject="qvm.jobs.crashed-job.>")
                if isinstance(e.payload, InstanceDestroyed)]
    await eventually(lambda: _nonempty(reported()), what="the reclaim report")
    report = (await reported())[0]
    assert "agent_restart" in report.removed and "volume" in report.removed
    assert report.volume is not None and report.volume.luks_header_found and report.volume.luks_erase == "ok"
    assert report.volume.verified_zero and report.volume.removed and report.volume.overwritten_bytes >= 2 << 20


async def _nonempty(items: object) -> bool:
    return bool(await items)  # type: ignore[misc]
