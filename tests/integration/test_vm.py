"""Jobs in real micro VMs (QEMU microvm; TCG here, KVM where it works) against a real nats-server."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from services.janitor.service import Janitor
from services.node_agent.service import NodeAgent
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from services.scheduler.service import Scheduler
from shared.client.output import new_output_key, open_output_events, with_output_key
from shared.crypto.output import open_chunk, sealed_digest
from shared.events import EventType, JobSubmitted
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from tests.framework.flow import agent_process, events_of, eventually, job_book, running
from tests.framework.images import IMAGE, build_test_image

pytestmark = pytest.mark.nats
OUTPUT_KEY = new_output_key()  # the client's: the jobs' output is sealed to it


def _settings(stack, tmp_path: Path):
    return stack.settings.model_copy(update={
        "min_trust": TrustState.UNVERIFIED, "images_dir": tmp_path / "images", "instances_dir": tmp_path / "instances",
        "sweep_interval_s": 0.3})


def _job(*command: str, image: str = IMAGE) -> JobSubmitted:
    return with_output_key(JobSubmitted(owner="alice", image=image, command=command, max_runtime_s=300,
                                        profile=HardwareProfile(cpu_cores=1, ram_mib=256)), OUTPUT_KEY)


async def _terminal(admin, job_id: str) -> bool:
    view = (await job_book(admin)).get(job_id)
    return view is not None and view.terminal


async def _run_job(stack, tmp_path: Path, job: JobSubmitted, job_id: str = "vm-job"):
    settings = _settings(stack, tmp_path)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    agent = NodeAgent(await stack.bus("node-agent", "node-a"), settings, vmm=QemuMicrovm(accel=settings.vm_accel))
    async with running(sched, agent, Janitor(await stack.bus("janitor"), settings)):
        await market.publish(job, job_id=job_id)
        await eventually(lambda: _terminal(admin, job_id), timeout=180, what="the job to end")
    events = await events_of(admin, subject=f"qvm.jobs.{job_id}.>")
    return (await job_book(admin)).get(job_id), events


def _of(events, etype: EventType):
    return [e for e in events if e.spec.type is etype]


def _output(events) -> bytes:
    """The output as the client opens it: every chunk, in order, checked against the exit report."""
    return open_output_events(events, events[0].job_id, OUTPUT_KEY).data


async def test_workload_writes_its_overlay_and_the_result_arrives_on_the_bus(stack, tmp_path: Path) -> None:
    bundle = build_test_image(tmp_path / "images")
    rootfs_before = hashlib.sha256((bundle / "rootfs.ext4").read_bytes()).hexdigest()
    view, events = await _run_job(stack, tmp_path, _job(
        "sh", "-c", "echo written > /etc/motd && cat /etc/motd && mkdir -p /data && echo 42 > /data/x && "
                    "cat /data/x && ls /sys/class/net && exit 3"))
    assert view.state is JobState.DONE and view.exit_code == 3, (view.state, view.reason, _failure(events))
    types = [str(e.spec.type) for e in events if e.spec.type is not EventType.JOB_PENDING]  # before registration
    assert types[:3] == ["job.submitted", "job.placed", "job.accepted"]
    assert types[3:7] == ["instance.provisioning", "instance.booted", "instance.running", "instance.output"]
    assert types[-3:] == ["instance.exited", "instance.destroyed", "job.done"]
    out = _output(events)
    assert out.decode().split() == ["written", "42", "eth0", "lo"], out  # eth0: a tap in its own netns
    exited = _of(events, EventType.INSTANCE_EXITED)[0].payload
    sealed = [bytes.fromhex(e.payload.sealed) for e in _of(events, EventType.INSTANCE_OUTPUT)]
    assert exited.exit_code == 3 and exited.output_bytes == len(out) and exited.output_chunks == len(sealed)
    # On the bus only ciphertext, and a digest of it: nothing derived from the plaintext alone.
    assert exited.output_sha256 == sealed_digest(sealed) != hashlib.sha256(out).hexdigest()
    assert not any(b"written" in blob for blob in sealed)
    prov = _of(events, EventType.INSTANCE_PROVISIONING)[0].payload
    assert len(bytes.fromhex(prov.public_key)) == 32 and prov.vmm == "qemu-microvm"
    assert prov.image_manifest_sha256 == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    # The write went to the instance's overlay: the signed base image is byte for byte unchanged.
    assert hashlib.sha256((bundle / "rootfs.ext4").read_bytes()).hexdigest() == rootfs_before
    assert not any((tmp_path / "instances").iterdir()), "the instance's work directory was removed"


@pytest.mark.parametrize(("tamper", "reason"), [
    (lambda b: b.joinpath("rootfs.ext4").open("r+b").write(b"X"), "image_digest_mismatch"),
    (lambda b: b.joinpath("manifest.sig").unlink(), "image_unsigned"),
    (lambda b: b.joinpath("manifest.json").write_text(b.joinpath("manifest.json").read_text()
                                                      .replace('"name":"test-image"', '"name":"evil"')),
     "image_bad_signature"),
])
async def test_tampered_or_unsigned_image_is_refused_and_nothing_starts(stack, tmp_path: Path, tamper, reason) -> None:
    bundle = build_test_image(tmp_path / "images")
    tamper(bundle)
    view, events = await _run_job(stack, tmp_path, _job("true"))
    assert view.state is JobState.FAILED and view.reason == reason
    failed = _of(events, EventType.INSTANCE_FAILED)[0].payload
    assert failed.reason == reason
    assert not _of(events, EventType.INSTANCE_PROVISIONING), "no VM was started"
    assert not _of(events, EventType.INSTANCE_BOOTED)
    assert _of(events, EventType.INSTANCE_DESTROYED)


async def test_unknown_image_is_refused(stack, tmp_path: Path) -> None:
    build_test_image(tmp_path / "images")
    view, _events = await _run_job(stack, tmp_path, _job("true", image="no-such-image"))
    assert view.state is JobState.FAILED and view.reason == "image_not_found"


async def test_guest_cannot_reach_a_port_open_on_the_host(stack, tmp_path: Path) -> None:
    build_test_image(tmp_path / "images")
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        probe = (f"for h in 10.0.2.2 10.0.2.15 127.0.0.1 172.17.0.1 192.168.1.1; do "
                 f"nc -w 1 $h {port} </dev/null && echo reached $h; done; echo probes done")
        view, events = await _run_job(stack, tmp_path, _job("sh", "-c", probe))
        assert view.state is JobState.DONE, (view.state, view.reason, _failure(events))
        out = _output(events).decode()
        assert "probes done" in out and "reached" not in out
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


async def test_killed_agent_leaves_nothing_behind_after_restart(stack, tmp_path: Path) -> None:
    bundle = build_test_image(tmp_path / "images")
    del bundle
    settings = _settings(stack, tmp_path)
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    def start_agent() -> subprocess.Popen[bytes]:
        return agent_process(stack, tmp_path)

    sched = await Scheduler.create(await stack.bus("scheduler"), settings)
    agent = start_agent()
    try:
        async with running(sched):
            await market.publish(_job("sleep", "600"), job_id="long-job")

            async def vm_running() -> bool:
                return any(e.spec.type is EventType.INSTANCE_RUNNING
                           for e in await events_of(admin, subject="qvm.jobs.long-job.>"))
            await eventually(vm_running, timeout=120, what="the VM to run")
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            leftovers = _vmm_processes(tmp_path)
            assert leftovers, "the VMM outlives a killed agent (it must be reclaimed on restart)"
            agent = start_agent()

            async def reclaimed() -> bool:
                return any(e.spec.type is EventType.INSTANCE_DESTROYED
                           for e in await events_of(admin, subject="qvm.jobs.long-job.>"))
            await eventually(reclaimed, timeout=60, what="the restarted agent to reclaim the instance")
            report = next(e.payload for e in await events_of(admin, subject="qvm.jobs.long-job.>")
                          if e.spec.type is EventType.INSTANCE_DESTROYED)
            # The dead agent's guest RAM memfd lived on in the VMM: opened through /proc, scrubbed after the kill.
            assert report.ram is not None and report.ram.verified and report.ram.bytes_scrubbed > 0, report
            assert "agent_restart" in report.removed and "guest-ram" in report.removed
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(20)
    deadline = time.monotonic() + 10
    while _vmm_processes(tmp_path) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert _vmm_processes(tmp_path) == []
    assert not any((tmp_path / "instances").iterdir())
    view = (await job_book(admin)).get("long-job")
    assert view.state is JobState.FAILED and view.reason == "instance_destroyed"
    destroyed = next(e for e in await events_of(admin, subject="qvm.jobs.long-job.>")
                     if e.spec.type is EventType.INSTANCE_DESTROYED)
    assert "agent_restart" in destroyed.payload.removed and any(r.startswith("vmm:") for r in destroyed.payload.removed)


def _vmm_processes(root: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd and str(root).encode() in cmd:
                found.append(int(proc.name))
    return found


def _failure(events) -> str:
    failed = _of(events, EventType.INSTANCE_FAILED)
    return f"{failed[0].payload.reason}: {failed[0].payload.detail}" if failed else ""


async def test_output_streams_while_the_workload_runs(stack, tmp_path: Path) -> None:
    build_test_image(tmp_path / "images")
    view, events = await _run_job(stack, tmp_path, _job("sh", "-c", "echo first; sleep 3; echo second"))
    assert view.state is JobState.DONE, (view.state, view.reason, _failure(events))
    outputs = _of(events, EventType.INSTANCE_OUTPUT)
    exited = _of(events, EventType.INSTANCE_EXITED)[0]
    assert _output(events) == b"first\nsecond\n"
    first = outputs[0].payload
    assert len(outputs) >= 2 and open_chunk(bytes.fromhex(first.sealed), OUTPUT_KEY, "vm-job", first.instance_id,
                                            0) == b"first\n"
    assert exited.envelope.time_ns - outputs[0].envelope.time_ns > 2e9, "the first line was published live"
    assert [o.payload.seq for o in outputs] == list(range(len(outputs)))
