"""The node's attester: measured launch into one PCR, and quotes that answer verifier challenges.

The TPM is used from a single worker thread (ESAPI contexts are neither thread-safe nor async). The
measurement log is an append-only JSON-lines file; an entry is written (and fsynced) before its digest
is extended, and quotes are taken under the same lock as extends, so the log handed out with a quote is
exactly the one the quoted PCR reflects.

At start the log is reconciled with the PCR:
  PCR == replay(log)            the agent restarted: keep appending
  PCR == replay(log minus last) it crashed between writing and extending: drop the last entry
  PCR == 0                      the host (TPM) rebooted: start a new log
  otherwise                     the log was lost or edited: the node cannot attest until the host reboots
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from shared.errors import ReasonedError
from shared.events import AttestChallenge, AttestEvidence, AttestPurpose, EnrollRequested
from shared.telemetry import get_logger
from shared.tpm.device import TpmDevice, TpmError
from shared.tpm.measurements import (
    AgentMeasurement,
    Entry,
    LogError,
    entry_digest,
    parse_log,
    replay,
)
from shared.tpm.quote import binding

__all__ = ["AttestError", "Attester"]

log = get_logger("qvm.node_agent.attest")
T = TypeVar("T")


class AttestError(ReasonedError):
    """The node cannot produce evidence (`reason`: tpm_unavailable, measurement_log_lost, ...)."""


class Attester:
    def __init__(self, tcti: str, log_path: Path, pcr: int, node_key: bytes, ak_algorithm: str = "ecc-p256") -> None:
        self.tcti = tcti
        self.log_path = log_path
        self.pcr = pcr
        self.node_key = node_key  # SHA-256 of the node's signing key: what node-level quotes bind
        self.ak_algorithm = ak_algorithm
        self.entries: list[Entry] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpm")
        self._lock = asyncio.Lock()
        self._tpm: TpmDevice | None = None

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    # ------------------------------------------------------------ start / stop
    async def start(self, agent: AgentMeasurement) -> None:
        """Open the TPM, load the keys, reconcile the log and measure the agent. Safe to call again after
        an `AttestError`: a failed start leaves no TPM context open, and the attester is usable (`measure`,
        `answer`) only once a start has fully succeeded."""
        await self._close_tpm()  # an earlier, successful start: begin again
        tpm: TpmDevice | None = None
        try:
            tpm = await self._call(TpmDevice, self.tcti, self.ak_algorithm)
            await self._call(tpm.load_keys)
            if tpm.stale_flushed:
                log.warning("flushed handles an earlier process left in the TPM (a killed agent; this TPM has "
                            "no resource manager)", extra={"handles": tpm.stale_flushed})
            current = (await self._call(tpm.read_pcrs, [self.pcr]))[self.pcr]
            entries = await asyncio.to_thread(self._reconcile, current)
            async with self._lock:
                self.entries = entries
                await self._extend(tpm, agent)
        except (TpmError, AttestError) as exc:
            if tpm is not None:
                await self._close(tpm)
            raise AttestError(exc.reason, exc.detail) from None
        except BaseException:
            if tpm is not None:
                await self._close(tpm)
            raise
        self._tpm = tpm

    async def _close(self, tpm: TpmDevice) -> None:
        with contextlib.suppress(Exception):
            await self._call(tpm.close)

    async def _close_tpm(self) -> None:
        if self._tpm is not None:
            tpm, self._tpm = self._tpm, None
            await self._close(tpm)

    def _reconcile(self, pcr: bytes) -> list[Entry]:
        entries: list[Entry] = []
        if self.log_path.exists():
            try:
                entries = parse_log([json.loads(line) for line in self.log_path.read_text().splitlines() if line])
            except (ValueError, LogError) as exc:
                raise AttestError("measurement_log_lost", f"{self.log_path} is unreadable: {str(exc)[:200]}") from None
        if replay(entries) == pcr:
            return entries
        if entries and replay(entries[:-1]) == pcr:
            log.warning("dropping a measurement that was logged but never extended")
            self._rewrite(entries[:-1])
            return entries[:-1]
        if pcr == b"\x00" * 32:
            if entries:
                log.info("TPM was reset (host reboot): starting a new measurement log")
            self._rewrite([])
            return []
        raise AttestError("measurement_log_lost", f"PCR {self.pcr} does not match {self.log_path}; the node cannot "
                                                  "attest until the host reboots")

    def _rewrite(self, entries: list[Entry]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e.model_dump(mode="json"), sort_keys=True) + "\n" for e in entries))
        os.replace(tmp, self.log_path)

    async def close(self) -> None:
        await self._close_tpm()
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------ measured launch
    async def measure(self, entry: Entry) -> None:
        """Log, then extend: a crash in between is repaired at the next start."""
        tpm = self._tpm
        if tpm is None:  # not started (yet): the agent keeps retrying; an instance cannot be measured
            raise AttestError("tpm_unavailable", "the node's TPM is not open yet (the attester has not started)")
        async with self._lock:
            await self._extend(tpm, entry)

    async def _extend(self, tpm: TpmDevice, entry: Entry) -> None:
        """Under the lock."""
        await asyncio.to_thread(self._append, entry)
        try:
            await self._call(tpm.extend, self.pcr, entry_digest(entry))
        except TpmError as exc:
            raise AttestError(exc.reason, exc.detail) from None
        self.entries.append(entry)

    def _append(self, entry: Entry) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry.model_dump(mode="json"), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------ enrollment and evidence
    def enroll_request(self) -> EnrollRequested:
        assert self._tpm is not None
        t = self._tpm
        return EnrollRequested(ek_public=t.ek_public.hex(), ek_certificate=(t.ek_cert or b"").hex(),
                               ak_public=t.ak_public.hex(), ak_qualified_name=t.ak_qualified_name.hex(),
                               node_key=self.node_key.hex())

    async def answer(self, challenge: AttestChallenge, key: bytes | None = None) -> AttestEvidence:
        """Quote for a challenge. Enrollment: activate the credential first, and bind the quote to the
        recovered secret and the AK's name. Otherwise bind the nonce to `key` (instance) or the node key."""
        assert self._tpm is not None
        try:
            if challenge.purpose is AttestPurpose.ENROLL:
                secret = await self._call(self._tpm.activate_credential, bytes.fromhex(challenge.credential_blob),
                                          bytes.fromhex(challenge.encrypted_secret))
                extra = binding(secret, self._tpm.ak_name)
            else:
                extra = binding(bytes.fromhex(challenge.nonce), key if key is not None else self.node_key)
            async with self._lock:
                quote = await self._call(self._tpm.quote, challenge.pcrs, extra)
                entries = list(self.entries)
        except TpmError as exc:
            raise AttestError(exc.reason, exc.detail) from None
        return AttestEvidence(
            challenge_id=challenge.challenge_id, purpose=challenge.purpose, instance_id=challenge.instance_id,
            job_id=challenge.job_id, attest=quote.attest.hex(), signature=quote.signature.hex(),
            pcrs={i: v.hex() for i, v in quote.pcrs.items()},
            log=tuple(e.model_dump(mode="json") for e in entries))

