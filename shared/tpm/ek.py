"""EK certificates: the TPM manufacturer's word that an EK lives in a genuine TPM.

The chain is walked by issuer name through the configured CA bundle (EK certificates carry no names a
TLS path validator would accept), checking each signature and validity period, up to a self-signed
root that is in the bundle; the leaf's public key must be the EK that was presented.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared.tpm.quote import QuoteError
from shared.tpm.structures import PublicArea

__all__ = ["check_ek_certificate", "load_ek_cas"]


def load_ek_cas(path: Path | None) -> list[x509.Certificate]:
    if path is None:
        return []
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise QuoteError("ek_ca_unusable", f"{path}: {exc}") from None


def _same_key(cert: x509.Certificate, ek: PublicArea) -> bool:
    key = cert.public_key()
    ek_key = ek.key()
    if isinstance(key, rsa.RSAPublicKey) and isinstance(ek_key, rsa.RSAPublicKey):
        return key.public_numbers() == ek_key.public_numbers()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(ek_key, ec.EllipticCurvePublicKey):
        return key.public_numbers() == ek_key.public_numbers()
    return False


def check_ek_certificate(der: bytes, ek: PublicArea, cas: list[x509.Certificate],
                         now: dt.datetime | None = None) -> str:
    """Returns the issuer chain as text; raises `QuoteError(ek_certificate_invalid)`."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise QuoteError("ek_certificate_invalid", f"not a DER certificate: {exc}") from None
    if not _same_key(cert, ek):
        raise QuoteError("ek_certificate_invalid", "the certificate is for another key than the EK presented")
    chain = [cert.subject.rfc4514_string()]
    current = cert
    for _ in range(6):
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise QuoteError("ek_certificate_invalid", f"{current.subject.rfc4514_string()} is not valid now")
        issuers = [c for c in cas if c.subject == current.issuer]
        for issuer in issuers:
            try:
                current.verify_directly_issued_by(issuer)
            except (InvalidSignature, ValueError, TypeError):  # not this issuer (or not its key type)
                continue
            break
        else:
            raise QuoteError("ek_certificate_invalid", f"no trusted issuer for {current.subject.rfc4514_string()}")
        chain.append(issuer.subject.rfc4514_string())
        if issuer.subject == issuer.issuer:
            return " <- ".join(chain)
        current = issuer
    raise QuoteError("ek_certificate_invalid", "certificate chain too long")
