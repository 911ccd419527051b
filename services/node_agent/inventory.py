"""Read the host's real inventory: CPU, RAM, GPUs (NVML), VMMs, KVM, TPM, confidential-computing support.

Everything comes from the machine (procfs, sysfs, /dev, NVML), never from the hoster's word. NVML is
optional: on a host without the NVIDIA driver the GPU list is empty, and the reason is logged. The NVML
reading itself lives in `services.node_agent.gpu.nvml` (re-exported here as `nvml_gpus`).
`root` lets tests read a fixture tree; hosts use `/`.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from services.node_agent import cvm_host
from services.node_agent.cvm_host import Runner
from services.node_agent.gpu.nvml import nvml_gpus
from shared.models import GpuInfo, Inventory, TpmInfo
from shared.telemetry import get_logger

__all__ = ["HostReader", "nvml_gpus"]

log = get_logger("qvm.node_agent.inventory")

VMM_BINARIES = {"qemu-microvm": "qemu-system-x86_64", "firecracker": "firecracker",
                "cloud-hypervisor": "cloud-hypervisor"}


@dataclass(frozen=True)
class HostReader:
    root: Path = Path("/")

    def _read(self, rel: str) -> str:
        try:
            return (self.root / rel).read_text(errors="replace")
        except OSError:
            return ""

    def cpu_model(self) -> str:
        for line in self._read("proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()[:255]
        return "unknown"

    def cpu_cores(self) -> int:
        if self.root == Path("/"):
            return len(os.sched_getaffinity(0))
        return max(1, sum(1 for line in self._read("proc/cpuinfo").splitlines() if line.startswith("processor")))

    def meminfo_mib(self, field: str) -> int:
        for line in self._read("proc/meminfo").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
        return 0

    def confidential(self, run: Runner | None = None) -> tuple[str, ...]:
        """The confidential-VM kinds this host can launch end to end (CPU, kernel, device, OVMF build, QEMU
        object all present: `cvm_host.detect`); a kind half-configured is not offered to the scheduler."""
        return cvm_host.detect(self.root, run).features()

    def kvm(self) -> bool:
        dev = self.root / "dev/kvm"
        return dev.exists() and os.access(dev, os.R_OK | os.W_OK)

    def tpm(self) -> TpmInfo:
        for rel in ("dev/tpmrm0", "dev/tpm0"):
            if (self.root / rel).exists():
                return TpmInfo(present=True, device="/" + rel)
        return TpmInfo(present=False)

    def inventory(self, gpus: tuple[GpuInfo, ...] | None = None) -> Inventory:
        return Inventory(
            hostname=socket.gethostname()[:255],
            cpu_model=self.cpu_model(),
            cpu_cores=self.cpu_cores(),
            ram_mib=self.meminfo_mib("MemTotal") or 1,
            gpus=nvml_gpus() if gpus is None else gpus,
            vmms=tuple(name for name, binary in VMM_BINARIES.items() if shutil.which(binary)),
            kvm=self.kvm(),
            tpm=self.tpm(),
            confidential=self.confidential(),
        )
