"""The expected SEV-SNP launch measurement (shared/cvm/measure.py, over sev-snp-measure).

No AmdSev OVMF build is installed here (Debian bookworm ships OVMF.fd / OVMF_CODE*.fd: generic builds with SNP
metadata but no kernel-hashes section), and sev-snp-measure's own AmdSev fixture (the last 4 KiB of a real
OVMF.amdsev.fd) is not in its PyPI package. So the tests build a small firmware image of their own with the
parts sev-snp-measure reads from a real one, laid out as edk2's ResetVector lays them out: the GUIDed footer
table that ends 32 bytes before the image's end (the SEV-ES AP reset block, the SEV metadata pointer, the SEV
hashes table address) and the `ASEV` metadata listing the pages QEMU pre-validates (zero pages, secrets, CPUID,
the kernel-hashes page). It checks this module's own contract (determinism, what changes the digest, refusals),
not sev-snp-measure's arithmetic, which its upstream tests pin against real hardware. The installed Debian
OVMF, where present, shows the refusal of a firmware that cannot bind the kernel.
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from shared.cvm.errors import CvmError
from shared.cvm.measure import ovmf_supports_kernel_hashes, snp_measurement, tdx_note

FOOTER = "96b582de-1fb2-45f7-baea-a366c55a082d"
RESET_BLOCK = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
SEV_METADATA = "dc886566-984a-4798-a75e-5585a7bf67cc"
HASH_TABLE = "7255371f-3a3b-4b04-927b-1da6efa8d454"
SEC_MEM, SECRETS, CPUID, KERNEL_HASHES = 1, 2, 3, 0x10
DEBIAN_OVMF = Path("/usr/share/ovmf/OVMF.fd")


def _entry(guid: str, data: bytes) -> bytes:
    """A footer-table entry: its data, then (size, GUID) after it, as OVMF's table is read from the end."""
    return data + struct.pack("<H", len(data) + 18) + uuid.UUID(guid).bytes_le


def firmware(path: Path, *, kernel_hashes: bool = True, size: int = 64 * 1024) -> Path:
    """A synthetic AmdSev-shaped OVMF image at the top of the 4 GiB space (see the module docstring)."""
    sections = [(0x800000, 0x9000, SEC_MEM), (0x809000, 0x1000, SECRETS), (0x80A000, 0x1000, CPUID),
                (0x80B000, 0x1000, SEC_MEM)]
    if kernel_hashes:
        sections.append((0x80C000, 0x1000, KERNEL_HASHES))
    metadata = b"ASEV" + struct.pack("<III", 16 + 12 * len(sections), 1, len(sections))
    metadata += b"".join(struct.pack("<III", *s) for s in sections)
    image = bytearray(b"\xcc" * size)  # code bytes: measured as they are
    meta_at = size - 0x1000
    image[meta_at:meta_at + len(metadata)] = metadata
    entries = _entry(RESET_BLOCK, struct.pack("<I", 0xFFFFF000 - 0x1000))
    entries += _entry(SEV_METADATA, struct.pack("<I", size - meta_at))
    if kernel_hashes:
        entries += _entry(HASH_TABLE, struct.pack("<II", 0x80C000 + 0x400, 0x400))
    table = entries + struct.pack("<H", len(entries) + 18) + uuid.UUID(FOOTER).bytes_le
    end = size - 32
    image[end - len(table):end] = table
    path.write_bytes(bytes(image))
    return path


@pytest.fixture
def image(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "bzImage").write_bytes(b"kernel " * 1000)
    (tmp_path / "initrd").write_bytes(b"initrd " * 1000)
    return {"ovmf": firmware(tmp_path / "OVMF.amdsev.fd"), "kernel": tmp_path / "bzImage",
            "initrd": tmp_path / "initrd"}


def measure(image: dict[str, Path], cmdline: str = "console=ttyS0 qvm=1", vcpus: int = 2, **kw: object) -> str:
    return snp_measurement(image["ovmf"], image["kernel"], image["initrd"], cmdline, vcpus, **kw)  # type: ignore[arg-type]


def test_the_same_inputs_give_the_same_measurement(image: dict[str, Path]) -> None:
    first = measure(image)
    assert len(first) == 96 and first == first.lower() and int(first, 16)
    assert measure(image) == first
    assert ovmf_supports_kernel_hashes(image["ovmf"])


def test_every_measured_input_changes_it(image: dict[str, Path], tmp_path: Path) -> None:
    base = measure(image)
    changed = {
        "cmdline": measure(image, cmdline="console=ttyS0 qvm=2"),
        "cmdline, one trailing space": measure(image, cmdline="console=ttyS0 qvm=1 "),
        "vcpus": measure(image, vcpus=3),
        "vcpu model": measure(image, vcpu_type="EPYC-Milan"),
        "vmsa features": measure(image, guest_features=0x21),
    }
    (tmp_path / "bzImage").write_bytes(b"kernel " * 999 + b"evil!! ")
    changed["kernel"] = measure(image)
    (tmp_path / "bzImage").write_bytes(b"kernel " * 1000)
    (tmp_path / "initrd").write_bytes(b"initrd " * 1001)
    changed["initrd"] = measure(image)
    (tmp_path / "initrd").write_bytes(b"initrd " * 1000)
    assert measure(image) == base  # back to the original files, back to the original digest
    firmware(image["ovmf"], size=128 * 1024)
    changed["firmware"] = measure(image)
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed


def test_a_firmware_without_kernel_hashes_is_refused(tmp_path: Path, image: dict[str, Path]) -> None:
    generic = firmware(tmp_path / "OVMF.fd", kernel_hashes=False)
    assert not ovmf_supports_kernel_hashes(generic)
    with pytest.raises(CvmError) as refused:
        snp_measurement(generic, image["kernel"], image["initrd"], "console=ttyS0", 1)
    assert refused.value.reason == "ovmf_no_kernel_hashes" and "OVMF.amdsev.fd" in refused.value.detail


@pytest.mark.skipif(not DEBIAN_OVMF.is_file(), reason=f"no {DEBIAN_OVMF} (Debian/Ubuntu package ovmf)")
def test_the_installed_generic_ovmf_cannot_bind_the_kernel(image: dict[str, Path]) -> None:
    """Debian bookworm's OVMF.fd carries SNP metadata but no kernel-hashes section: refused, never measured."""
    assert not ovmf_supports_kernel_hashes(DEBIAN_OVMF)
    with pytest.raises(CvmError, match="ovmf_no_kernel_hashes"):
        snp_measurement(DEBIAN_OVMF, image["kernel"], image["initrd"], "console=ttyS0", 1)


def test_unusable_inputs_are_refused_with_a_reason(tmp_path: Path, image: dict[str, Path]) -> None:
    corrupt = firmware(tmp_path / "corrupt.fd")
    data = corrupt.read_bytes()
    corrupt.write_bytes(data.replace(b"ASEV", b"XSEV"))  # the metadata pointer leads to no SEV metadata
    cases: dict[str, dict[str, object]] = {
        "ovmf_unreadable": {"ovmf": tmp_path / "missing.fd"},
        "ovmf_unusable": {"ovmf": corrupt},
        "ovmf_no_kernel_hashes": {"ovmf": _blank(tmp_path / "blank.fd")},
        "image_unreadable": {"kernel": tmp_path / "no-kernel"},
        "unknown_vcpu_type": {"vcpu_type": "host"},
        "bad_vcpus": {"vcpus": 0},
    }
    for reason, change in cases.items():
        args: dict[str, object] = {**image, "cmdline": "console=ttyS0", "vcpus": 1, **change}
        with pytest.raises(CvmError) as refused:
            snp_measurement(**args)  # type: ignore[arg-type]
        assert refused.value.reason == reason, (reason, refused.value)


def _blank(path: Path) -> Path:
    """A file with no footer table at all (not a firmware image)."""
    path.write_bytes(bytes(4096))
    return path


def test_tdx_has_nothing_to_compute_and_says_why() -> None:
    note = tdx_note()
    assert "MRTD" in note and "TDVF" in note and "RTMR" in note


def test_the_policy_approves_each_image_as_the_confidential_driver_boots_it(tmp_path: Path) -> None:
    """`qvm attest policy --snp-ovmf`: one measurement per image, command line (with and without the network
    argument the agent adds) and vCPU count; the argument is the agent's own."""
    from services.node_agent.isolation.network import guest_net_arg
    from shared.image.manifest import ImageManifest, Part
    from shared.tpm.policy_gen import GUEST_NET_ARG, snp_measurements

    assert guest_net_arg() == GUEST_NET_ARG
    bundle = tmp_path / "images" / "demo"
    bundle.mkdir(parents=True)
    (bundle / "bzImage").write_bytes(b"k" * 4096)
    (bundle / "initrd").write_bytes(b"i" * 4096)
    part = Part(file="bzImage", sha256="00" * 32, size=4096)
    manifest = ImageManifest(name="demo", created_ns=0, kernel=part, initrd=part.model_copy(update={"file": "initrd"}),
                             rootfs=part, cmdline="console=ttyS0", kernel_release="6.12", publisher="00" * 8)
    (bundle / "manifest.json").write_text(manifest.model_dump_json())
    ovmf = firmware(tmp_path / "OVMF.amdsev.fd")
    measured = snp_measurements(tmp_path / "images", ovmf, (1, 2))
    assert len(measured) == 4 and all(len(m) == 96 for m in measured)
    assert snp_measurement(ovmf, bundle / "bzImage", bundle / "initrd", f"console=ttyS0 {GUEST_NET_ARG}", 2) in measured
