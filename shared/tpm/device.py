"""The node's TPM through tpm2-pytss: endorsement key, attestation key, PCR extends, quotes, activation.

Only the node-agent (and tests) import this module; verifiers and clients never need a TPM stack.
`tcti` is a tss2 TCTI string: `device:/dev/tpmrm0` on hosts (the kernel resource manager), or
`swtpm:host=127.0.0.1,port=P` for swtpm. ESAPI contexts are not thread-safe and every call blocks, so
`TpmDevice` is used from one worker thread (the `Attester`'s, `services.node_agent.attest.attester`).

Keys:
  EK  the TCG default RSA-2048 endorsement key (template from NV when the manufacturer stored one),
      with its certificate read from NV where present. It identifies the node.
  AK  a restricted ECC P-256 (or RSA-2048) signing key created as an endorsement-hierarchy primary: the
      same key every time from the same TPM (nothing to store on the host), and quotes by keys of that
      hierarchy carry the real resetCount / restartCount (other hierarchies obfuscate them).
  SRK the TCG-template ECC P-256 storage primary of the owner hierarchy, re-derived on every use (nothing
      stored); the parent of sealed data objects (`seal` / `unseal`, the key-broker's KEKs).

Stale handles: EK and AK stay loaded (transient objects) for as long as the agent runs. An agent killed
with SIGKILL never flushes them, and a TPM without a resource manager (swtpm, `device:/dev/tpm0`) keeps them
until it is reset: with the usual three object slots the restarted agent cannot create its keys (issue #14).
`load_keys` (and `activate_credential` for sessions) therefore flush what an earlier process left
(`flush_stale`) when the TPM answers that it is full, then try once more. `/dev/tpmrm0` and tpm2-abrmd flush
per connection, so there the list holds only this device's own handles and nothing else is touched.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

os.environ.setdefault("TSS2_LOG", "all+NONE")  # the TSS logs expected misses (absent NV indices) as errors

import contextlib

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HT,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_SYM_DEF,
    TPMU_HA,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from shared.errors import ReasonedError

__all__ = ["AK_TEMPLATES", "MAX_SEALED_BYTES", "Quote", "TpmDevice", "TpmError", "pcr_policy_digest"]

AK_ATTRS = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)
AK_TEMPLATES = {"ecc-p256": "ecc256:ecdsa-sha256:null", "rsa-2048": "rsa2048:rsassa-sha256:null"}
# TCG TPM v2.0 Provisioning Guidance, storage root key: ECC NIST P-256, AES-128-CFB, SHA-256, these
# attributes, a zero-filled unique field. The same template gives the same key every time on one TPM.
SRK_ATTRS = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
# A sealed data object: only the policy authorizes (no USERWITHAUTH), it never leaves this TPM or parent.
SEALED_ATTRS = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA
MAX_SEALED_BYTES = 128  # MAX_SYM_DATA: the largest TPM2B_SENSITIVE_DATA the reference TPM (and swtpm) takes
_PCR_POLICY_CC = (0x0000017F).to_bytes(4, "big")  # TPM_CC_PolicyPCR
# TPM warnings that mean "no room left": for a transient object, a session, or memory in general.
_NO_ROOM = frozenset({TPM2_RC.OBJECT_MEMORY, TPM2_RC.SESSION_MEMORY, TPM2_RC.MEMORY, TPM2_RC.OBJECT_HANDLES,
                      TPM2_RC.SESSION_HANDLES})


def _no_room(exc: TSS2_Exception) -> bool:
    return not exc.fmt1 and exc.error in _NO_ROOM


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


def pcr_policy_digest(pcr_values: Mapping[int, bytes]) -> bytes:
    """The policyDigest a sha256 policy session holds after one TPM2_PolicyPCR over these sha256 PCR values
    (TPM 2.0 Part 3, 23.7): H(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(values in index order)).
    Pure computation, so a sealed object's authPolicy can be checked or predicted without a TPM."""
    pcrs = sorted(pcr_values)
    selection = bytes(_selection(pcrs).marshal())
    values = hashlib.sha256(b"".join(pcr_values[i] for i in pcrs)).digest()
    return hashlib.sha256(bytes(32) + _PCR_POLICY_CC + selection + values).digest()


def _srk_template() -> TPM2B_PUBLIC:
    template = TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=SRK_ATTRS)
    template.publicArea.unique.ecc.x = bytes(32)
    template.publicArea.unique.ecc.y = bytes(32)
    return template


def _aes128cfb() -> TPMT_SYM_DEF:
    return TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))


def _check_pcrs(pcrs: Iterable[int]) -> list[int]:
    wanted = sorted(set(pcrs))
    if not wanted or any(not 0 <= i <= 23 for i in wanted):
        raise TpmError("tpm_config", f"PCR selection {wanted} (one or more of 0..23)")
    return wanted


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
        self.stale_flushed = 0  # handles an earlier process left in the TPM, flushed to make room

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
        """Create (deterministically re-derive) the EK and the AK; read the EK certificate if any.

        When the TPM has no room for them, what an earlier process left loaded is flushed (`flush_stale`,
        counted in `stale_flushed`) and the keys are created once more."""
        try:
            self._create_keys()
            return
        except TSS2_Exception as exc:
            if not _no_room(exc):
                raise TpmError("tpm_command_failed", f"key creation: {exc}") from None
            first = exc
        self._flush(self._ek, self._ak)  # a half-made pair of ours: made again below
        self._ek = self._ak = None
        try:
            self.stale_flushed += self.flush_stale()
            self._create_keys()
        except TSS2_Exception as exc:
            raise TpmError("tpm_command_failed", f"key creation: {exc} (after {first}, with "
                                                 f"{self.stale_flushed} stale handles flushed)") from None

    def _create_keys(self) -> None:
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

    def _handles(self, kind: TPM2_HT) -> list[int]:
        """The handles of one kind now in the TPM (TPM2_GetCapability(TPM_CAP_HANDLES), paged). Loaded
        sessions are listed with their own handle types (HMAC 0x02..., policy 0x03...)."""
        out: list[int] = []
        start = kind << 24
        while True:
            more, data = self.esapi.get_capability(TPM2_CAP.HANDLES, start, 64)
            got = [int(h) for h in data.data.handles]
            if kind == TPM2_HT.TRANSIENT:
                got = [h for h in got if h >> 24 == kind]
            out += got
            if not more or not got or kind != TPM2_HT.TRANSIENT:  # sessions: a few, in one answer
                return out
            start = got[-1] + 1

    def flush_stale(self) -> int:
        """Flush every transient object and loaded session in the TPM except this device's EK and AK;
        returns how many went.

        For what a process that died without flushing left behind: an agent killed with SIGKILL, on a TPM
        without a resource manager (swtpm, `/dev/tpm0`) that keeps them until it resets. Behind a resource
        manager (`/dev/tpmrm0`, tpm2-abrmd) a connection sees only its own handles, so this flushes nothing
        of anyone else. Without one it flushes everyone's: safe because the node-agent is the only user of
        the TPM on a qvm host (one `TpmDevice`, on one worker thread, in the agent's process; the key-broker's
        TPM-sealed KEKs live on the control plane, and that path (`seal` / `unseal`, one short-lived
        `TpmDevice` per operation) never calls this). Still, callers do it only when the TPM reports it is
        full, so a concurrent user of a shared development swtpm is disturbed only when it could not have
        worked anyway."""
        own = {int(self.esapi.tr_get_tpm_handle(h)) for h in (self._ek, self._ak) if h is not None}
        flushed = 0
        for kind in (TPM2_HT.TRANSIENT, TPM2_HT.LOADED_SESSION):
            for handle in self._handles(kind):
                if handle in own:
                    continue
                try:
                    tr = self.esapi.tr_from_tpmpublic(handle)
                except TSS2_Exception:
                    continue  # gone meanwhile
                try:
                    self.esapi.flush_context(tr)
                    flushed += 1
                except TSS2_Exception:
                    with contextlib.suppress(TSS2_Exception):
                        self.esapi.tr_close(tr)
        return flushed

    # ------------------------------------------------------------ enrollment
    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """Recover the verifier's secret; works only on the TPM holding the EK, for the loaded AK."""
        assert self._ek is not None and self._ak is not None
        blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        session = self._policy_session()
        try:
            self.esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)  # the default EK's policy
            return bytes(self.esapi.activate_credential(self._ak, self._ek, blob, secret,
                                                        session1=ESYS_TR.PASSWORD, session2=session))
        except TSS2_Exception as exc:
            raise TpmError("activation_failed", f"ActivateCredential: {exc}") from None
        finally:
            with contextlib.suppress(TSS2_Exception):
                self.esapi.flush_context(session)

    def _policy_session(self) -> ESYS_TR:
        """An unsalted sha256 policy session; when the TPM has no session slot left, stale sessions (and
        objects) of an earlier process are flushed and it is started once more."""
        def start() -> ESYS_TR:
            return self.esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256)
        try:
            return start()
        except TSS2_Exception as exc:
            if not _no_room(exc):
                raise TpmError("activation_failed", f"StartAuthSession: {exc}") from None
        try:
            self.stale_flushed += self.flush_stale()
            return start()
        except TSS2_Exception as exc:
            raise TpmError("activation_failed", f"StartAuthSession: {exc}") from None

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

    # ------------------------------------------------------------ sealing
    def _srk(self) -> ESYS_TR:
        try:
            handle, *_ = self.esapi.create_primary(None, _srk_template(), primary_handle=ESYS_TR.OWNER)
        except TSS2_Exception as exc:
            raise TpmError("tpm_command_failed", f"CreatePrimary (SRK): {exc}") from None
        return handle

    def _flush(self, *handles: ESYS_TR | None) -> None:
        for h in handles:
            if h is not None:
                with contextlib.suppress(TSS2_Exception):
                    self.esapi.flush_context(h)

    def seal(self, data: bytes | bytearray, pcrs: Iterable[int],
             pcr_values: Mapping[int, bytes] | None = None) -> tuple[bytes, bytes]:
        """Seal `data` (at most 128 bytes) under the SRK, unsealable only while the sha256 `pcrs` hold
        `pcr_values` (default: their values now). Returns the object's marshalled (TPM2B_PUBLIC,
        TPM2B_PRIVATE): the private part is encrypted by the SRK, so both can be stored anywhere and are
        usable only on this TPM.

        The policy digest is computed here from the values (`pcr_policy_digest`), not by a trial session,
        so the caller knows exactly which values the object is bound to. `data` reaches the TPM encrypted
        (a session salted to the SRK with parameter encryption): on a bus or a TCP TCTI it never shows.
        """
        wanted = _check_pcrs(pcrs)
        if not 0 < len(data) <= MAX_SEALED_BYTES:
            raise TpmError("tpm_config", f"sealed data is {len(data)} bytes (1..{MAX_SEALED_BYTES})")
        values = dict(pcr_values) if pcr_values is not None else self.read_pcrs(wanted)
        if sorted(values) != wanted or any(len(v) != 32 for v in values.values()):
            raise TpmError("tpm_config", f"PCR values must give 32-byte sha256 digests for exactly {wanted}")
        template = TPM2B_PUBLIC.parse("keyedhash", objectAttributes=SEALED_ATTRS,
                                      authPolicy=pcr_policy_digest(values))
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(bytes(data))))
        srk = session = None
        try:
            srk = self._srk()
            session = self.esapi.start_auth_session(srk, ESYS_TR.NONE, TPM2_SE.HMAC, _aes128cfb(), TPM2_ALG.SHA256)
            self.esapi.trsess_set_attributes(session, TPMA_SESSION.DECRYPT | TPMA_SESSION.CONTINUESESSION)
            private, public, *_ = self.esapi.create(srk, sensitive, template, session1=session)
            return bytes(public.marshal()), bytes(private.marshal())
        except TSS2_Exception as exc:
            raise TpmError("tpm_command_failed", f"Create (sealed object): {exc}") from None
        finally:
            _wipe(sensitive.sensitive.data)
            self._flush(session, srk)

    def unseal(self, public: bytes, private: bytes, pcrs: Iterable[int]) -> bytearray:
        """Load a sealed object made by `seal` on this TPM and return its data in a new bytearray (the caller
        zeroizes it). Authorization is a policy session running TPM2_PolicyPCR over `pcrs` with their
        current values: reason `tpm_policy_mismatch` when they differ from the sealed ones, `tpm_blob_invalid`
        when the blob is malformed, not this TPM's, or not a policy-only sealed object. The response comes
        back encrypted (the policy session is salted to the SRK), so the data never crosses the TCTI in clear.
        """
        wanted = _check_pcrs(pcrs)
        try:
            pub, used = TPM2B_PUBLIC.unmarshal(public)
            priv, used_priv = TPM2B_PRIVATE.unmarshal(private)
        except Exception as exc:  # the TSS unmarshaller raises its own and plain exceptions alike
            raise TpmError("tpm_blob_invalid", f"sealed object does not parse: {type(exc).__name__}") from None
        area = pub.publicArea
        if (used != len(public) or used_priv != len(private) or area.type != TPM2_ALG.KEYEDHASH
                or area.objectAttributes & TPMA_OBJECT.USERWITHAUTH or area.authPolicy.size != 32):
            raise TpmError("tpm_blob_invalid", "not a policy-only sealed data object")
        srk = handle = session = None
        try:
            srk = self._srk()
            try:
                handle = self.esapi.load(srk, priv, pub)
            except TSS2_Exception as exc:
                raise TpmError("tpm_blob_invalid", f"Load: {exc} (sealed by another TPM, or altered)") from None
            for attempt in range(2):
                session = self.esapi.start_auth_session(srk, ESYS_TR.NONE, TPM2_SE.POLICY, _aes128cfb(),
                                                        TPM2_ALG.SHA256)
                self.esapi.trsess_set_attributes(session, TPMA_SESSION.ENCRYPT | TPMA_SESSION.CONTINUESESSION)
                self.esapi.policy_pcr(session, None, _selection(wanted))
                try:
                    out = self.esapi.unseal(handle, session1=session)
                except TSS2_Exception as exc:
                    if exc.error == TPM2_RC.PCR_CHANGED and attempt == 0:
                        self._flush(session)  # extended between PolicyPCR and Unseal: judge the new values
                        session = None
                        continue
                    if exc.error in (TPM2_RC.POLICY_FAIL, TPM2_RC.PCR_CHANGED):
                        raise TpmError("tpm_policy_mismatch", f"PCRs {wanted} no longer hold the values the "
                                       "object was sealed to") from None
                    raise
                try:
                    return bytearray(out.buffer)
                finally:
                    _wipe(out)
            raise TpmError("tpm_policy_mismatch", f"PCRs {wanted} kept changing")  # pragma: no cover
        except TSS2_Exception as exc:
            raise TpmError("tpm_command_failed", f"Unseal: {exc}") from None
        finally:
            self._flush(session, handle, srk)


def _wipe(value: TPM2B_SENSITIVE_DATA) -> None:
    """Best effort: overwrite a TSS-owned buffer that held sealed data (the TSS frees it without clearing)."""
    with contextlib.suppress(Exception):
        view = value.buffer
        view[:] = bytes(len(view))
