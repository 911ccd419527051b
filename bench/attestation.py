"""5. Attestation: quote verifications per second (one and two processes), challenge-to-verified latency."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import Figure, say, section
from bench.stack import BenchStack, bench_stack, service_process
from services.node_agent.service import NodeAgent, attester_for
from shared.events import AttestationResult, AttestPurpose, AttestRequested
from shared.identity import Identity, Role
from shared.models import Inventory
from shared.pki import Pki
from shared.tpm.device import TpmDevice
from shared.tpm.digests import code_digest
from shared.tpm.measurements import AgentMeasurement, InstanceMeasurement, entry_digest
from shared.tpm.policy import AttestationPolicy, ImageReference, appraise
from shared.tpm.quote import binding, verify_quote
from shared.tpm.swtpm import Swtpm, SwtpmState

__all__ = ["run"]

VERIFY_TARGET = 5000.0
P50_TARGET_MS = 10.0
QUOTES = 64
SECONDS = 3.0
ROUND_TRIPS = 200

_AGENT = AgentMeasurement(node_id="bench", agent_version="b", agent_sha256="11" * 32, config_sha256="22" * 32)
_INSTANCE = InstanceMeasurement(instance_id="i-1", job_id="j-1", image_manifest_sha256="33" * 32,
                                kernel_sha256="44" * 32, initrd_sha256="55" * 32, rootfs_sha256="66" * 32,
                                cmdline="console=hvc0", vmm="qemu-microvm", vmm_sha256="77" * 32,
                                security_policy_sha256="88" * 32, public_key="99" * 32)
_POLICY = AttestationPolicy(
    agents=("11" * 32,), images={"33" * 32: ImageReference(name="b", kernel_sha256="44" * 32,
                                                           initrd_sha256="55" * 32, rootfs_sha256="66" * 32)},
    vmms={"77" * 32: "qemu-microvm"}, security_policies=("88" * 32,), require_ek_certificate=False)
Sample = tuple[bytes, bytes, bytes, dict[int, bytes], bytes, list[dict[str, Any]]]


def _quotes(tcti: str) -> list[Sample]:
    dev = TpmDevice(tcti)
    try:
        dev.load_keys()
        for e in (_AGENT, _INSTANCE):
            dev.extend(15, entry_digest(e))
        log = [_AGENT.model_dump(mode="json"), _INSTANCE.model_dump(mode="json")]
        out = []
        for _ in range(QUOTES):
            extra = binding(os.urandom(32), bytes.fromhex(_INSTANCE.public_key))
            q = dev.quote([15], extra)
            out.append((dev.ak_public, q.attest, q.signature, q.pcrs, extra, log))
        return out
    finally:
        dev.close()


def _verify_for(samples: list[Sample], seconds: float) -> int:
    """Full appraisal per quote: signature, structure, binding, PCR digest, log replay, policy."""
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for ak, attest, sig, pcrs, extra, log in samples:
            parsed = verify_quote(ak, attest, sig, extra_data=extra, pcr_values=pcrs, required_pcrs=(15,))
            appraise(_POLICY, parsed, pcrs, log)
            n += 1
    return n


async def run(tmp: Path) -> list[Figure]:
    section(
        "5. Attestation (swtpm, ECC P-256 AK)",
        f"{QUOTES} real quotes from swtpm (PCR 15, a 2-entry measurement log); one appraisal = verify_quote "
        "(signature, TPMS_ATTEST, extraData binding, PCR selection and digest) + appraise (log replay, allow-lists), "
        f"as the verifier runs it; looped for {SECONDS:g} s in this process, then in 2 processes at once "
        f"(multiprocessing, fork); latency: {ROUND_TRIPS} node re-attestations, node-agent in this process "
        "(swtpm on loopback), `python -m services.attestation_verifier` in its own process: attest.requested "
        "published -> challenge -> quote -> evidence -> verified result back at the agent",
    )
    state = SwtpmState(tmp / "tpm").manufacture()
    with Swtpm(state) as tpm:
        samples = await asyncio.to_thread(_quotes, tpm.tcti)
    one = await asyncio.to_thread(_verify_for, samples, SECONDS) / SECONDS
    with multiprocessing.get_context("fork").Pool(2) as pool:
        two = sum(pool.starmap(_verify_for, [(samples, SECONDS)] * 2)) / SECONDS
    figs = [
        Figure("quote appraisals/s, one process (ECC P-256)", one, "/s", VERIFY_TARGET, higher_is_better=True),
        Figure("quote appraisals/s, two processes", two, "/s", note=f"x{two / one:.2f} of one"),
    ]
    for f in figs:
        say(f.line())
    figs += await _latency(tmp / "latency", state)
    return figs


async def _latency(tmp: Path, state: SwtpmState) -> list[Figure]:
    pki = Pki(tmp / "pki")
    pki.init(nodes=["bench-node"])
    policy = _POLICY.model_copy(update={"agents": (code_digest(),), "ek_ca": state.ek_ca,
                                        "require_ek_certificate": True})
    (tmp / "policy.json").write_text(policy.model_dump_json())
    with Swtpm(state) as tpm:
        async with bench_stack(pki, tmp / "nats") as stack, _verifier(stack, tmp / "policy.json"):
            settings = stack.settings.model_copy(update={
                "tpm": tpm.tcti, "attest_policy": tmp / "policy.json", "attest_interval_s": 3600.0,
                "measurement_log": tmp / "measurements.jsonl"})
            bus = await _node_bus(stack)
            agent = NodeAgent(bus, settings, inventory=Inventory(hostname="b", cpu_model="b", cpu_cores=1, ram_mib=1),
                              read_gpus=lambda: (), attester=attester_for(bus, settings))
            arrived: asyncio.Queue[float] = asyncio.Queue()
            handler = agent.on_attestation

            async def timed(event: Any) -> None:
                await handler(event)
                if isinstance(event.payload, AttestationResult):
                    arrived.put_nowait(time.perf_counter())

            agent.on_attestation = timed  # type: ignore[method-assign]
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            try:
                await asyncio.wait_for(arrived.get(), 60)  # enrollment
                assert agent.attester is not None
                lat = []
                for _ in range(ROUND_TRIPS):
                    t0 = time.perf_counter()
                    await bus.publish(AttestRequested(purpose=AttestPurpose.NODE, key=agent.attester.node_key.hex()),
                                      node_id="bench-node")
                    lat.append((await asyncio.wait_for(arrived.get(), 30) - t0) * 1000)
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)
    lat.sort()
    p50, p99 = statistics.median(lat), lat[int(len(lat) * 0.99) - 1]
    figs = [Figure("challenge -> verified latency p50 (swtpm, loopback)", p50, "ms", P50_TARGET_MS),
            Figure("challenge -> verified latency p99", p99, "ms", note=f"max {lat[-1]:.1f} ms")]
    for f in figs:
        say(f.line())
    return figs


async def _node_bus(stack: BenchStack) -> Any:
    from shared.bus import Bus

    b = await Bus.connect(stack.server.url, stack.pki, Identity(Role.NODE_AGENT, "bench-node"))
    stack.buses.append(b)
    return b


def _verifier(stack: BenchStack, policy: Path) -> contextlib.AbstractAsyncContextManager[Path]:
    return service_process(stack, "services.attestation_verifier", b"verifier ready", "verifier",
                           {"QVM_ATTEST_POLICY": str(policy)})
