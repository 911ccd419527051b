"""Fast starts, the parts that need no VM: the guest init's boot stamps (untrusted input), the boot breakdown
they give, the minimal kernel's config check, and the host's KVM-or-TCG answer kept per host boot."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from services.node_agent.channel import BOOT_STAGES, ChannelError, GuestChannel, parse_boot_stamps
from services.node_agent.instance import boot_breakdown
from services.node_agent.vmm import qemu_microvm
from shared.image.kernel_build import config_fragment, fragment_options, unmet_options

STAMPS = "init=0.41 modules=0.41 channel=0.45 disks=0.52 scratch=0.60 mkfs=0.91 overlay=0.95 ready=0.96"


def test_stamps_parse_in_order() -> None:
    stamps = parse_boot_stamps(STAMPS)
    assert list(stamps) == list(BOOT_STAGES)
    assert stamps["mkfs"] == pytest.approx(0.91)
    assert parse_boot_stamps("") == {}  # an init from before the stamps


@pytest.mark.parametrize("text", [
    "init=0.4 what=0.5",  # unknown stage
    "init=0.4 init=0.5",  # twice
    "init=0.9 modules=0.4",  # time going backwards
    "modules=0.4 init=0.5",  # out of order
    "init=-1",
    "init=1e9",
    "init=99999999",
    "init=0.4  modules=0.5",  # an empty word
    "init=0.4;reboot",
    "init=" + "9" * 40,
])
def test_bad_stamps_are_refused(text: str) -> None:
    with pytest.raises(ChannelError) as err:
        parse_boot_stamps(text)
    assert err.value.reason == "bad_frame"


async def test_ready_frame_carries_the_stamps() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(f"READY {STAMPS}\n".encode())
    reader.feed_eof()
    ch = GuestChannel(reader, None)  # type: ignore[arg-type]  # reading only
    assert (await ch.wait_ready())["ready"] == pytest.approx(0.96)


def test_breakdown_adds_up_to_the_boot() -> None:
    stamps = parse_boot_stamps(STAMPS)
    b = boot_breakdown(1500.0, 40.0, stamps, accel_probe_ms=10.0)
    assert b is not None
    assert b.accel_probe_ms == 10.0 and b.vmm_start_ms == 30.0
    assert b.kernel_ms == pytest.approx(410.0) and b.mkfs_ms == pytest.approx(310.0)
    assert b.firmware_ms == pytest.approx(1500.0 - 40.0 - 960.0)
    assert sum(b.model_dump().values()) == pytest.approx(1500.0, abs=1.0)
    assert boot_breakdown(1500.0, 40.0, {}) is None


def test_breakdown_never_negative() -> None:
    """A guest clock ahead of the host's (it claims more than the whole boot) costs the firmware share, not
    a negative figure."""
    b = boot_breakdown(500.0, 40.0, parse_boot_stamps(STAMPS))
    assert b is not None and b.firmware_ms == 0.0
    assert min(b.model_dump().values()) >= 0


def test_the_checked_in_config_asks_for_what_the_guest_needs() -> None:
    options = fragment_options(config_fragment())
    for name in ("CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_CONSOLE", "CONFIG_DM_CRYPT",
                 "CONFIG_CRYPTO_XTS", "CONFIG_EXT4_FS", "CONFIG_OVERLAY_FS", "CONFIG_VIRTIO_VSOCKETS",
                 "CONFIG_TSM_REPORTS", "CONFIG_SEV_GUEST", "CONFIG_TDX_GUEST_DRIVER",
                 "CONFIG_SECURITY_LOCKDOWN_LSM"):
        assert options[name] == "y", name
    assert options["CONFIG_MODULES"] == "n"


def test_an_option_the_config_did_not_take_is_named() -> None:
    wanted = {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "y"}
    resolved = fragment_options("CONFIG_A=y\n# CONFIG_C is not set\n")
    assert unmet_options(wanted, resolved) == ["CONFIG_C=y (got n)"]


def _fake_qemu(tmp_path: Path, rc: int, sleep_s: float = 0.0) -> tuple[Path, Path]:
    """A stand-in for QEMU's KVM probe (the hardware boundary these machines lack: a KVM that boots): it
    counts its runs and exits `rc`."""
    runs = tmp_path / "runs"
    qemu = tmp_path / "qemu-fake"
    qemu.write_text(f"#!/bin/sh\necho run >> {runs}\n" + (f"exec sleep {sleep_s}\n" if sleep_s else f"exit {rc}\n"))
    qemu.chmod(qemu.stat().st_mode | stat.S_IXUSR)
    return qemu, runs


@pytest.fixture
def fresh_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(qemu_microvm, "_accel_probes", {})
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: the probe answers tcg without running QEMU")


async def test_the_answer_is_kept_for_every_process_of_this_host_boot(tmp_path: Path, fresh_probe: None,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    qemu, runs = _fake_qemu(tmp_path, rc=0)
    first = await asyncio.gather(*(qemu_microvm.detect_accel(tmp_path / "k", str(qemu)) for _ in range(3)))
    assert {a for a, _ in first} == {"kvm"}
    assert runs.read_text().count("run") == 1  # concurrent callers share one probe
    monkeypatch.setattr(qemu_microvm, "_accel_probes", {})  # as a new agent process would start
    assert (await qemu_microvm.detect_accel(tmp_path / "k", str(qemu)))[0] == "kvm"
    assert runs.read_text().count("run") == 1  # answered from the cache: no second probe boot


async def test_a_hanging_kvm_is_tcg_within_the_bound(tmp_path: Path, fresh_probe: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_microvm, "PROBE_TIMEOUT_S", 0.5)
    qemu, _ = _fake_qemu(tmp_path, rc=0, sleep_s=30)
    accel, why = await qemu_microvm.detect_accel(tmp_path / "k", str(qemu))
    assert accel == "tcg" and "hung" in why
