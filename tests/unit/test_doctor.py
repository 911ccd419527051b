"""`qvm node doctor`: the host checks, run on fixture trees (one `HostRoot`) with fake live probes, through
the CLI, at node-agent start (`QVM_NODE_DOCTOR`), and once for real on this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.node_agent.doctor import (
    KVM_API_VERSION,
    MIN_FREE_BYTES,
    Check,
    HostProbes,
    HostRoot,
    Probes,
    gate,
    main,
    render,
    run_checks,
)
from services.node_agent.settings import NodeAgentSettings
from shared.cli.main import app
from shared.errors import ConfigError
from shared.models import GpuInfo
from tests.framework.sysfs import SysfsTree

GPU_BDF = "0000:3b:00.0"
H100 = GpuInfo(index=0, uuid="GPU-1", name="NVIDIA H100", memory_mib=81559, pci_bus_id="00000000:3B:00.0",
               driver_version="550.54.15")


class FakeProbes(Probes):
    def __init__(self, *, euid: int = 0, binaries: tuple[str, ...] = ("qemu-system-x86_64", "nft"),
                 kvm: int | str = KVM_API_VERSION, gpus: tuple[GpuInfo, ...] = (), ek: bool | None = True,
                 free: int = 100 * 1024**3, ntp: str | None = "yes",
                 guard: tuple[str | None, str] = ("enforce", "BPF LSM guard loads and attaches")) -> None:
        self._euid, self.binaries, self.kvm, self._gpus, self.ek = euid, binaries, kvm, gpus, ek
        self.free, self.ntp, self.guard = free, ntp, guard

    def euid(self) -> int:
        return self._euid

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.binaries else None

    def run(self, argv: object) -> tuple[int, str] | None:
        return None if self.ntp is None else (0, self.ntp)

    def kvm_api_version(self, dev: Path) -> int | str:
        return self.kvm

    def gpus(self) -> tuple[GpuInfo, ...]:
        return self._gpus

    def runtime_guard(self) -> tuple[str | None, str]:  # the real probe is tests/integration/test_guard.py's
        return self.guard

    def ek_certificate(self, dev: Path) -> bool | None:
        return self.ek

    def free_bytes(self, path: Path) -> int:
        return self.free


def host(root: Path, *, gpu: bool = True, iommu: bool = True, tpm: bool = True, os_release: str = "ubuntu",
         cgroup_v2: bool = True) -> HostRoot:
    """A fixture host under `root`: Ubuntu 22.04, kernel 5.15, VT-x, KVM, and as asked: an NVIDIA GPU with its
    audio function alone in IOMMU group 12, IOMMU on the command line, /dev/tpmrm0, cgroup v2."""
    tree = SysfsTree(root)
    if gpu:
        group = 12 if iommu else None
        tree.add_device(GPU_BDF, group=group)
        tree.add_device("0000:3b:00.1", group=group, pci_class=0x040300, driver="snd_hda_intel")
    files = {
        "etc/os-release": 'ID=ubuntu\nVERSION_ID="22.04"\nPRETTY_NAME="Ubuntu 22.04.4 LTS"\n'
        if os_release == "ubuntu" else 'ID=centos\nVERSION_ID="7"\n',
        "proc/sys/kernel/osrelease": "5.15.0-105-generic\n",
        "proc/cpuinfo": "processor\t: 0\nflags\t\t: fpu vme sse2 vmx avx2\n",
        "proc/cmdline": "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro" + (" intel_iommu=on iommu=pt" if iommu else "") + "\n",
        "dev/kvm": "",
    }
    if tpm:
        files["dev/tpmrm0"] = ""
    if cgroup_v2:
        files["sys/fs/cgroup/cgroup.controllers"] = "cpuset cpu io memory pids\n"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return HostRoot(root)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_a_good_gpu_host_passes_every_check(tmp_path: Path) -> None:
    checks = run_checks(host(tmp_path), FakeProbes(gpus=(H100,)))
    assert [c for c in checks if c.status != "ok"] == [
        c for c in checks if c.name == "confidential vms"]  # optional, and this host has no SEV-SNP / TDX
    named = by_name(checks)
    assert named["iommu"].hard and named["tpm"].hard and named["root"].hard
    assert named[f"gpu {GPU_BDF} isolation"].found == "IOMMU group 12: 0000:3b:00.0, 0000:3b:00.1"
    assert named["nvidia driver"].found.startswith("driver 550.54.15, 1 GPU(s)")
    assert named["os"].found == "Ubuntu 22.04.4 LTS" and named["cgroups"].found.startswith("cgroup v2")
    assert main(["--root", str(tmp_path)], FakeProbes(gpus=(H100,))) == 0


def test_iommu_off_fails_with_the_kernel_options_to_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checks = by_name(run_checks(host(tmp_path, iommu=False), FakeProbes(gpus=(H100,))))
    iommu, isolation = checks["iommu"], checks[f"gpu {GPU_BDF} isolation"]
    assert iommu.status == "fail" and iommu.hard
    assert "intel_iommu=on" in iommu.hint and "amd_iommu=on" in iommu.hint
    assert isolation.status == "fail" and isolation.found.startswith("iommu_off")
    assert main(["--root", str(tmp_path)], FakeProbes(gpus=(H100,))) == 1
    assert "2 hard requirement(s) failed: iommu, gpu 0000:3b:00.0 isolation" in capsys.readouterr().out


def test_a_gpu_sharing_its_iommu_group_is_not_isolable(tmp_path: Path) -> None:
    root = host(tmp_path)
    SysfsTree(tmp_path).add_device("0000:00:01.0", vendor=0x8086, device=0x1901, pci_class=0x060400,
                                   driver="pcieport", group=12)
    isolation = by_name(run_checks(root, FakeProbes(gpus=(H100,))))[f"gpu {GPU_BDF} isolation"]
    assert isolation.status == "fail" and isolation.found.startswith("iommu_group_shared")
    assert "IOMMU group" in isolation.hint


def test_no_tpm_fails_and_says_the_node_stays_unverified(tmp_path: Path) -> None:
    checks = by_name(run_checks(host(tmp_path, tpm=False), FakeProbes(gpus=(H100,))))
    assert checks["tpm"].status == "fail" and checks["tpm"].hard
    assert "unverified" in checks["tpm"].hint
    assert "tpm ek certificate" not in checks


@pytest.mark.parametrize(("ek", "status", "found"), [(True, "ok", "EK certificate in NV"),
                                                      (False, "warn", "no EK certificate"),
                                                      (None, "warn", "not checked")])
def test_the_ek_certificate_is_reported(tmp_path: Path, ek: bool | None, status: str, found: str) -> None:
    check = by_name(run_checks(host(tmp_path), FakeProbes(ek=ek)))["tpm ek certificate"]
    assert (check.status, check.hard) == (status, False) and check.found.startswith(found)


def test_a_cpu_only_host_warns_about_gpus_and_passes(tmp_path: Path) -> None:
    checks = run_checks(host(tmp_path, gpu=False, iommu=False), FakeProbes())
    named = by_name(checks)
    for name in ("iommu", "gpu isolation", "nvidia driver"):
        assert (named[name].status, named[name].hard) == ("warn", False), name
        assert named[name].hint
    assert not [c for c in checks if c.status == "fail"]
    assert main(["--root", str(tmp_path)], FakeProbes()) == 0


def test_warnings_never_fail_a_host(tmp_path: Path) -> None:
    """Old OS, cgroup v1, no nft, no KVM (TCG), no NTP answer, little disk, GPUs on PCI but no driver."""
    probes = FakeProbes(binaries=("qemu-system-x86_64",), kvm="no /dev/kvm", ek=None, free=MIN_FREE_BYTES - 1,
                        ntp=None)
    checks = by_name(run_checks(host(tmp_path, os_release="centos", cgroup_v2=False), probes))
    for name in ("os", "cgroups", "nftables", "kvm", "clock", "disk", "nvidia driver"):
        assert checks[name].status == "warn" and checks[name].hint, name
    assert "TCG" in checks["kvm"].found and "1 NVIDIA GPU(s), NVML none" in checks["nvidia driver"].found
    assert main(["--root", str(tmp_path)], probes) == 0


def test_no_kvm_and_no_qemu_and_not_root_fail(tmp_path: Path) -> None:
    probes = FakeProbes(euid=1000, binaries=(), kvm="cannot open /dev/kvm: Permission denied")
    checks = by_name(run_checks(host(tmp_path), probes))
    assert checks["kvm"].status == "fail" and "qemu-system-x86" in checks["kvm"].hint
    assert checks["root"].status == "fail" and checks["root"].found == "running as uid 1000"


def test_json_output_is_a_list_of_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path), "--json"], FakeProbes()) == 1  # an empty tree: no TPM
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report, list) and report
    for item in report:
        assert set(item) == {"name", "status", "hard", "found", "hint"}
        assert item["status"] in ("ok", "warn", "fail") and isinstance(item["hard"], bool)
        assert item["status"] != "fail" or item["hard"]  # only requirements fail
        assert item["status"] == "ok" or item["hint"]


def test_the_table_shows_a_fix_under_each_non_ok_check(tmp_path: Path) -> None:
    text = render(run_checks(host(tmp_path, tpm=False), FakeProbes()))
    assert "tpm" in text and "fail *" in text and "fix: enable the TPM 2.0" in text
    assert text.endswith("1 hard requirement(s) failed: tpm")


def test_qvm_node_doctor_runs_the_node_agent_s_doctor(tmp_path: Path) -> None:
    """Through the CLI (a subprocess with the real probes): no TPM fails whoever runs it."""
    host(tmp_path / "notpm", tpm=False)
    result = CliRunner().invoke(app, ["node", "doctor", "--json", "--root", str(tmp_path / "notpm"),
                                      "--state-dir", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert by_name([Check(**c) for c in json.loads(result.stdout)])["tpm"].status == "fail"
    host(tmp_path / "good")
    result = CliRunner().invoke(app, ["node", "doctor", "--root", str(tmp_path / "good")])
    assert "check" in result.stdout and "tpm" in result.stdout
    # this machine's euid and qemu decide the live checks; the fixture's files decide the rest
    assert result.exit_code == (0 if os.geteuid() == 0 else 1), result.output


def test_the_node_agent_start_gate(tmp_path: Path) -> None:
    root, probes = host(tmp_path, tpm=False), FakeProbes()
    settings = NodeAgentSettings(state_dir=tmp_path)
    warned: list[str] = []
    assert gate(settings.model_copy(update={"node_doctor": "warn"}), root, probes, warned.append)
    assert len(warned) == 1 and warned[0].startswith("node doctor: tpm: no /dev/tpmrm0 (fix: enable the TPM")
    with pytest.raises(ConfigError, match=r"tpm: no /dev/tpmrm0 \(fix: enable the TPM 2.0.*QVM_NODE_DOCTOR=warn"):
        gate(settings.model_copy(update={"node_doctor": "enforce"}), root, probes)
    assert gate(settings.model_copy(update={"node_doctor": "off"}), root, probes) == []
    assert gate(settings.model_copy(update={"node_doctor": "enforce"}), host(tmp_path / "good"), probes)
    assert NodeAgentSettings().node_doctor == "warn"


def test_the_doctor_runs_for_real_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--json"], HostProbes())
    report = [Check(**c) for c in json.loads(capsys.readouterr().out)]
    names = [c.name for c in report]
    for name in ("os", "kernel", "root", "cpu virtualisation", "kvm", "iommu", "nvidia driver", "tpm", "cgroups",
                 "nftables", "confidential vms", "disk", "clock"):
        assert name in names
    assert all(c.status in ("ok", "warn", "fail") and (c.status == "ok" or c.hint) for c in report)
    assert code == (1 if any(c.hard and c.status == "fail" for c in report) else 0)


@pytest.mark.parametrize(("guard", "status", "says"), [
    (("enforce", "BPF LSM guard loads and attaches"), "ok", "loads and attaches"),
    (("observe", "observe only: BPF LSM unavailable"), "warn", "nothing is denied"),
    ((None, "lsm_inactive: no BTF"), "warn", "advertises no runtime guard"),
])
def test_the_runtime_guard_is_reported(tmp_path: Path, guard: tuple[str | None, str], status: str, says: str) -> None:
    check = by_name(run_checks(host(tmp_path), FakeProbes(guard=guard)))["runtime guard"]
    assert check.status == status and not check.hard
    assert says in check.found + " " + check.hint
