"""This host's GPU confidential-computing evidence for a challenge: each GPU's SPDM attestation report, signed by
the GPU over the challenge's nonce, and its device certificate chain (what the attestation verifier checks in
`services/attestation_verifier/gpu_cc.py`).

The agent only relays: it cannot forge a report (the key is in the GPU), so nothing here is trusted by the
verifier, and nothing here judges the evidence.

What comes back, per GPU NVML can identify:
- system CC state "on": `cc_mode="on"`, the report (hex) and the attestation certificate chain (PEM) as NVML
  returns them. A GPU whose report or chain NVML refuses still appears, with an empty report: the verifier then
  fails it (`gpu_report_missing`) instead of never hearing of it.
- CC "off", "devtools" or "unsupported": an entry with that mode and no report. Listing the GPU, rather than
  leaving it out, lets the verifier's policy decide (`require_cc` fails it as `gpu_cc_off` / `gpu_cc_devtools`);
  an empty answer would read the same as a host without GPUs.
- no NVML (no driver), or no GPU: an empty tuple.

NVML calls block (each report is made and signed by the GPU's SPDM responder, behind the driver): callers run
`collect_gpu_evidence` in a worker thread (`asyncio.to_thread`). `nvml` is injectable like `read_inventory`'s:
tests pass a fake module at the hardware boundary (`tests/framework/fake_gpu.py`).
"""

from __future__ import annotations

from typing import Any

from services.node_agent.gpu.nvml import cc_mode, nvml_session, text
from shared.events import GpuEvidence
from shared.telemetry import get_logger

__all__ = ["NONCE_SIZE", "collect_gpu_evidence"]

log = get_logger("qvm.node_agent.gpu.cc_evidence")

NONCE_SIZE = 32  # NVML_CC_GPU_CEC_NONCE_SIZE: the SPDM GET_MEASUREMENTS nonce
_MAX_REPORT = 8192  # GpuEvidence.report holds 16384 hex digits (NVML_CC_GPU_ATTESTATION_REPORT_SIZE)
_MAX_CHAIN = 32768  # GpuEvidence.certificate_chain
_MAX_GPUS = 16  # AttestEvidence.gpus


def collect_gpu_evidence(nonce: bytes, *, nvml: Any = None) -> tuple[GpuEvidence, ...]:
    """Every NVML-visible GPU's evidence for `nonce` (exactly 32 bytes: a caller bug otherwise, ValueError).

    `nvml` is the `pynvml` module (default) or an object with the same functions and `NVMLError`. Init and
    shutdown are balanced; no NVML error escapes (no driver: an empty tuple, logged).
    """
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a GPU attestation nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
    if nvml is None:
        try:
            import pynvml
        except ImportError:  # pragma: no cover - nvidia-ml-py comes with the node-agent extra
            return ()
        nvml = pynvml
    with nvml_session(nvml, "no GPU evidence") as up:
        if not up:
            return ()
        mode = cc_mode(nvml)
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            log.warning("NVML cannot count GPUs; no GPU evidence", extra={"error": str(exc)[:200]})
            return ()
        if count > _MAX_GPUS:
            log.warning("more GPUs than an evidence message holds; the rest are left out",
                        extra={"count": count, "kept": _MAX_GPUS})
        out = []
        for i in range(min(count, _MAX_GPUS)):
            ev = _device(nvml, i, nonce, mode)
            if ev is not None:
                out.append(ev)
        return tuple(out)


def _device(nvml: Any, index: int, nonce: bytes, mode: str) -> GpuEvidence | None:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = text(nvml.nvmlDeviceGetUUID(handle))[:96]
    except nvml.NVMLError as exc:
        log.warning("GPU left out of the evidence: NVML cannot identify it",
                    extra={"index": index, "error": str(exc)[:200]})
        return None
    if mode != "on":
        return GpuEvidence(uuid=uuid, cc_mode=mode)
    try:
        report = nvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
        cert = nvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
    except nvml.NVMLError as exc:
        log.warning("NVML refused this GPU's attestation report or certificate",
                    extra={"index": index, "uuid": uuid, "error": str(exc)[:200]})
        return GpuEvidence(uuid=uuid, cc_mode=mode)
    raw = _sized(report.attestationReport, report.attestationReportSize, _MAX_REPORT)
    chain = _sized(cert.attestationCertChain, cert.attestationCertChainSize, _MAX_CHAIN)
    try:
        pem = chain.rstrip(b"\x00").decode("ascii")
    except UnicodeDecodeError:
        log.warning("GPU attestation certificate chain is not PEM text", extra={"index": index, "uuid": uuid})
        pem = ""
    if not raw or not pem:
        return GpuEvidence(uuid=uuid, cc_mode=mode)
    return GpuEvidence(uuid=uuid, cc_mode=mode, report=raw.hex(), certificate_chain=pem)


def _sized(array: Any, size: Any, limit: int) -> bytes:
    """The first `size` bytes of an NVML ctypes byte array, bounded by the array and by what the event holds
    (a size beyond either is a driver fault: the evidence is then dropped rather than cut)."""
    n = int(size)
    if not 0 < n <= min(len(array), limit):
        return b""
    return bytes(array[:n])
