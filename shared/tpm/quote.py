"""Quote verification: the checks on one TPM2_Quote, in the order that keeps hostile input cheap.

    1. signature, with pinned algorithms, by the enrolled AK (before anything else is parsed)
    2. TPMS_ATTEST magic and type (a restricted AK makes the magic unforgeable)
    3. qualified signer (when the caller knows the AK's Qualified Name)
    4. extraData == the expected binding (SHA-256(nonce || key) for qvm; the raw nonce for tpm2-tools)
    5. PCR selection: only allowed banks, no bank twice, covers every PCR the policy needs
    6. pcrDigest recomputed from the presented PCR values

The verifier service, `qvm attest check-quote` and the tests all call `verify_quote`, so a client
checks evidence with exactly the code the platform uses.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from shared.errors import ReasonedError
from shared.tpm.structures import (
    HASH_NAMES,
    HASH_SIZES,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    Alg,
    Attest,
    ObjectAttr,
    PublicArea,
    TpmFormatError,
    parse_attest,
    parse_public,
    parse_signature,
)

__all__ = [
    "AK_REQUIRED",
    "ALLOWED_AK_ALGORITHMS",
    "QuoteError",
    "binding",
    "check_ak",
    "load_ak",
    "pcr_digest",
    "verify_quote",
]

AK_REQUIRED = (ObjectAttr.RESTRICTED | ObjectAttr.SIGN_ENCRYPT | ObjectAttr.FIXEDTPM | ObjectAttr.FIXEDPARENT
               | ObjectAttr.SENSITIVEDATAORIGIN)
ALLOWED_AK_ALGORITHMS = frozenset({"ecc-p256", "ecc-p384", "rsa-2048", "rsa-3072"})
_HASHES: dict[int, type[hashes.HashAlgorithm]] = {Alg.SHA256: hashes.SHA256, Alg.SHA384: hashes.SHA384}


class QuoteError(ReasonedError):
    """A quote, AK or piece of evidence that must not be trusted; `reason` is a stable code."""


def binding(nonce: bytes, key: bytes) -> bytes:
    """The extraData a qvm quote carries: one challenge, one instance (or node) key."""
    return hashlib.sha256(nonce + key).digest()


def check_ak(ak: PublicArea, allowed: Iterable[str] = ALLOWED_AK_ALGORITHMS) -> None:
    """An AK must be a restricted signing key that never leaves its TPM, of a pinned algorithm."""
    if not ak.has(AK_REQUIRED) or ak.has(ObjectAttr.DECRYPT):
        raise QuoteError("ak_not_restricted", f"AK attributes 0x{ak.attributes:08x} lack restricted|sign|fixedTPM|"
                                              "fixedParent|sensitiveDataOrigin or allow decryption")
    if ak.algorithm not in set(allowed):
        raise QuoteError("ak_algorithm_not_allowed", f"AK is {ak.algorithm}")
    if ak.scheme not in (Alg.NULL, Alg.ECDSA, Alg.RSASSA, Alg.RSAPSS) or (
            ak.scheme != Alg.NULL and ak.scheme_hash not in _HASHES):
        raise QuoteError("ak_algorithm_not_allowed", f"AK signing scheme 0x{ak.scheme:04x}/0x{ak.scheme_hash:04x}")


@lru_cache(maxsize=4096)
def load_ak(public: bytes) -> tuple[PublicArea, ec.EllipticCurvePublicKey | rsa.RSAPublicKey]:
    """Parse and load an AK once (a verifier sees the same few thousand AKs again and again)."""
    area = parse_public(public)
    return area, area.key()


def pcr_digest(hash_alg: int, values: Iterable[bytes]) -> bytes:
    return hashlib.new(HASH_NAMES[Alg(hash_alg)], b"".join(values)).digest()


def _verify_signature(ak: PublicArea, key: object, attest: bytes, sig_bytes: bytes, hash_alg: int) -> None:
    try:
        sig = parse_signature(sig_bytes)
    except TpmFormatError as exc:
        raise QuoteError(exc.reason, exc.detail) from None
    if sig.hash_alg != hash_alg or hash_alg not in _HASHES:
        raise QuoteError("signature_algorithm_not_allowed", f"signature hash 0x{sig.hash_alg:04x}")
    if ak.scheme != Alg.NULL and (sig.sig_alg != ak.scheme or sig.hash_alg != ak.scheme_hash):
        raise QuoteError("signature_algorithm_not_allowed", "signature scheme differs from the AK's own")
    h = _HASHES[hash_alg]()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if sig.sig_alg != Alg.ECDSA:
                raise QuoteError("signature_algorithm_not_allowed", f"0x{sig.sig_alg:04x} with an ECC AK")
            key.verify(encode_dss_signature(sig.r, sig.s), attest, ec.ECDSA(h))
        elif isinstance(key, rsa.RSAPublicKey):
            if sig.sig_alg == Alg.RSASSA:
                key.verify(sig.rsa, attest, padding.PKCS1v15(), h)
            elif sig.sig_alg == Alg.RSAPSS:
                key.verify(sig.rsa, attest, padding.PSS(padding.MGF1(h), padding.PSS.AUTO), h)
            else:
                raise QuoteError("signature_algorithm_not_allowed", f"0x{sig.sig_alg:04x} with an RSA AK")
        else:  # pragma: no cover - parse_public only yields the two
            raise QuoteError("ak_algorithm_not_allowed", type(key).__name__)
    except InvalidSignature:
        raise QuoteError("signature_invalid", "the quote's signature does not verify with the AK") from None


def verify_quote(
    ak_public: bytes,
    attest: bytes,
    signature: bytes,
    *,
    extra_data: bytes,
    pcr_values: Mapping[int, bytes],
    required_pcrs: Iterable[int] = (),
    hash_alg: int = Alg.SHA256,
    qualified_signer: bytes | None = None,
    allowed_algorithms: Iterable[str] = ALLOWED_AK_ALGORITHMS,
) -> Attest:
    """Check one quote (see the module docstring for the order); returns the parsed attest on success.

    `pcr_values` are the PCRs of bank `hash_alg` the quote claims to cover, by index; `required_pcrs`
    are those the policy needs in the selection. Raises `QuoteError` with the first failing check.
    """
    try:
        ak, key = load_ak(bytes(ak_public))
    except TpmFormatError as exc:
        raise QuoteError(exc.reason, exc.detail) from None
    check_ak(ak, allowed_algorithms)
    _verify_signature(ak, key, attest, signature, hash_alg)
    try:
        parsed = parse_attest(attest)
    except TpmFormatError as exc:  # signed by a TPM but not a structure we can read
        raise QuoteError(exc.reason, exc.detail) from None
    if parsed.magic != TPM_GENERATED_VALUE or parsed.type != TPM_ST_ATTEST_QUOTE:
        raise QuoteError("not_a_quote", f"magic 0x{parsed.magic:08x}, type 0x{parsed.type:04x}")
    if qualified_signer is not None and not hmac.compare_digest(parsed.qualified_signer, qualified_signer):
        raise QuoteError("qualified_signer_mismatch", "the quote was not made by the enrolled AK")
    if not hmac.compare_digest(parsed.extra_data, extra_data):
        raise QuoteError("nonce_mismatch", "extraData is not bound to this challenge and key")
    banks = [s.hash_alg for s in parsed.selections]
    if len(set(banks)) != len(banks):
        raise QuoteError("pcr_selection_duplicate", f"banks selected more than once: {banks}")
    if any(b != hash_alg for b in banks):
        raise QuoteError("pcr_bank_not_allowed", f"banks {[hex(b) for b in banks]}; only 0x{hash_alg:04x}")
    selected = parsed.selections[0].pcrs if parsed.selections else ()
    missing = sorted(set(required_pcrs) - set(selected))
    if missing:
        raise QuoteError("pcr_selection_incomplete", f"PCRs {missing} are not in the quote")
    size = HASH_SIZES[Alg(hash_alg)]
    values = []
    for i in selected:
        v = pcr_values.get(i)
        if v is None or len(v) != size:
            raise QuoteError("pcr_values_missing", f"no {size}-byte value for quoted PCR {i}")
        values.append(v)
    if not hmac.compare_digest(pcr_digest(hash_alg, values), parsed.pcr_digest):
        raise QuoteError("pcr_digest_mismatch", "the PCR values do not hash to the quoted pcrDigest")
    return parsed
