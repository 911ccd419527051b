"""The VMM's confinement, on the real QEMU: its cgroup limits, its seccomp filter, and what a filtered
syscall does."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from services.node_agent.instance import Instance, InstanceError, InstanceSpec, VmState
from services.node_agent.isolation.seccomp import QEMU_ALLOW
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from shared.image.manifest import load_public_keys
from tests.framework.images import build_test_image, run_once

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _instance(tmp_path: Path, command: tuple[str, ...], **spec: object) -> Instance:
    bundle = build_test_image(tmp_path / "images")
    keys = load_public_keys([tmp_path / "images" / "publisher.pub"])
    return Instance(InstanceSpec(f"conf-{tmp_path.name[-20:]}", "job", bundle, command, vcpus=1, memory_mib=192,
                                 **spec),  # type: ignore[arg-type]
                    tmp_path / "instance", QemuMicrovm(), dict(keys))


def _cgroups_usable() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists() or (CGROUP_ROOT / "memory").is_dir()


async def test_vmm_runs_in_its_cgroup_under_a_seccomp_filter(tmp_path: Path) -> None:
    if not _cgroups_usable():
        pytest.skip("no cgroup v2 or v1 cpu+memory hierarchy on this machine")
    inst = _instance(tmp_path, ("sleep", "60"))
    try:
        await inst.verify()
        await inst.launch()
        assert inst.vm is not None and inst.cgroup is not None
        status = Path(f"/proc/{inst.vm.pid}/status").read_text()
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
        assert inst.vm.pid in inst.cgroup.pids()
        limits = inst.cgroup.limits()
        assert limits.get("memory.max", limits.get("memory.limit_in_bytes")) == str((192 + 256) << 20)
        assert limits.get("cpu.max", limits.get("cpu.cfs_quota_us", "")).split()[0] == "100000"
        dirs = inst.cgroup.dirs
    finally:
        removed = await inst.destroy()
    assert any(r.startswith("cgroup:") for r in removed)
    assert not any(d.exists() for d in dirs), "the cgroup is removed with the instance"


async def test_a_filtered_syscall_kills_the_vmm_and_is_reported(tmp_path: Path) -> None:
    inst = _instance(tmp_path, ("true",), seccomp_allow=QEMU_ALLOW - {"execve"}, cgroups=False, boot_timeout_s=30.0)
    try:
        await inst.verify()
        with pytest.raises(InstanceError) as exc:
            await inst.launch()
        assert exc.value.reason == "seccomp_violation"
        assert inst.state is VmState.FAILED
    finally:
        await inst.destroy()
    await asyncio.sleep(0)


async def test_guest_nic_sits_in_its_own_namespace_behind_default_deny(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    probe = ("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2; "
             f"for h in 10.0.2.2 10.0.2.1 8.8.8.8; do nc -w 1 $h {port} </dev/null && echo reached $h; done; "
             "ls /sys/class/net")
    inst = _instance(tmp_path, ("sh", "-c", probe), cgroups=False)
    try:
        await inst.verify()
        await inst.launch()
        assert inst.net is not None
        netns = inst.net.netns
        assert netns in _namespaces()
        vm_ns = Path(f"/proc/{inst.vm.pid}/ns/net").resolve() if inst.vm else None
        assert vm_ns != Path("/proc/self/ns/net").resolve(), "the VMM runs in another network namespace"
        out = await inst.run()
        text = out.output.decode()
        assert "eth0" in text.split() and "reached" not in text
        assert await inst.net.dropped_packets() > 0, "the guest's packets hit the tap's drop policy"
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
        removed = await inst.destroy()
    assert f"netns:{netns}" in removed and netns not in _namespaces()


def _namespaces() -> list[str]:
    from services.node_agent.isolation.network import leftover_namespaces

    return leftover_namespaces()


@pytest.mark.parametrize("channel", ["virtio-console", "serial"])
async def test_guest_init_speaks_over_the_channels_other_vmms_give(tmp_path: Path, channel: str) -> None:
    """Cloud Hypervisor gives a virtio console (hvc0), Firecracker only its serial port (ttyS0, shared with
    the kernel console): the same guest init and host parser work over both, proven here under QEMU."""
    bundle = build_test_image(tmp_path / "images")
    keys = load_public_keys([tmp_path / "images" / "publisher.pub"])
    inst = Instance(InstanceSpec(f"ch-{channel}", "job", bundle, ("sh", "-c", "echo over $0; exit 5", channel),
                                 cgroups=False, network=False),
                    tmp_path / "instance", QemuMicrovm(channel=channel), dict(keys))
    out = await run_once(inst)
    assert (out.exit_code, out.output) == (5, f"over {channel}\n".encode())


async def test_egress_allowlist_reaches_only_the_listed_destination(tmp_path: Path) -> None:
    """An uplink namespace stands in for the node's uplink (no host routes or rules are touched): it holds
    198.18.0.1 with two TCP servers; the job may reach port 8080 only."""
    from services.node_agent.isolation.network import parse_egress

    uplink = f"qvm-test-up-{os.getpid()}"
    await _sh("ip", "netns", "add", uplink)
    servers = []
    try:
        await _sh("ip", "-n", uplink, "link", "set", "lo", "up")
        await _sh("ip", "-n", uplink, "addr", "add", "198.18.0.1/32", "dev", "lo")
        for port in (8080, 8081):
            servers.append(await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", uplink, sys.executable, "-c",
                "import socket,sys\ns=socket.create_server(('198.18.0.1',int(sys.argv[1])))\n"
                "while True:\n c,_=s.accept(); c.sendall(b'hello from '+sys.argv[1].encode()+b'\\n'); c.close()",
                str(port)))
        await asyncio.sleep(0.5)
        probe = ("for p in 8080 8081; do nc -w 2 198.18.0.1 $p </dev/null || echo blocked $p; done; "
                 "nc -w 2 10.0.2.2 22 </dev/null || echo blocked host")
        inst = _instance(tmp_path, ("sh", "-c", probe), cgroups=False,
                         egress=tuple(parse_egress(["198.18.0.1:8080"])), uplink=uplink)
        try:
            await inst.verify()
            await inst.launch()
            out = (await inst.run()).output.decode()
            dropped = await inst.net.dropped_packets() if inst.net else 0
        finally:
            await inst.destroy()
        assert "hello from 8080" in out and "hello from 8081" not in out, out
        assert "blocked 8081" in out and "blocked host" in out, out
        assert dropped > 0
    finally:
        for srv in servers:
            srv.kill()
            await srv.wait()
        await _sh("ip", "netns", "del", uplink)


async def _sh(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv)
    assert await proc.wait() == 0, argv
