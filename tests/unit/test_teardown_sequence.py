"""The teardown sequence without a VM: its order and labels (what `instance.destroyed` reports), the evidence
of each wipe, what stays for a second pass when a step fails, and a leftover directory found on the host
(owner record, volume) going through the same sequence. The integration tests run it with real guests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from services.node_agent.isolation.cgroups import VmCgroup
from services.node_agent.teardown import (
    GpuRelease,
    Remains,
    Stopped,
    leftover_dirs,
    leftover_remains,
    read_owner,
    tear_down,
    write_owner,
)
from services.node_agent.volume import VOLUME_FILE
from shared.models import VramScrub


class FakeNet:
    def __init__(self, removable: bool) -> None:
        self.netns = "qvm-i-test"
        self.removable = removable

    async def remove(self) -> bool:
        return self.removable


class FakeGpus:
    def __init__(self) -> None:
        self.detached: list[tuple[Any, Any]] = []

    def detach(self, bindings: Any, uuids: Any) -> tuple[VramScrub, ...]:
        self.detached.append((bindings, uuids))
        return tuple(VramScrub(gpu_uuid=u, pci_bus_id="", method="none", bytes_total=0, bytes_scrubbed=0,
                               verified=False, duration_ms=0.0, rate_gbps=0.0, detail="fake") for u in uuids)


def _guest_ram(data: bytes) -> int:
    fd = os.memfd_create("qvm-ram-test", 0)
    os.ftruncate(fd, 1 << 20)
    os.pwrite(fd, data, 4096)
    return fd


async def test_every_step_in_order_with_its_evidence(tmp_path: Path) -> None:
    workdir = tmp_path / "i-test"
    workdir.mkdir()
    (workdir / VOLUME_FILE).write_bytes(b"\xaa" * (4 << 20))
    cgroup_dir = tmp_path / "cgroup"
    cgroup_dir.mkdir()
    gpus = FakeGpus()

    async def stop() -> Stopped:
        return Stopped(("vmm:4242",), _guest_ram(b"secret" * 100))

    remains = Remains(workdir, stop=stop, net=FakeNet(True), volume=workdir / VOLUME_FILE,  # type: ignore[arg-type]
                      cgroup=VmCgroup((cgroup_dir,), 2), gpus=GpuRelease(gpus, [], ["GPU-1"]))  # type: ignore[arg-type]
    ev = await tear_down(remains)
    assert ev.removed == ["vmm:4242", "guest-ram", "netns:qvm-i-test", "volume", "cgroup:v2", "workdir:i-test",
                          "gpus:0 released"]
    assert ev.ram is not None and ev.ram.verified and ev.ram.bytes_scrubbed > 0
    assert ev.volume is not None and ev.volume.removed and ev.volume.verified_zero
    assert [g.gpu_uuid for g in ev.gpus] == ["GPU-1"] and gpus.detached == [([], ["GPU-1"])]
    assert not workdir.exists() and not cgroup_dir.exists()
    assert (remains.net, remains.volume, remains.cgroup, remains.gpus) == (None, None, None, None)
    report = ev.report("i-test", "sweep")
    assert report.removed[-1] == "sweep" and report.ram == ev.ram and report.volume == ev.volume


async def test_what_cannot_be_released_stays_for_a_second_pass(tmp_path: Path) -> None:
    net = FakeNet(False)
    remains = Remains(tmp_path / "gone", net=net)  # type: ignore[arg-type]
    ev = await tear_down(remains)
    assert ev.removed == [] and ev.ram is None and ev.volume is None and ev.gpus == ()
    assert remains.net is net
    net.removable = True
    assert (await tear_down(remains)).removed == ["netns:qvm-i-test"] and remains.net is None


async def test_a_leftover_directory_goes_through_the_same_sequence(tmp_path: Path) -> None:
    work = tmp_path / "instances"
    write_owner(work / "i-left", "job-1", "i-left", "node-a", "cause-1")
    (work / "i-left" / VOLUME_FILE).write_bytes(b"\x55" * (3 << 20))
    (work / "i-left" / "vmm.pid").write_text(str(os.getpid()))  # a live pid whose command line is not the VMM's
    (work / "i-live").mkdir()
    assert leftover_dirs(work, {"i-live"}) == [work / "i-left"]
    owner = read_owner(work / "i-left")
    assert owner is not None and (owner.job_id, owner.instance_id, owner.cause) == ("job-1", "i-left", "cause-1")
    ev = await tear_down(leftover_remains(work / "i-left"))
    assert ev.removed == ["volume", "workdir:i-left"] and ev.ram is None
    assert ev.volume is not None and ev.volume.removed and ev.volume.verified_zero
    assert read_owner(work / "i-left") is None and leftover_dirs(work, {"i-live"}) == []
