"""The attestation verifier: enroll TPMs, challenge them, appraise their quotes, withdraw trust.

consume  attest.enroll_requested / attest.requested / attest.evidence through one work-queue consumer
         shared by every replica (any replica takes any message; all state is in KV, see `state`);
         node.revoked (the operator withdrew a node)
decide   enrollment: AK attributes, node key, EK certificate, one EK per node, then MakeCredential;
         evidence: single-use challenge, quote (shared.tpm.quote), policy and log (shared.tpm.policy),
         boot counters against enrollment, the instance's key in the log; for a confidential instance
         also its SEV-SNP report or TDX quote (shared.cvm: vendor chain, policy, REPORT_DATA binding)
act      challenges and node records written by compare-and-set
emit     attest.challenge; attest.verified / attest.failed (node), instance.attested /
         instance.attestation_failed (job subject), attest.revoked on a failed node quote, on the
         operator's withdrawal and, from the deadline sweep, for nodes whose last result expired

Every event id derives from the message that caused it, so a redelivery or a second replica publishes
nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from services.attestation_verifier.gpu_cc import verify_gpu_evidence
from services.attestation_verifier.settings import VerifierSettings
from services.attestation_verifier.state import Challenge, Kv, NodeAttestation, Stale
from shared.buckets import ATTEST_CHALLENGES, ATTEST_EKS, ATTEST_NODES
from shared.bus import Bus
from shared.codec import Event
from shared.consumers import consumer_spec
from shared.cvm.errors import CvmError, expected_report_data
from shared.cvm.evidence import CVM_VMMS, CvmVerdict, verify_cvm
from shared.events import (
    AttestationFailed,
    AttestationResult,
    AttestChallenge,
    AttestEvidence,
    AttestPurpose,
    AttestRequested,
    EnrollRequested,
    InstanceAttestationFailed,
    InstanceAttested,
    NodeCleared,
    NodeRevoked,
    NodeTampered,
    NodeWithdrawn,
)
from shared.identity import Identity, Role
from shared.ids import derive_event_id
from shared.models import Frozen, TrustState
from shared.pki import signing_key_digest
from shared.runtime import run_together
from shared.telemetry import get_logger
from shared.tpm.credential import make_credential
from shared.tpm.ek import check_ek_certificate, load_ek_cas
from shared.tpm.policy import Appraisal, AttestationPolicy, Counters, appraise, check_counters, load_policy
from shared.tpm.quote import QuoteError, binding, check_ak, load_ak, verify_quote
from shared.tpm.structures import Attest, PublicArea, TpmFormatError, parse_public

__all__ = ["CvmRefused", "Verifier"]

log = get_logger("qvm.attestation_verifier")


class _EkOwner(Frozen):
    node_id: str


@dataclass(frozen=True)
class _Enrollment:
    """An enrollment request that passed its checks, with the keys it presented (parsed once)."""

    ek_sha256: str
    ek: PublicArea
    ak: PublicArea


# Failures that say nothing about the node's integrity (a slow or restarted agent): no revocation.
_BENIGN = frozenset({"nonce_expired", "nonce_unknown", "not_enrolled"})


class CvmRefused(QuoteError):
    """A confidential instance's hardware report failed while the host's TPM quote verified. The instance
    never runs and gets no key; the node keeps its TPM trust for other jobs (an old firmware TCB, an image
    the policy does not list, stale collateral or a wrong certificate table the host loaded are not proof
    that the host's measured software is bad). The refusal, with its reason, is on the bus for the operator,
    who can revoke the node."""


class Verifier:
    def __init__(self, bus: Bus, settings: VerifierSettings, policy: AttestationPolicy, challenges: Kv, nodes: Kv,
                 eks: Kv) -> None:
        self.bus = bus
        self.settings = settings
        self.policy = policy
        self.challenges = challenges
        self.nodes = nodes
        self.eks = eks
        self.ek_cas = load_ek_cas(policy.ek_ca)
        self.verified = 0
        self.failed = 0

    @classmethod
    async def create(cls, bus: Bus, settings: VerifierSettings) -> Verifier:
        policy = await asyncio.to_thread(load_policy, settings.attest_policy_path)
        kvs = [await bus.kv(b) for b in (ATTEST_CHALLENGES, ATTEST_NODES, ATTEST_EKS)]
        return cls(bus, settings, policy, *kvs)

    async def run(self, stop: asyncio.Event) -> None:
        log.info("verifier ready", extra={"pcrs": list(self.policy.pcrs), "agents": len(self.policy.agents),
                                          "images": len(self.policy.images)})
        await run_together(
            self.bus.consume(consumer_spec(Role.ATTESTATION_VERIFIER, "work"), self.on_message, stop,
                             max_inflight=self.settings.max_inflight),
            self.bus.consume(consumer_spec(Role.ATTESTATION_VERIFIER, "withdrawals"), self.on_withdrawn, stop),
            self._deadline_sweeper(stop),
        )

    # ================================================================ consume
    async def on_message(self, event: Event) -> None:
        node_id = event.node_id or ""
        match event.payload:
            case EnrollRequested() as req:
                await self.on_enroll(node_id, req, event)
            case AttestRequested() as req:
                await self.on_request(node_id, req, event)
            case AttestEvidence() as ev:
                await self.on_evidence(node_id, ev, event)

    async def on_withdrawn(self, event: Event) -> None:
        """The operator withdrew the node (its bus identity is gone already), or the node's runtime guard saw a
        host process reach into an instance: withdraw its trust, which the janitor and the key-broker act on;
        after tampering the node may not enroll again until the operator clears it. Redelivery publishes the
        same revocation (same event id)."""
        node_id = event.node_id or ""
        match event.payload:
            case NodeWithdrawn() as withdrawn:
                await self.revoke(node_id, withdrawn.reason, withdrawn.detail or "withdrawn by the operator",
                                  derive_event_id(event.id, "NodeRevoked"))
            case NodeTampered() as tampered:
                await self.revoke(node_id, "host_tampering",
                                  f"runtime guard: {tampered.rule} by {tampered.comm or '?'} (pid {tampered.pid}) on "
                                  f"instance {tampered.instance_id}: {tampered.detail}",
                                  derive_event_id(event.id, "NodeRevoked"), hold=True)
            case NodeCleared() as cleared:
                await self._set_hold(node_id, False)
                log.warning("node cleared by the operator", extra={"node_id": node_id, "reason": cleared.reason})

    # ================================================================ enrollment
    async def on_enroll(self, node_id: str, req: EnrollRequested, event: Event) -> None:
        challenge_id = _challenge_id(event)
        try:
            held, _, _ = await self.nodes.get(node_id, NodeAttestation)
            if isinstance(held, NodeAttestation) and held.held_until_cleared:
                raise QuoteError("held_until_cleared", f"node {node_id} was revoked for {held.revoked_reason}; an "
                                                       "operator must clear it (qvm node clear) before it enrolls")
            record = await asyncio.to_thread(self._check_enrollment, node_id, req)
            bound = await self.eks.create(record.ek_sha256, _EkOwner(node_id=node_id)) or \
                await self._ek_owner(record.ek_sha256) == node_id
            if not bound:
                raise QuoteError("ek_reused", f"this EK is enrolled for another node than {node_id}")
        except QuoteError as exc:
            await self._fail(node_id, AttestPurpose.ENROLL, challenge_id, None, None, exc, event)
            return
        stored, _, _ = await self.challenges.get(challenge_id, Challenge)
        if not isinstance(stored, Challenge):  # first delivery: make the credential and keep the challenge
            secret = os.urandom(32)
            blob, encrypted = await asyncio.to_thread(make_credential, record.ek, record.ak.name, secret)
            stored = Challenge(
                challenge_id=challenge_id, node_id=node_id, purpose=AttestPurpose.ENROLL,
                expected_extra=binding(secret, record.ak.name).hex(), expires_ns=self._expiry(), pcrs=self.policy.pcrs,
                ak_public=req.ak_public, ak_qualified_name=req.ak_qualified_name, ek_sha256=record.ek_sha256,
                node_key=req.node_key, credential_blob=blob.hex(), encrypted_secret=encrypted.hex())
            if not await self.challenges.create(challenge_id, stored):
                stored, _, _ = await self.challenges.get(challenge_id, Challenge)
                assert isinstance(stored, Challenge)
        await self._send_challenge(stored, event)
        log.info("enrollment challenged", extra={"node_id": node_id, "ek": record.ek_sha256[:16]})

    def _check_enrollment(self, node_id: str, req: EnrollRequested) -> _Enrollment:
        try:
            ak = parse_public(bytes.fromhex(req.ak_public))
            ek = parse_public(bytes.fromhex(req.ek_public))
        except TpmFormatError as exc:
            raise QuoteError(exc.reason, exc.detail) from None
        check_ak(ak, self.policy.ak_algorithms)
        signing = self.bus.codec.trust.key_for(str(Identity(Role.NODE_AGENT, node_id)))
        if signing is None or signing_key_digest(signing).hex() != req.node_key:
            raise QuoteError("node_key_mismatch", "the enrollment is not bound to this node's signing key")
        if req.ek_certificate:
            if not self.ek_cas:
                if self.policy.require_ek_certificate:
                    raise QuoteError("ek_certificate_invalid", "no EK CA configured to check the certificate")
            else:
                check_ek_certificate(bytes.fromhex(req.ek_certificate), ek, self.ek_cas)
        elif self.policy.require_ek_certificate:
            raise QuoteError("ek_certificate_missing", "the TPM presented no EK certificate")
        return _Enrollment(hashlib.sha256(ek.raw).hexdigest(), ek, ak)

    async def _ek_owner(self, ek_sha256: str) -> str:
        owner, _, _ = await self.eks.get(ek_sha256, _EkOwner)
        return owner.node_id if isinstance(owner, _EkOwner) else ""

    # ================================================================ challenges
    async def on_request(self, node_id: str, req: AttestRequested, event: Event) -> None:
        challenge_id = _challenge_id(event)
        record, _, _ = await self.nodes.get(node_id, NodeAttestation)
        if not isinstance(record, NodeAttestation) or record.revoked:
            why = "not enrolled" if record is None else f"revoked ({getattr(record, 'revoked_reason', '')})"
            await self._fail(node_id, req.purpose, challenge_id, req.instance_id, req.job_id,
                             QuoteError("not_enrolled", f"node {node_id} is {why}: enroll first"), event)
            return
        if req.purpose is AttestPurpose.NODE and req.key != record.node_key:
            await self._fail(node_id, req.purpose, challenge_id, None, None,
                             QuoteError("node_key_mismatch", "node quotes bind the node's signing key"), event)
            return
        if req.purpose is AttestPurpose.INSTANCE and not (req.instance_id and req.job_id):
            await self._fail(node_id, req.purpose, challenge_id, req.instance_id, req.job_id,
                             QuoteError("evidence_invalid", "instance requests name the instance and job"), event)
            return
        stored, _, _ = await self.challenges.get(challenge_id, Challenge)
        if not isinstance(stored, Challenge):
            nonce = os.urandom(32)
            stored = Challenge(
                challenge_id=challenge_id, node_id=node_id, purpose=req.purpose, instance_id=req.instance_id,
                job_id=req.job_id, key=req.key, nonce=nonce.hex(),
                expected_extra=binding(nonce, bytes.fromhex(req.key)).hex(), expires_ns=self._expiry(),
                pcrs=self.policy.pcrs)
            if not await self.challenges.create(challenge_id, stored):
                stored, _, _ = await self.challenges.get(challenge_id, Challenge)
                assert isinstance(stored, Challenge)
        await self._send_challenge(stored, event)

    async def _send_challenge(self, c: Challenge, cause: Event) -> None:
        await self.bus.publish(
            AttestChallenge(challenge_id=c.challenge_id, purpose=c.purpose, instance_id=c.instance_id,
                            job_id=c.job_id, nonce=c.nonce, pcrs=c.pcrs, expires_ns=c.expires_ns,
                            credential_blob=c.credential_blob, encrypted_secret=c.encrypted_secret),
            node_id=c.node_id, caused_by=cause)

    def _expiry(self) -> int:
        return time.time_ns() + int(self.policy.nonce_ttl_s * 1e9)

    # ================================================================ evidence
    async def on_evidence(self, node_id: str, ev: AttestEvidence, event: Event) -> None:
        try:
            challenge = await self._use_challenge(node_id, ev, event)
            if challenge.purpose is AttestPurpose.ENROLL:
                enrolled = None
                ak_public, qualified = challenge.ak_public, challenge.ak_qualified_name
            else:
                enrolled, revision = await self._node_record(node_id)
                ak_public, qualified = enrolled.ak_public, enrolled.ak_qualified_name
            attest, appraisal, cvm, gpus = await asyncio.to_thread(self._appraise, ev, challenge, ak_public,
                                                                   qualified)
            counters = check_counters(self.policy, _counters(enrolled), attest) if enrolled is not None else \
                check_counters(self.policy, Counters(attest.clock.reset_count, attest.clock.restart_count, 0), attest)
        except QuoteError as exc:
            purpose = ev.purpose
            await self._fail(node_id, purpose, ev.challenge_id, ev.instance_id, ev.job_id, exc, event)
            return
        now = time.time_ns()
        # act: the node record (enrollment creates it; every verified quote moves its clock forward)
        if enrolled is None:
            record = NodeAttestation(
                node_id=node_id, ek_sha256=challenge.ek_sha256, ak_public=challenge.ak_public,
                ak_qualified_name=challenge.ak_qualified_name, node_key=challenge.node_key,
                reset_count=counters.reset_count, restart_count=counters.restart_count, clock=counters.clock,
                enrolled_ns=now, last_verified_ns=now, last_result_id=event.id)
            await self._put_node(node_id, record)
        else:
            # The clock stays the enrollment's: quotes verified concurrently by several replicas may finish
            # out of order, so "not before enrollment" is the monotonic check that holds for all of them.
            await self._put_node(node_id, enrolled.model_copy(update={
                "last_verified_ns": now, "last_result_id": event.id}), revision)
            record = enrolled
        instance = appraisal.instances.get(challenge.instance_id or "") if challenge.instance_id else None
        fields = dict(
            purpose=challenge.purpose, challenge_id=challenge.challenge_id, evidence_id=event.id,
            instance_id=challenge.instance_id, job_id=challenge.job_id, trust=TrustState.TRUSTED,
            ak_name=load_ak(bytes.fromhex(record.ak_public))[0].name.hex(), ek_sha256=record.ek_sha256,
            agent_sha256=appraisal.agent.agent_sha256 if appraisal.agent else "",
            image_manifest_sha256=instance.image_manifest_sha256 if instance else "",
            vmm_sha256=instance.vmm_sha256 if instance else "", public_key=instance.public_key if instance else "",
            pcr_sha256=appraisal.pcr.hex(), reset_count=attest.clock.reset_count,
            restart_count=attest.clock.restart_count, firmware_version=f"{attest.firmware_version:016x}",
            gpus=gpus,
            cvm=cvm.kind if cvm else None, cvm_measurement=cvm.measurement if cvm else "",
            cvm_tcb=cvm.tcb if cvm else "", verified_ns=now, expires_ns=now + int(self.policy.result_ttl_s * 1e9))
        self.verified += 1
        if challenge.purpose is AttestPurpose.INSTANCE:
            await self.bus.publish(InstanceAttested(**fields), job_id=challenge.job_id, node_id=node_id,
                                   caused_by=event)
        else:
            await self.bus.publish(AttestationResult(**fields), node_id=node_id, caused_by=event)
        log.info("attestation verified", extra={"node_id": node_id, "purpose": challenge.purpose.value,
                                                "instance_id": challenge.instance_id})

    async def _use_challenge(self, node_id: str, ev: AttestEvidence, event: Event) -> Challenge:
        """Single use across replicas: mark the challenge answered by this evidence (compare-and-set).
        The same evidence delivered again passes; any other evidence for it is a replay."""
        for _ in range(3):
            c, revision, deleted = await self.challenges.get(ev.challenge_id, Challenge)
            if not isinstance(c, Challenge) or c.node_id != node_id:
                raise QuoteError("nonce_replayed" if deleted else "nonce_unknown",
                                 "no open challenge with this id for this node")
            if c.answered_by and c.answered_by != event.id:
                raise QuoteError("nonce_replayed", "this challenge was already answered")
            if (c.purpose, c.instance_id, c.job_id) != (ev.purpose, ev.instance_id, ev.job_id):
                raise QuoteError("evidence_invalid", "the evidence answers another purpose or instance")
            if c.answered_by == event.id:
                return c
            if time.time_ns() > c.expires_ns:
                raise QuoteError("nonce_expired", "the challenge expired before it was answered")
            try:
                await self.challenges.update(ev.challenge_id, c.model_copy(update={"answered_by": event.id}), revision)
                return c
            except Stale:
                continue
        raise QuoteError("nonce_replayed", "the challenge is being answered concurrently")

    def _appraise(self, ev: AttestEvidence, c: Challenge, ak_public: str, qualified: str
                  ) -> tuple[Attest, Appraisal, CvmVerdict | None, tuple[str, ...]]:
        """Blocking (signature checks, hashing): runs in a worker thread."""
        try:
            pcrs = {int(i): bytes.fromhex(v) for i, v in ev.pcrs.items()}
            attest = verify_quote(
                bytes.fromhex(ak_public), bytes.fromhex(ev.attest), bytes.fromhex(ev.signature),
                extra_data=bytes.fromhex(c.expected_extra), pcr_values=pcrs, required_pcrs=self.policy.pcrs,
                qualified_signer=bytes.fromhex(qualified) if qualified else None,
                allowed_algorithms=self.policy.ak_algorithms)
        except ValueError as exc:
            raise QuoteError("evidence_invalid", str(exc)[:200]) from None
        appraisal = appraise(self.policy, attest, pcrs, ev.log)
        if c.purpose is AttestPurpose.INSTANCE:
            m = appraisal.instances.get(c.instance_id or "")
            if m is None or m.public_key != c.key or m.job_id != c.job_id:
                raise QuoteError("instance_not_measured", "the log has no launch of this instance with this key")
            if self.policy.require_guard and not appraisal.instance_guards.get(m.instance_id):
                raise QuoteError("guard_missing", "the instance was launched while no runtime guard was loaded")
            return attest, appraisal, self._appraise_cvm(ev, c, m.vmm), self._gpu_outcomes(ev, c)
        return attest, appraisal, None, self._gpu_outcomes(ev, c)

    def _gpu_outcomes(self, ev: AttestEvidence, c: Challenge) -> tuple[str, ...]:
        """Each GPU's CC evidence checked against this challenge's nonce (report signature, device chain to
        NVIDIA's root, RIM measurements): `uuid:status` in the signed result, for the operator and the audit.
        Blocking: a worker thread."""
        nonce = bytes.fromhex(c.nonce)
        out = []
        for gpu in ev.gpus:
            verdict = verify_gpu_evidence(gpu, nonce, at=datetime.now(UTC), rims=None, policy=self.settings.gpu_cc)
            out.append(f"{verdict.uuid}:{verdict.status}"[:128])
        return tuple(out)

    def _appraise_cvm(self, ev: AttestEvidence, c: Challenge, vmm: str) -> CvmVerdict | None:
        """The measured launch says whether the instance is a confidential VM (its VMM); then its report must
        be there, of that kind, bound to this challenge and the instance's key, and pass the CVM policy."""
        required = CVM_VMMS.get(vmm)
        if ev.cvm is None:
            if required is not None:
                raise CvmRefused("cvm_evidence_missing", f"{vmm} launched a confidential guest, but the evidence "
                                                         f"carries no {required} report")
            return None
        if required is not ev.cvm.kind:
            raise CvmRefused("cvm_kind_mismatch", f"a {ev.cvm.kind} report for an instance {vmm} launched")
        try:
            return verify_cvm(ev.cvm, report_data=expected_report_data(bytes.fromhex(c.nonce), bytes.fromhex(c.key)),
                              policy=self.policy.cvm, at=datetime.now(UTC))
        except CvmError as exc:
            raise CvmRefused(exc.reason, exc.detail) from None

    async def _node_record(self, node_id: str) -> tuple[NodeAttestation, int]:
        record, revision, _ = await self.nodes.get(node_id, NodeAttestation)
        if not isinstance(record, NodeAttestation) or record.revoked:
            raise QuoteError("not_enrolled", f"node {node_id} is not enrolled (or was revoked)")
        return record, revision

    async def _put_node(self, node_id: str, record: NodeAttestation, revision: int | None = None) -> None:
        if revision is None:
            _, revision, _ = await self.nodes.get(node_id, NodeAttestation)
        with contextlib.suppress(Stale):  # a concurrent result for the same node: the newer one stands
            await self.nodes.update(node_id, record, revision)

    # ================================================================ failures and revocation
    async def _fail(self, node_id: str, purpose: AttestPurpose, challenge_id: str, instance_id: str | None,
                    job_id: str | None, exc: QuoteError, cause: Event) -> None:
        self.failed += 1
        log.warning("attestation failed", extra={"node_id": node_id, "purpose": purpose.value, "reason": exc.reason,
                                                 "detail": exc.detail[:300]})
        fields = dict(purpose=purpose, challenge_id=challenge_id if len(challenge_id) == 32 else "",
                      instance_id=instance_id, job_id=job_id, reason=exc.reason[:64], detail=exc.detail[:1024])
        if purpose is AttestPurpose.INSTANCE and job_id:
            await self.bus.publish(InstanceAttestationFailed(**fields), job_id=job_id, node_id=node_id,
                                   caused_by=cause)
        else:
            await self.bus.publish(AttestationFailed(**fields), node_id=node_id, caused_by=cause)
        if purpose is not AttestPurpose.ENROLL and exc.reason not in _BENIGN and not isinstance(exc, CvmRefused):
            await self.revoke(node_id, "attestation_failed", f"{purpose.value} quote: {exc.reason}",
                              derive_event_id(cause.id, "NodeRevoked"))

    async def revoke(self, node_id: str, reason: str, detail: str, event_id: str, hold: bool = False) -> None:
        """`hold`: the node may not enroll again until the operator's node.cleared."""
        def change(r: NodeAttestation) -> NodeAttestation | None:
            if r.revoked and (not hold or r.held_until_cleared):
                return None
            return r.model_copy(update={"revoked": True, "revoked_reason": r.revoked_reason if r.revoked else reason,
                                        "held_until_cleared": hold or r.held_until_cleared})
        record = await self._change_node(node_id, change)
        last = record.last_verified_ns if record is not None else 0
        await self.bus.publish(NodeRevoked(reason=reason, detail=detail[:1024], last_verified_ns=last),
                               node_id=node_id, event_id=event_id)
        log.warning("node revoked", extra={"node_id": node_id, "reason": reason})

    async def _set_hold(self, node_id: str, hold: bool) -> None:
        await self._change_node(node_id, lambda r: None if r.held_until_cleared == hold else
                                r.model_copy(update={"held_until_cleared": hold}))

    async def _change_node(self, node_id: str, change: Callable[[NodeAttestation], NodeAttestation | None]
                           ) -> NodeAttestation | None:
        """Apply `change` to the node's record by compare-and-set, re-reading after a concurrent write (a few
        times); `change` returns None when there is nothing to write. Returns the record as last read."""
        record: NodeAttestation | None = None
        for _ in range(5):
            got, revision, _ = await self.nodes.get(node_id, NodeAttestation)
            record = got if isinstance(got, NodeAttestation) else None
            updated = change(record) if record is not None else None
            if updated is None:
                break
            try:
                await self.nodes.update(node_id, updated, revision)
                break
            except Stale:
                continue
        return record

    async def sweep_deadlines(self, now_ns: int | None = None) -> list[str]:
        """Revoke nodes whose last verified quote is older than the result lifetime."""
        now_ns = now_ns or time.time_ns()
        limit = int(self.policy.result_ttl_s * 1e9)
        revoked = []
        for node_id in await self.nodes.keys():
            record, _, _ = await self.nodes.get(node_id, NodeAttestation)
            if isinstance(record, NodeAttestation) and not record.revoked and now_ns - record.last_verified_ns > limit:
                await self.revoke(node_id, "attestation_deadline_missed",
                                  f"no verified quote for {(now_ns - record.last_verified_ns) / 1e9:.0f}s",
                                  derive_event_id(record.last_result_id or node_id, "NodeRevoked", "deadline"))
                revoked.append(node_id)
        return revoked

    async def _deadline_sweeper(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.sweep_interval_s * (0.5 + random.random()))
            if stop.is_set():
                return
            try:
                await self.sweep_deadlines()
            except Exception as exc:  # a failed sweep is retried at the next interval
                log.warning("deadline sweep failed", extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"})


# ---------------------------------------------------------------- small helpers


def _challenge_id(cause: Event) -> str:
    """Derived from the request, so a redelivered request re-sends the same challenge."""
    return hashlib.sha256(b"qvm-challenge\0" + cause.id.encode()).hexdigest()[:32]


def _counters(record: NodeAttestation) -> Counters:
    return Counters(record.reset_count, record.restart_count, record.clock)
