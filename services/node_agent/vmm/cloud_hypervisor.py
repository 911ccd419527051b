"""Cloud Hypervisor (the VMM with VFIO GPU passthrough): `vm.create` with the whole VmConfig, then
`vm.boot`, over its REST API on a unix socket; `vm.shutdown` and `vmm.shutdown` to stop.

The guest channel is a virtio console (`console: {mode: Socket}`, hvc0 in the guest,
`qvm.channel=hvc0`), dedicated to the channel; the kernel console goes to the serial port, logged to
the instance's console.log. Image files are the agent's verified descriptors (`/proc/<agent>/fd/N`).
It boots the image's ELF `vmlinux` (PVH; `qvm image build --with-vmlinux`). GPUs (`LaunchSpec.vfio_devices`,
already on vfio-pci with their IOMMU group) are cold-plugged: VmConfig `devices`, one
`{"path": "/sys/bus/pci/devices/BDF/", "id": "vfioN"}` each.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time

from services.node_agent.isolation.vfio import VfioError, host_sysfs_path
from services.node_agent.vmm.base import LaunchSpec, VmmError, VmProcess
from services.node_agent.vmm.rest import UdsApi, api_socket_path, stop_through_api

__all__ = ["CloudHypervisor"]

API = "/api/v1"


class CloudHypervisor:
    name = "cloud-hypervisor"
    shared_channel = False

    seccomp_allow: frozenset[str] | None = None  # it installs its own per-thread seccomp filters
    elf_kernel = True
    ram_from_agent = False  # its own guest RAM: not scrubbed by the agent yet (the record says so)

    def __init__(self, binary: str = "cloud-hypervisor") -> None:
        self.binary = binary

    def available(self) -> bool:
        return shutil.which(self.binary) is not None

    def vm_config(self, spec: LaunchSpec, console_sock: str) -> dict[str, object]:
        fd = f"/proc/{os.getpid()}/fd"
        disks: list[dict[str, object]] = [{"path": f"{fd}/{spec.rootfs_fd}", "readonly": True},
                                          {"path": str(spec.scratch)}]
        if spec.volume is not None:  # the third disk, vdc in the guest (LUKS2, opened inside the guest)
            disks.append({"path": str(spec.volume)})
        config: dict[str, object] = {
            "cpus": {"boot_vcpus": spec.vcpus, "max_vcpus": spec.vcpus},
            "memory": {"size": spec.memory_mib << 20},
            "payload": {"kernel": f"{fd}/{spec.kernel_fd}", "initramfs": f"{fd}/{spec.initrd_fd}",
                        "cmdline": spec.cmdline + " qvm.channel=hvc0"},
            "disks": disks,
            "serial": {"mode": "File", "file": str(spec.workdir / "console.log")},
            "console": {"mode": "Socket", "socket": console_sock},
        }
        if spec.tap:
            config["net"] = [{"tap": spec.tap}]
        if spec.vfio_devices:
            try:
                config["devices"] = [{"path": host_sysfs_path(dev), "id": f"vfio{i}"}
                                     for i, dev in enumerate(spec.vfio_devices)]
            except VfioError as exc:
                raise VmmError(exc.reason, exc.detail) from None
        return config

    async def launch(self, spec: LaunchSpec) -> VmProcess:
        if not self.available():
            raise VmmError("vmm_missing", f"{self.binary} not found")
        sock = api_socket_path(spec.instance_id, "ch.sock")
        console = api_socket_path(spec.instance_id, "con.sock")
        for p in (sock, console):
            p.unlink(missing_ok=True)
        fds = [spec.kernel_fd, spec.initrd_fd, spec.rootfs_fd, *spec.extra_fds]
        started = time.time_ns()
        try:
            with open(spec.workdir / "vmm.log", "wb") as vmm_log:
                proc = await asyncio.create_subprocess_exec(
                    self.binary, "--api-socket", f"path={sock}", pass_fds=fds, stdin=asyncio.subprocess.DEVNULL,
                    stdout=vmm_log, stderr=vmm_log, start_new_session=True, preexec_fn=spec.confine)
        except (OSError, subprocess.SubprocessError) as exc:
            raise VmmError("vmm_start_failed", f"{type(exc).__name__}: {exc}") from None
        (spec.workdir / "vmm.pid").write_text(str(proc.pid))
        vm = VmProcess(proc.pid, proc, self.name, "kvm", started, spec.workdir / "console.log", api_socket=sock,
                       volume=spec.volume)
        api = UdsApi(sock)
        try:
            await api.wait_ready(proc)
            await api.put(f"{API}/vm.create", self.vm_config(spec, str(console)))
            await api.put(f"{API}/vm.boot")
            vm.channel = await _connect(console, proc)
        except VmmError:
            await vm.kill()
            raise
        finally:
            await api.close()
        return vm

    async def stop(self, vm: VmProcess, grace_s: float = 5.0) -> None:
        await stop_through_api(vm, [(f"{API}/vm.shutdown", None), (f"{API}/vmm.shutdown", None)], grace_s)


async def _connect(path: os.PathLike[str] | str, proc: asyncio.subprocess.Process, wait_s: float = 10.0
                   ) -> socket.socket:
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if proc.returncode is not None or time.monotonic() > deadline:
                raise VmmError("channel_unavailable", f"no virtio console socket at {path}") from None
            await asyncio.sleep(0.02)
