"""Firecracker: configured through its REST API on a unix socket, then started with `InstanceStart`.

    PUT /machine-config  PUT /boot-source  PUT /drives/root (read-only)  PUT /drives/scratch
    PUT /drives/volume (the data volume, when the instance has one: vdc, LUKS2 opened inside the guest)
    PUT /network-interfaces/eth0 (the instance's tap)  PUT /actions {InstanceStart}
    stop: PUT /actions {SendCtrlAltDel}, then SIGKILL after the grace period

The guest channel is the serial port: Firecracker connects the guest's ttyS0 to its own stdin/stdout,
which are the guest end of a socketpair (`qvm.channel=ttyS0`; the guest init silences the kernel
console once it runs). Image files are the agent's verified descriptors, named `/proc/<agent>/fd/N`.
Where the `jailer` binary is present, Firecracker is started through it: chroot under
`<chroot base>/firecracker/<id>/root`, an unprivileged uid/gid, its own mount namespace; the verified
bytes are copied from the agent's open descriptors into the chroot (so a file replaced on disk after the
check still never boots), and API paths are relative to the chroot. The scratch disk and the data volume
are copied in sparse (still empty then); the guest writes the jail's copy of the volume, so `stop` erases
that copy (LUKS2 keyslots and header, `volume.erase_volume`) before the jail is removed. The agent's cgroup and network
namespace are joined before exec either way. Not yet: guest RAM from an agent-owned memfd. GPU passthrough
is refused (`vfio_unsupported`): Firecracker has not released VFIO.
It boots the image's ELF `vmlinux` (`qvm image build --with-vmlinux`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from services.node_agent.vmm.base import LaunchSpec, VmmError, VmProcess
from services.node_agent.vmm.rest import UdsApi, api_socket_path, stop_through_api
from services.node_agent.volume import erase_volume

__all__ = ["Firecracker"]


class Firecracker:
    name = "firecracker"
    shared_channel = True

    seccomp_allow: frozenset[str] | None = None  # it installs its own per-thread seccomp filters
    elf_kernel = True
    ram_from_agent = False  # its own guest RAM: not scrubbed by the agent yet (the record says so)

    def __init__(self, binary: str = "firecracker", jailer: str | None = "jailer",
                 chroot_base: Path = Path("/srv/jailer"), uid: int = 64_000, gid: int = 64_000) -> None:
        """`jailer=None` never jails; otherwise the jailer is used when it is on PATH."""
        self.binary = binary
        self.jailer = shutil.which(jailer) if jailer else None
        self.chroot_base = chroot_base
        self.uid, self.gid = uid, gid

    def available(self) -> bool:
        return shutil.which(self.binary) is not None

    async def launch(self, spec: LaunchSpec) -> VmProcess:
        if spec.vfio_devices:  # refused before anything starts: a job that needs a GPU never runs without it
            raise VmmError("vfio_unsupported", "Firecracker has no released VFIO passthrough (only a feature "
                                               "branch); GPU jobs need QEMU microvm or Cloud Hypervisor")
        if not self.available():
            raise VmmError("vmm_missing", f"{self.binary} not found")
        jail: Path | None = None
        if self.jailer:
            jail_id = "".join(c if c.isalnum() or c == "-" else "-" for c in spec.instance_id)[-60:]
            jail = self.chroot_base / Path(self.binary).name / jail_id
            paths = await asyncio.to_thread(self._fill_jail, jail / "root", spec)
            sock = jail / "root" / "run" / "firecracker.socket"
            argv = [self.jailer, "--id", jail_id, "--exec-file", shutil.which(self.binary) or self.binary,
                    "--uid", str(self.uid), "--gid", str(self.gid), "--chroot-base-dir", str(self.chroot_base),
                    "--", "--api-sock", "/run/firecracker.socket"]
        else:
            fd = f"/proc/{os.getpid()}/fd"
            paths = {"kernel": f"{fd}/{spec.kernel_fd}", "initrd": f"{fd}/{spec.initrd_fd}",
                     "rootfs": f"{fd}/{spec.rootfs_fd}", "scratch": str(spec.scratch)}
            if spec.volume is not None:
                paths["volume"] = str(spec.volume)
            sock = api_socket_path(spec.instance_id, "fc.sock")
            argv = [self.binary, "--api-sock", str(sock), "--id", spec.instance_id[-60:]]
        sock.unlink(missing_ok=True)
        channel, guest_end = socket.socketpair()
        fds = [spec.kernel_fd, spec.initrd_fd, spec.rootfs_fd, *spec.extra_fds]
        started = time.time_ns()
        try:
            with open(spec.workdir / "vmm.log", "wb") as vmm_log:
                proc = await asyncio.create_subprocess_exec(
                    *argv, pass_fds=fds, stdin=guest_end.fileno(), stdout=guest_end.fileno(), stderr=vmm_log,
                    start_new_session=True,
                    preexec_fn=spec.confine)
        except (OSError, subprocess.SubprocessError) as exc:
            channel.close()
            raise VmmError("vmm_start_failed", f"{type(exc).__name__}: {exc}") from None
        finally:
            guest_end.close()
        (spec.workdir / "vmm.pid").write_text(str(proc.pid))
        vm = VmProcess(proc.pid, proc, self.name, "kvm", started, spec.workdir / "console.log", channel=channel,
                       jail=jail, volume=spec.volume)
        if jail is not None and spec.volume is not None:
            vm.volume = jail / "root" / paths["volume"].lstrip("/")
        api = UdsApi(sock)
        try:
            await api.wait_ready(proc)
            await api.put("/machine-config", {"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib,
                                              "smt": False})
            await api.put("/boot-source", {"kernel_image_path": paths["kernel"], "initrd_path": paths["initrd"],
                                           "boot_args": spec.cmdline + " qvm.channel=ttyS0"})
            await api.put("/drives/root", {"drive_id": "root", "path_on_host": paths["rootfs"],
                                           "is_root_device": False, "is_read_only": True})
            await api.put("/drives/scratch", {"drive_id": "scratch", "path_on_host": paths["scratch"],
                                              "is_root_device": False, "is_read_only": False})
            if "volume" in paths:  # configured after scratch: the third disk, vdc in the guest
                await api.put("/drives/volume", {"drive_id": "volume", "path_on_host": paths["volume"],
                                                 "is_root_device": False, "is_read_only": False})
            if spec.tap:
                await api.put("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": spec.tap})
            await api.put("/actions", {"action_type": "InstanceStart"})
        except VmmError:
            await vm.kill()
            channel.close()
            if jail is not None:
                shutil.rmtree(jail, ignore_errors=True)
            raise
        finally:
            await api.close()
        vm.api_socket = sock
        return vm

    async def stop(self, vm: VmProcess, grace_s: float = 5.0) -> None:
        await stop_through_api(vm, [("/actions", {"action_type": "SendCtrlAltDel"})], grace_s)
        if vm.jail is not None and vm.volume is not None and vm.volume.is_relative_to(vm.jail):
            vm.volume_erasure = await asyncio.to_thread(erase_volume, vm.volume)  # before the jail goes
        if vm.jail is not None:
            await asyncio.to_thread(shutil.rmtree, vm.jail, True)
            vm.jail = None

    def _fill_jail(self, root: Path, spec: LaunchSpec) -> dict[str, str]:
        """Copy the verified bytes (from the agent's open descriptors), the scratch disk and the data volume
        into the chroot, owned by the jailed uid; returns the paths as Firecracker sees them inside it."""
        root.mkdir(parents=True, exist_ok=True)
        out = {}
        for role, fd, name, mode in (("kernel", spec.kernel_fd, "vmlinux", 0o440),
                                     ("initrd", spec.initrd_fd, "initrd.img", 0o440),
                                     ("rootfs", spec.rootfs_fd, "rootfs.ext4", 0o440)):
            dest = root / name
            with open(dest, "wb") as f:
                os.lseek(fd, 0, os.SEEK_SET)
                while chunk := os.read(fd, 4 << 20):
                    f.write(chunk)
            os.lseek(fd, 0, os.SEEK_SET)
            os.chown(dest, self.uid, self.gid)
            dest.chmod(mode)
            out[role] = f"/{name}"
        disks = [("scratch", spec.scratch, "scratch.ext4")]
        if spec.volume is not None:
            disks.append(("volume", spec.volume, "volume.luks"))
        for role, src, name in disks:
            dest = root / name
            subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
            os.chown(dest, self.uid, self.gid)
            out[role] = f"/{name}"
        return out
