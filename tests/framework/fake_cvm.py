"""A FAKE at a hardware boundary these machines lack: AMD's SEV-SNP firmware (the PSP) and its key chain.

It signs attestation reports the way the firmware does (the ABI's ATTESTATION_REPORT layout, ECDSA P-384 over
bytes 0..0x2A0, r and s little-endian) with a VCEK that carries AMD's TCB and hardware-id extensions, under
an ASK and an ARK of its own. Nothing in qvm trusts this ARK unless a test names it explicitly (the
attestation policy's `cvm.extra_roots`); the real path is checked against reports from real Milan hardware
(tests/unit/test_cvm_snp.py). `FakeSnpMicrovm` runs a real QEMU microvm whose guest channel answers
CVM_REPORT frames from this firmware instead of the guest (a microvm has no SNP), so the agent, the
verifier and the key-broker run their real confidential path end to end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import socket
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from services.node_agent.vmm.base import LaunchSpec, VmProcess
from services.node_agent.vmm.qemu_microvm import QemuMicrovm

__all__ = ["FakeSnpFirmware", "FakeSnpMicrovm"]

_AMD = "1.3.6.1.4.1.3704.1"
TCB = {"bootloader": 4, "tee": 0, "snp": 23, "microcode": 213}  # Milan's TCB_VERSION bytes 0, 1, 6, 7


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return b"\x02" + bytes([len(body)]) + body


def _tcb_u64(tcb: dict[str, int]) -> int:
    return tcb["bootloader"] | tcb["tee"] << 8 | tcb["snp"] << 48 | tcb["microcode"] << 56


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
                      x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
                      x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@dataclass
class FakeSnpFirmware:
    """An ARK -> ASK -> VCEK chain made at construction, and a report signer over it."""

    measurement: bytes = bytes.fromhex("5e" * 48)
    policy: int = 0x30000  # SMT allowed, debug and migration agent off
    chip_id: bytes = bytes(range(64))
    tcb: dict[str, int] = field(default_factory=lambda: dict(TCB))
    ark_key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    ark: x509.Certificate = field(init=False)
    ask: x509.Certificate = field(init=False)
    vcek: x509.Certificate = field(init=False)
    _vcek_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)

    def __post_init__(self) -> None:
        now = dt.datetime.now(dt.UTC)
        ask_key = rsa.generate_private_key(65537, 2048)
        self._vcek_key = ec.generate_private_key(ec.SECP384R1())

        def cert(subject: str, issuer: str, public: object, signer: object, ca: bool,
                 extensions: list[x509.ExtensionType] = ()) -> x509.Certificate:  # type: ignore[assignment]
            b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
                 .public_key(public).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
                 .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650)))
            if ca:
                b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            for ext in extensions:
                b = b.add_extension(ext, critical=False)
            return b.sign(signer, hashes.SHA384(), rsa_padding=_PSS)  # type: ignore[arg-type]

        self.ark = cert("ARK-Milan", "ARK-Milan", self.ark_key.public_key(), self.ark_key, True)
        self.ask = cert("SEV-Milan", "ARK-Milan", ask_key.public_key(), self.ark_key, True)
        tcb_ext = [x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.3.{i}"), _der_int(self.tcb[name]))
                   for i, name in ((1, "bootloader"), (2, "tee"), (3, "snp"), (8, "microcode"))]
        ident = [x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.1"), _der_int(1)),
                 x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.2"), b"\x16\x08Milan-B0"),
                 x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.4"), b"\x04\x40" + self.chip_id)]
        self.vcek = cert("SEV-VCEK", "SEV-Milan", self._vcek_key.public_key(), ask_key, False, [*ident, *tcb_ext])

    def chain_pem(self) -> bytes:
        """ASK then ARK, as AMD's key service serves `cert_chain`."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.ask, self.ark))

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.ark.public_bytes(serialization.Encoding.PEM))
        return path

    def report(self, report_data: bytes, *, vmpl: int = 0) -> bytes:
        """An ATTESTATION_REPORT (version 2) over `report_data`, signed with the VCEK."""
        tcb = _tcb_u64(self.tcb)
        body = bytearray(0x4A0)
        struct.pack_into("<IIQ", body, 0x00, 2, 0, self.policy)
        struct.pack_into("<II", body, 0x30, vmpl, 1)  # VMPL, signature algorithm 1 (ECDSA P-384 SHA-384)
        struct.pack_into("<QQ", body, 0x38, tcb, 0b1)  # current TCB, platform info (SMT enabled)
        body[0x50:0x90] = report_data.ljust(64, b"\0")
        body[0x90:0xC0] = self.measurement
        body[0x160:0x180] = b"\xff" * 32  # REPORT_ID_MA: no migration agent
        struct.pack_into("<Q", body, 0x180, tcb)  # reported TCB
        body[0x1A0:0x1E0] = self.chip_id
        struct.pack_into("<Q", body, 0x1E0, tcb)  # committed TCB
        body[0x1E8:0x1EB] = bytes((10, 55, 1))  # current build, minor, major
        body[0x1EC:0x1EF] = bytes((10, 55, 1))
        struct.pack_into("<Q", body, 0x1F0, tcb)  # launch TCB
        r, s = decode_dss_signature(self._vcek_key.sign(bytes(body[:0x2A0]), ec.ECDSA(hashes.SHA384())))
        body[0x2A0:0x2E8] = r.to_bytes(72, "little")
        body[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(body)

    def certificate_table(self) -> bytes:
        """The extended report's certificate table (what configfs-tsm's auxblob holds, as `snphost import`
        loads it on a host): GUID, offset, length entries and a zero entry, then the VCEK, ASK and ARK."""
        certs = [(uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"), self.vcek),
                 (uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"), self.ask),
                 (uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"), self.ark)]
        ders = [c.public_bytes(serialization.Encoding.DER) for _, c in certs]
        offset = 24 * (len(certs) + 1)
        head = b""
        for (guid, _), der in zip(certs, ders, strict=True):
            head += guid.bytes_le + struct.pack("<II", offset, len(der))
            offset += len(der)
        return head + bytes(24) + b"".join(ders)


class FakeSnpMicrovm(QemuMicrovm):
    """A QEMU microvm that poses as an SEV-SNP guest: the agent's CVM_REPORT frames are answered by
    `firmware` (on the host side of the channel), every other frame goes to and from the real guest."""

    name = "qemu-sev-snp"
    cvm_kind = "sev-snp"

    def __init__(self, firmware: FakeSnpFirmware, accel: str = "auto") -> None:
        super().__init__(accel=accel)
        self.firmware = firmware
        self._tasks: set[asyncio.Task[None]] = set()

    async def launch(self, spec: LaunchSpec) -> VmProcess:
        vm = await super().launch(spec)
        assert vm.channel is not None
        agent_end, ours = socket.socketpair()
        task = asyncio.create_task(self._relay(vm.channel, ours))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        vm.channel = agent_end
        return vm

    async def _relay(self, guest_sock: socket.socket, agent_sock: socket.socket) -> None:
        g_reader, g_writer = await asyncio.open_connection(sock=guest_sock, limit=1 << 20)
        a_reader, a_writer = await asyncio.open_connection(sock=agent_sock, limit=1 << 20)

        async def guest_to_agent() -> None:
            while line := await g_reader.readline():
                a_writer.write(line)
                await a_writer.drain()

        async def agent_to_guest() -> None:
            while line := await a_reader.readline():
                if line.startswith(b"CVM_REPORT "):
                    report = self.firmware.report(bytes.fromhex(line[11:].strip().decode()))
                    a_writer.write(b"CVM_REPORT_OK sev_guest " + base64.b64encode(report) + b" "
                                   + base64.b64encode(self.firmware.certificate_table()) + b"\n")
                    await a_writer.drain()
                    continue
                g_writer.write(line)
                await g_writer.drain()

        try:
            await asyncio.gather(guest_to_agent(), agent_to_guest())
        except (OSError, ValueError):
            pass
        finally:
            for w in (g_writer, a_writer):
                with contextlib.suppress(Exception):
                    w.close()
