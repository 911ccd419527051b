"""Firecracker: configured through its REST API on a unix socket, then started with `InstanceStart`.

    PUT /machine-config  PUT /boot-source  PUT /drives/root (read-only)  PUT /drives/scratch
    PUT /network-interfaces/eth0 (the instance's tap)  PUT /actions {InstanceStart}
    stop: PUT /actions {SendCtrlAltDel}, then SIGKILL after the grace period

The guest channel is the serial port: Firecracker connects the guest's ttyS0 to its own stdin/stdout,
which are the guest end of a socketpair (`qvm.channel=ttyS0`; the guest init silences the kernel
console once it runs). Image files are the agent's verified descriptors, named `/proc/<agent>/fd/N`.
Not yet: starting through the jailer (chroot, uid/gid, cgroup, netns) — the agent applies its own
cgroup, namespace and seccomp confinement before exec instead; guest RAM from an agent-owned memfd.
It boots the image's ELF `vmlinux` (`qvm image build --with-vmlinux`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time

from services.node_agent.vmm.base import LaunchSpec, VmmError, VmProcess
from services.node_agent.vmm.rest import UdsApi, api_socket_path

__all__ = ["Firecracker"]


class Firecracker:
    name = "firecracker"
    shared_channel = True

    seccomp_allow: frozenset[str] | None = None  # it installs its own per-thread seccomp filters
    elf_kernel = True

    def __init__(self, binary: str = "firecracker") -> None:
        self.binary = binary

    def available(self) -> bool:
        return shutil.which(self.binary) is not None

    async def launch(self, spec: LaunchSpec) -> VmProcess:
        if not self.available():
            raise VmmError("vmm_missing", f"{self.binary} not found")
        sock = api_socket_path(spec.instance_id, "fc.sock")
        sock.unlink(missing_ok=True)
        channel, guest_end = socket.socketpair()
        fds = [spec.kernel_fd, spec.initrd_fd, spec.rootfs_fd, *spec.extra_fds]
        started = time.time_ns()
        try:
            with open(spec.workdir / "vmm.log", "wb") as vmm_log:
                proc = await asyncio.create_subprocess_exec(
                    self.binary, "--api-sock", str(sock), "--id", spec.instance_id[-60:],
                    pass_fds=fds, stdin=guest_end.fileno(), stdout=guest_end.fileno(), stderr=vmm_log,
                    start_new_session=True,
                    preexec_fn=spec.confine)
        except (OSError, subprocess.SubprocessError) as exc:
            channel.close()
            raise VmmError("vmm_start_failed", f"{type(exc).__name__}: {exc}") from None
        finally:
            guest_end.close()
        (spec.workdir / "vmm.pid").write_text(str(proc.pid))
        vm = VmProcess(proc.pid, proc, self.name, "kvm", started, spec.workdir / "console.log", channel=channel)
        api = UdsApi(sock)
        try:
            await api.wait_ready(proc)
            fd = f"/proc/{os.getpid()}/fd"
            await api.put("/machine-config", {"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib,
                                              "smt": False})
            await api.put("/boot-source", {"kernel_image_path": f"{fd}/{spec.kernel_fd}",
                                           "initrd_path": f"{fd}/{spec.initrd_fd}",
                                           "boot_args": spec.cmdline + " qvm.channel=ttyS0"})
            await api.put("/drives/root", {"drive_id": "root", "path_on_host": f"{fd}/{spec.rootfs_fd}",
                                           "is_root_device": False, "is_read_only": True})
            await api.put("/drives/scratch", {"drive_id": "scratch", "path_on_host": str(spec.scratch),
                                              "is_root_device": False, "is_read_only": False})
            if spec.tap:
                await api.put("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": spec.tap})
            await api.put("/actions", {"action_type": "InstanceStart"})
        except VmmError:
            await vm.kill()
            channel.close()
            raise
        finally:
            await api.close()
        vm.api_socket = sock
        return vm

    async def stop(self, vm: VmProcess, grace_s: float = 5.0) -> None:
        if vm.proc.returncode is None and vm.api_socket is not None:
            api = UdsApi(vm.api_socket, timeout=2.0)
            with contextlib.suppress(VmmError):
                await api.put("/actions", {"action_type": "SendCtrlAltDel"})
            await api.close()
            try:
                await asyncio.wait_for(vm.proc.wait(), grace_s)
            except TimeoutError:
                await vm.kill()
        elif vm.proc.returncode is None:
            await vm.kill()
        if vm.channel is not None:
            vm.channel.close()
            vm.channel = None
        if vm.api_socket is not None:
            vm.api_socket.unlink(missing_ok=True)
