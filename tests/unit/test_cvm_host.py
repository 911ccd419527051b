"""Confidential-VM capability, read from fixture hosts: a kind is capable only when CPU, kernel, device, OVMF
build and QEMU all say so, and each missing piece is named with its fix. QEMU is a fake runner here; one test
asks the installed QEMU for real (QEMU 7.2 here: it has neither object, so nothing is capable)."""

from __future__ import annotations

import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.node_agent import cvm_host
from services.node_agent.cvm_host import KINDS, Kind, detect, find_ovmf, qemu_objects, snp_cbit
from services.node_agent.doctor import HostRoot, Probes, check_confidential
from services.node_agent.inventory import HostReader

QEMU_HELP = "List of user creatable objects:\n  memory-backend-memfd\n  sev-guest\n  sev-snp-guest\n  tdx-guest\n"
EBX_GENOA = 51 | 1 << 6  # C-bit 51, one physical address bit lost: what EPYC Milan / Genoa / Turin report


class Qemu:
    """A fake runner for `qemu-system-x86_64 -object help`, recording what it was asked."""

    def __init__(self, listing: str | None = QEMU_HELP, rc: int = 0) -> None:
        self.listing, self.rc = listing, rc
        self.asked: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> tuple[int, str] | None:
        self.asked.append(list(argv))
        return None if self.listing is None else (self.rc, self.listing)


def write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def host(root: Path, kind: Kind, *, skip: str = "") -> Path:
    """A host that has every piece `kind` needs, except the one named in `skip`."""
    flag = {"sev-snp": "sev_snp", "tdx": "tdx_host_platform"}[kind]
    if skip != "cpu":
        write(root, "proc/cpuinfo", f"processor\t: 0\nflags\t\t: fpu vme sse2 {flag} avx2\n")
    else:
        write(root, "proc/cpuinfo", "processor\t: 0\nflags\t\t: fpu vme sse2 avx2\n")
    param = {"sev-snp": "sys/module/kvm_amd/parameters/sev_snp", "tdx": "sys/module/kvm_intel/parameters/tdx"}[kind]
    write(root, param, "N\n" if skip == "kernel" else "Y\n")
    write(root, "dev/kvm", "")
    if kind == "sev-snp" and skip != "device":
        write(root, "dev/sev", "")
    if skip != "firmware":
        write(root, cvm_host.OVMF_CANDIDATES[kind][1].lstrip("/"), "firmware")
    write(root, "sys/devices/system/cpu/cpu0/microcode/version", "0xa0011d5\n")
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_a_host_with_every_piece_is_capable(tmp_path: Path, kind: Kind) -> None:
    qemu = Qemu()
    found = detect(host(tmp_path, kind), qemu)
    assert found.features() == (kind,)
    assert qemu.asked == [["qemu-system-x86_64", "-object", "help"]]
    support = found.support(kind)
    assert support.capable and support.missing == ()
    assert support.ovmf == Path(cvm_host.OVMF_CANDIDATES[kind][1])  # a host path, not under the fixture root
    assert found.explain()[kind].startswith("capable: CPU flag ")
    assert found.microcode == "0xa0011d5"
    other = next(k for k in KINDS if k != kind)
    assert found.explain()[other].startswith("missing: cpu: ")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", ["cpu", "kernel", "device", "firmware", "qemu"])
def test_each_missing_piece_alone_makes_a_kind_incapable_and_is_named(tmp_path: Path, kind: Kind,
                                                                      skip: str) -> None:
    if kind == "tdx" and skip == "device":
        (host(tmp_path, kind) / "dev/kvm").unlink()
    else:
        host(tmp_path, kind, skip=skip)
    listing = QEMU_HELP.replace(f"  {cvm_host.QEMU_OBJECTS[kind]}\n", "") if skip == "qemu" else QEMU_HELP
    found = detect(tmp_path, Qemu(listing))
    assert found.features() == ()
    support = found.support(kind)
    assert [p.name for p in support.missing] == [skip]
    assert support.missing[0].hint
    assert found.explain()[kind].startswith(f"missing: {skip}: ")


def test_what_each_missing_piece_says(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    write(root, "proc/cpuinfo", "flags\t: fpu\n")
    write(root, "sys/module/kvm_amd/parameters/sev_snp", "N\n")
    snp = detect(root, Qemu("List of user creatable objects:\n  sev-guest\n")).support("sev-snp")
    said = {p.name: p.found for p in snp.missing}
    assert said == {
        "cpu": "no sev_snp in /proc/cpuinfo flags",
        "kernel": "/sys/module/kvm_amd/parameters/sev_snp is N",
        "device": "no /dev/sev, /dev/kvm",
        "firmware": "none of " + ", ".join(cvm_host.OVMF_CANDIDATES["sev-snp"]),
        "qemu": "qemu-system-x86_64 has no sev-snp-guest object",
    }
    assert "QEMU >= 9.1" in snp.piece("qemu").hint and "6.11" in snp.piece("kernel").hint
    tdx = detect(root, Qemu(None)).support("tdx")
    assert tdx.piece("kernel").found == "no /sys/module/kvm_intel/parameters/tdx"
    assert tdx.piece("qemu").found == "qemu-system-x86_64 -object help did not answer"
    assert not detect(root, Qemu(rc=1)).support("tdx").piece("qemu").ok  # a QEMU that fails lists nothing


def test_the_kernel_parameter_accepts_Y_or_1_only(tmp_path: Path) -> None:
    for i, (value, ok) in enumerate((("Y", True), ("1", True), ("N", False), ("0", False), ("", False))):
        root = host(tmp_path / str(i), "sev-snp")
        write(root, "sys/module/kvm_amd/parameters/sev_snp", value + "\n")
        assert detect(root, Qemu()).support("sev-snp").piece("kernel").ok is ok


def test_both_kinds_on_one_host_and_the_first_installed_ovmf_wins(tmp_path: Path) -> None:
    host(tmp_path, "tdx")
    host(tmp_path, "sev-snp")
    write(tmp_path, "proc/cpuinfo", "flags\t: sev_snp tdx_host_platform\n")  # not a real CPU: both, for the test
    assert detect(tmp_path, Qemu()).features() == ("sev-snp", "tdx")
    write(tmp_path, cvm_host.OVMF_CANDIDATES["sev-snp"][0].lstrip("/"), "preferred")
    assert find_ovmf("sev-snp", tmp_path) == Path(cvm_host.OVMF_CANDIDATES["sev-snp"][0])
    assert find_ovmf("sev-snp", tmp_path / "nowhere") is None


def test_the_c_bit_comes_from_cpuid_leaf_8000001f(tmp_path: Path) -> None:
    """The cpuid driver's file offset is the leaf; a sparse fixture file holds EAX..EDX at that offset."""
    cpuid = tmp_path / "dev/cpu/0/cpuid"
    cpuid.parent.mkdir(parents=True)
    with open(cpuid, "wb") as f:
        f.seek(0x8000001F)
        f.write(struct.pack("<4I", 0x1003F, EBX_GENOA, 509, 100))
    assert snp_cbit(tmp_path) == (51, 1)
    assert detect(tmp_path, Qemu()).snp_cbitpos == 51
    with open(cpuid, "r+b") as f:  # a CPU (or a VM) without the leaf: no C-bit, no answer
        f.seek(0x8000001F)
        f.write(bytes(16))
    assert snp_cbit(tmp_path) is None
    assert snp_cbit(tmp_path / "no-driver") is None
    cpuid.write_bytes(b"short")
    assert snp_cbit(tmp_path) is None


def test_the_tdx_module_status_is_shown_when_the_kernel_has_it(tmp_path: Path) -> None:
    write(host(tmp_path, "tdx"), "sys/firmware/tdx/tdx_module/status", "initialized\n")
    found = detect(tmp_path, Qemu())
    assert found.tdx_module == "initialized" and found.features() == ("tdx",)
    assert detect(tmp_path / "x", Qemu()).tdx_module is None


def test_the_default_runner_asks_each_qemu_once(tmp_path: Path) -> None:
    fake = tmp_path / "qemu"
    calls = tmp_path / "calls"
    fake.write_text(f"#!/bin/sh\necho x >> {calls}\nprintf 'List of user creatable objects:\\n  tdx-guest\\n'\n")
    fake.chmod(0o755)
    missing = tmp_path / "not-yet-installed"
    try:
        assert qemu_objects(str(fake)) == frozenset({"tdx-guest"})
        assert qemu_objects(str(fake)) == frozenset({"tdx-guest"})
        assert calls.read_text().count("x") == 1
        assert qemu_objects(str(missing)) is None  # not an answer: not kept
        missing.write_text(fake.read_text())
        missing.chmod(0o755)
        assert qemu_objects(str(missing)) == frozenset({"tdx-guest"})
    finally:
        cvm_host._objects_cache.pop(str(fake), None)
        cvm_host._objects_cache.pop(str(missing), None)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")
def test_the_installed_qemu_is_asked_for_real(tmp_path: Path) -> None:
    objects = qemu_objects()
    assert objects is not None and "memory-backend-memfd" in objects
    snp = detect(host(tmp_path, "sev-snp")).support("sev-snp")
    assert snp.piece("qemu").ok is ("sev-snp-guest" in objects)


class RunProbes(Probes):
    def __init__(self, qemu: Qemu) -> None:
        self.qemu = qemu

    def run(self, argv: Sequence[str]) -> tuple[int, str] | None:
        return self.qemu(argv)


def test_the_inventory_and_the_doctor_read_the_same_answer(tmp_path: Path) -> None:
    root = host(tmp_path, "sev-snp")
    assert HostReader(root).confidential(Qemu()) == ("sev-snp",)
    ok = check_confidential(HostRoot(root), RunProbes(Qemu()))
    assert ok.status == "ok" and not ok.hard
    assert ok.found.startswith("SEV-SNP capable: CPU flag sev_snp") and "microcode 0xa0011d5" in ok.found
    (root / "dev/sev").unlink()  # the CPU has it, one layer does not: the doctor names that layer's fix
    assert HostReader(root).confidential(Qemu()) == ()
    near = check_confidential(HostRoot(root), RunProbes(Qemu()))
    assert near.status == "warn" and "SEV-SNP missing: device: no /dev/sev" in near.found
    assert near.hint.startswith("SEV-SNP: load ccp")
    bare = check_confidential(HostRoot(tmp_path / "bare"), RunProbes(Qemu()))
    assert bare.status == "warn" and bare.hint.startswith("only for confidential jobs")
