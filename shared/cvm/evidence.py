"""One face for a confidential VM's evidence, whatever the vendor: the policy the verifier (and a client)
holds, and `verify_cvm`, which checks a `CvmEvidence` from the bus against it and says what it proved.

The hardware report is bound to one challenge and one instance the same way a TPM quote is: REPORT_DATA is
`expected_report_data(nonce, instance key)`. Roots of trust are the vendors' certificates shipped with qvm
(`roots/`) plus, only when an operator writes them into the policy, `extra_roots`; nothing in the evidence
(an SNP certificate table, a TDX quote's PCK chain) ever adds a root.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import Field

from shared.cvm.errors import CvmError
from shared.cvm.snp import SnpPolicy, parse_report, verify_snp
from shared.cvm.tdx import TdxPolicy, verify_tdx
from shared.cvm.tdx_collateral import load_collateral_dir
from shared.events import CvmEvidence, CvmKind
from shared.models import Frozen

__all__ = ["CVM_VMMS", "CvmPolicy", "CvmVerdict", "snp_certificates", "verify_cvm"]

CVM_VMMS: dict[str, CvmKind] = {"qemu-sev-snp": CvmKind.SEV_SNP, "qemu-tdx": CvmKind.TDX}
"""VMM names (as the measured launch records them) that start confidential guests: an instance launched by
one of them must answer with a hardware report of that kind, or its attestation fails."""

_VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")  # GHCB spec: the certificate table's VCEK
_VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
_ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
_ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_TABLE_GUIDS = frozenset({_VCEK_GUID, _VLEK_GUID, _ASK_GUID, _ARK_GUID})


class CvmPolicy(Frozen):
    """The confidential-VM part of the attestation policy."""

    snp: SnpPolicy = SnpPolicy()
    tdx: TdxPolicy = TdxPolicy()
    vcek_dir: Path | None = Field(None, description="VCEKs (DER) fetched from AMD's key service, named "
                                                    "<chip id hex>-<reported TCB hex>.der: used when a report "
                                                    "comes without its certificate table (offline).")
    snp_crl: Path | None = Field(None, description="AMD's CRL for the product (KDS /vcek/v1/{product}/crl).")
    tdx_collateral: Path | None = Field(None, description="A directory with Intel PCS collateral: tcb_info.json, "
                                                          "qe_identity.json, tcb_signing_chain.pem, rootcrl.der, "
                                                          "pckcrl.der (cached, offline).")
    extra_roots: tuple[Path, ...] = Field((), description="PEM roots trusted besides AMD's and Intel's pinned "
                                                          "ones. Only for hardware fakes in tests; leave empty.")


@dataclass(frozen=True)
class CvmVerdict:
    """What a verified report proved: its kind, launch measurement (SNP MEASUREMENT / TDX MRTD), TCB."""

    kind: CvmKind
    measurement: str
    tcb: str
    fields: dict[str, str]


def snp_certificates(table: bytes) -> tuple[bytes, bytes | None]:
    """The VCEK (or VLEK) and, when present, the ASK+ARK chain (PEM) from an extended report's certificate
    table (GHCB spec: GUID, offset, length entries up to a zero entry), or (`table`, None) when it is one DER
    certificate. The table is untrusted: bounds-checked, and its ARK only names which chain to check against
    the pinned roots (it is never trusted for being there)."""
    if table[:1] == b"\x30":  # a DER SEQUENCE: a bare certificate
        return table, None
    found: dict[uuid.UUID, bytes] = {}
    for at in range(0, min(len(table), 64 * 24), 24):
        entry = table[at:at + 24]
        if len(entry) < 24 or entry == bytes(24):
            break
        guid = uuid.UUID(bytes_le=entry[:16])
        offset, length = struct.unpack("<II", entry[16:])
        if guid in _TABLE_GUIDS:
            if offset + length > len(table) or length == 0:
                raise CvmError("certificate_malformed", "the certificate table points outside itself")
            found[guid] = table[offset:offset + length]
    leaf = found.get(_VCEK_GUID) or found.get(_VLEK_GUID) or b""
    chain = [found[g] for g in (_ASK_GUID, _ARK_GUID) if g in found]
    if len(chain) != 2:
        return leaf, None
    try:
        pem = b"".join(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM) for der in chain)
    except ValueError:
        raise CvmError("certificate_malformed", "the certificate table's ASK or ARK is not a certificate") from None
    return leaf, pem


@lru_cache(maxsize=16)
def _roots(paths: tuple[Path, ...]) -> tuple[x509.Certificate, ...]:
    return tuple(c for p in paths for c in x509.load_pem_x509_certificates(p.read_bytes()))


def _read(path: Path | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CvmError("collateral_unavailable", f"{name} {path}: {exc.strerror or exc}") from None


def _vcek_from_dir(directory: Path | None, report: bytes) -> bytes:
    if directory is None:
        return b""
    parsed = parse_report(report)
    path = directory / f"{parsed.chip_id.hex()}-{parsed.reported_tcb.raw:016x}.der"
    return path.read_bytes() if path.is_file() else b""


def _verify_snp(ev: CvmEvidence, report_data: bytes, policy: CvmPolicy, at: datetime,
                roots: Sequence[x509.Certificate]) -> CvmVerdict:
    report = bytes.fromhex(ev.report)
    vcek, chain = snp_certificates(bytes.fromhex(ev.certificates))
    vcek = vcek or _vcek_from_dir(policy.vcek_dir, report)
    if not vcek:
        raise CvmError("vcek_missing", "the report came without a VCEK and none is cached for this chip and TCB")
    verified = verify_snp(report, vcek, chain, at=at, policy=policy.snp, report_data=report_data,
                              crl=_read(policy.snp_crl, "CRL"), extra_roots=roots)
    fields = verified.summary()
    return CvmVerdict(CvmKind.SEV_SNP, verified.report.measurement.hex(), f"{fields['product']} "
                      f"{fields['reported_tcb']}"[:128], fields)


def _verify_tdx(ev: CvmEvidence, report_data: bytes, policy: CvmPolicy, at: datetime,
                roots: Sequence[x509.Certificate]) -> CvmVerdict:
    collateral = load_collateral_dir(policy.tdx_collateral) if policy.tdx_collateral else None
    verified = verify_tdx(bytes.fromhex(ev.report), at=at, collateral=collateral, policy=policy.tdx,
                              report_data=report_data, extra_roots=roots)
    fields = verified.summary()
    return CvmVerdict(CvmKind.TDX, fields["mrtd"], fields.get("tcb_status", "")[:128], fields)


def verify_cvm(ev: CvmEvidence, *, report_data: bytes, policy: CvmPolicy, at: datetime,
               extra_roots: Sequence[x509.Certificate] = ()) -> CvmVerdict:
    """Check a confidential VM's report: vendor signature and chain to a pinned root, the policy, and
    REPORT_DATA. Raises `CvmError` with the first failing check's reason. Blocking (signatures): run it in
    a worker thread."""
    roots = (*_roots(policy.extra_roots), *extra_roots)
    try:
        if ev.kind is CvmKind.SEV_SNP:
            return _verify_snp(ev, report_data, policy, at, roots)
        return _verify_tdx(ev, report_data, policy, at, roots)
    except (ValueError, OSError) as exc:  # a hex field or an unreadable cache entry: the evidence is unusable
        raise CvmError("cvm_evidence_invalid", f"{type(exc).__name__}: {str(exc)[:200]}") from None
