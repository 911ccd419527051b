"""The node's TPM through tpm2-pytss: endorsement key, attestation key, PCR extends, quotes, activation.

Only the node-agent (and tests) import this module; verifiers and clients never need a TPM stack.
`tcti` is a tss2 TCTI string: `device:/dev/tpmrm0` on hosts (the kernel resource manager), or
`swtpm:host=127.0.0.1,port=P` for swtpm. ESAPI contexts are not thread-safe and every call blocks, so
`TpmDevice` is used from one worker thread (`services.node_agent.attest.tpm_worker`).

Keys:
  EK  the TCG default RSA-2048 endorsement key (template from NV when the manufacturer stored one),
      with its certificate read from NV where present. It identifies the node.
  AK  a restricted ECC P-256 (or RSA-2048) signing key created as an endorsement-hierarchy primary: the
      same key every time from the same TPM (nothing to store on the host), and quotes by keys of that
      hierarchy carry the real resetCount / restartCount (other hierarchies obfuscate them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

os.environ.setdefault("TSS2_LOG", "all+NONE")  # the TSS logs expected misses (absent NV indices) as errors

import contextlib

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_PCR_SELECTION,
    TPMT_HA,
    TPMU_HA,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from shared.errors import ReasonedError

__all__ = ["AK_TEMPLATES", "Quote", "TpmDevice", "TpmError"]

AK_ATTRS = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)
AK_TEMPLATES = {"ecc-p256": "ecc256:ecdsa-sha256:null", "rsa-2048": "rsa2048:rsassa-sha256:null"}


class TpmError(ReasonedError):
    """The TPM refused or failed a command (`reason` tpm_unavailable / tpm_command_failed)."""


@dataclass(frozen=True)
class Quote:
    attest: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    pcrs: dict[int, bytes]  # the quoted sha256 PCR values, read right after the quote


def _selection(pcrs: Iterable[int]) -> TPML_PCR_SELECTION:
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    sel = TPMS_PCR_SELECTION(hash=TPM2_ALG.SHA256, sizeofSelect=3)
    sel.pcrSelect = bytes(bitmap)
    return TPML_PCR_SELECTION([sel])


class TpmDevice:
    def __init__(self, tcti: str, ak_algorithm: str = "ecc-p256") -> None:
        if ak_algorithm not in AK_TEMPLATES:
            raise TpmError("tpm_config", f"AK algorithm {ak_algorithm!r} (one of {', '.join(AK_TEMPLATES)})")
        try:
            self.esapi = ESAPI(tcti)
        except (TSS2_Exception, RuntimeError) as exc:
            raise TpmError("tpm_unavailable", f"{tcti}: {exc}") from None
        self.tcti = tcti
        self.ak_algorithm = ak_algorithm
        self._ek: ESYS_TR | None = None
        self._ak: ESYS_TR | None = None
        self.ek_public = b""
        self.ek_cert: bytes | None = None
        self.ak_public = b""
        self.ak_name = b""
        self.ak_qualified_name = b""

    def close(self) -> None:
        for h in (self._ek, self._ak):
            if h is not None:
                with contextlib.suppress(TSS2_Exception):
                    self.esapi.flush_context(h)
        self._ek = self._ak = None
        self.esapi.close()

    # ------------------------------------------------------------ keys
    def _nv_read(self, index: int) -> bytes:
        try:
            handle = self.esapi.tr_from_tpmpublic(index)
        except TSS2_Exception:
            raise NoSuchIndex(index) from None
        pub, _ = self.esapi.nv_read_public(handle)
        size = pub.nvPublic.dataSize
        out = b""
        while len(out) < size:
            chunk = min(512, size - len(out))
            out += bytes(self.esapi.nv_read(handle, chunk, len(out), auth_handle=ESYS_TR.OWNER))
        return out

    def load_keys(self) -> None:
        """Create (deterministically re-derive) the EK and the AK; read the EK certificate if any."""
        try:
            cert, template = create_ek_template("EK-RSA2048", self._nv_read)
            self._ek, ek_pub, *_ = self.esapi.create_primary(None, template, primary_handle=ESYS_TR.ENDORSEMENT)
            self.ek_public = bytes(ek_pub.marshal())
            self.ek_cert = bytes(cert) if cert else None
            self._ak, ak_pub, *_ = self.esapi.create_primary(
                None, TPM2B_PUBLIC.parse(AK_TEMPLATES[self.ak_algorithm], objectAttributes=AK_ATTRS),
                primary_handle=ESYS_TR.ENDORSEMENT)
            _, name, qualified = self.esapi.read_public(self._ak)
            self.ak_public = bytes(ak_pub.marshal())
            self.ak_name = bytes(name)
            self.ak_qualified_name = bytes(qualified)
        except TSS2_Exception as exc:
            raise TpmError("tpm_command_failed", f"key creation: {exc}") from None

    # ------------------------------------------------------------ enrollment
    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """Recover the verifier's secret; works only on the TPM holding the EK, for the loaded AK."""
        assert self._ek is not None and self._ak is not None
        blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        session = self.esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256)
        try:
            self.esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)  # the default EK's policy
            return bytes(self.esapi.activate_credential(self._ak, self._ek, blob, secret,
                                                        session1=ESYS_TR.PASSWORD, session2=session))
        except TSS2_Exception as exc:
            raise TpmError("activation_failed", f"ActivateCredential: {exc}") from None
        finally:
            with contextlib.suppress(TSS2_Exception):
                self.esapi.flush_context(session)

    # ------------------------------------------------------------ PCRs and quotes
    def extend(self, pcr: int, digest: bytes) -> None:
        values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))])
        try:
            self.esapi.pcr_extend(getattr(ESYS_TR, f"PCR{pcr}"), values)
        except TSS2_Exception as exc:
            raise TpmError("tpm_command_failed", f"PCR_Extend {pcr}: {exc}") from None

    def read_pcrs(self, pcrs: Iterable[int]) -> dict[int, bytes]:
        """sha256 PCR values; PCR_Read answers at most 8 per call, so loop until all are read."""
        wanted = sorted(set(pcrs))
        out: dict[int, bytes] = {}
        try:
            while len(out) < len(wanted):
                rest = [i for i in wanted if i not in out]
                _, sel, digests = self.esapi.pcr_read(_selection(rest))
                got = [i for i in rest if sel.pcrSelections[0].pcrSelect[i // 8] >> (i % 8) & 1] \
                    if sel.count else []
                if not got:
                    raise TpmError("tpm_command_failed", f"PCR_Read returned none of {rest}")
                for i, d in zip(got, digests, strict=False):
                    out[i] = bytes(d)
        except TSS2_Exception as exc:
            raise TpmError("tpm_command_failed", f"PCR_Read: {exc}") from None
        return out

    def quote(self, pcrs: Iterable[int], extra_data: bytes) -> Quote:
        assert self._ak is not None
        wanted = sorted(set(pcrs))
        try:
            quoted, sig = self.esapi.quote(self._ak, _selection(wanted), extra_data)
        except TSS2_Exception as exc:
            raise TpmError("tpm_command_failed", f"Quote: {exc}") from None
        return Quote(bytes(quoted), bytes(sig.marshal()), self.read_pcrs(wanted))
