"""A confidential job end to end, every part real: nats-server, swtpm, the verifier, the key-broker, the
scheduler, the janitor, and a node-agent booting a QEMU microvm whose guest formats and opens its LUKS2
volume itself. The client checks the evidence with its own copy of the verifier's code before it releases
its secret. Then nothing secret may be found anywhere outside the guest: not in any stream, any log line
or the agent's work directory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest

from services.attestation_verifier.service import Verifier
from services.janitor.service import Janitor
from services.key_broker.service import KeyBroker, dek_aad
from services.key_broker.store import BUCKET, JobKeys, job_key
from services.node_agent.vmm.qemu_microvm import QemuMicrovm
from services.scheduler.service import Scheduler
from shared.client.output import new_output_key, open_output_events, with_output_key
from shared.client.sdk import ConfidentialClient
from shared.codec import Event
from shared.crypto.kek import PassphraseFileSource, WrappedKey, create_kek_file
from shared.events import (
    STREAMS,
    EventType,
    InstanceDestroyed,
    JobSubmitted,
    KeyReleased,
    KeysDestroyed,
    SecretsReleased,
    TeardownRecord,
)
from shared.kv import Kv
from shared.lifecycle import JobState
from shared.models import HardwareProfile, TrustState
from shared.replay import read_stream
from shared.tpm.policy_gen import local_policy
from shared.tpm.swtpm import Swtpm
from tests.framework.flow import attested_agent, eventually, job_book, running
from tests.framework.images import IMAGE, build_test_image
from tests.framework.stack import Stack

pytestmark = pytest.mark.nats

SECRET = b"client secret: s3cr3t-token-7f1c9a\n"
MARKER = "volume-marker-5d2e7a1b"  # the workload writes it upper-cased: the plaintext is never on the bus
WRITTEN = MARKER.upper()
JOB = "conf-job"
OUTPUT_KEY = new_output_key()  # the client's, in memory only: the job's output is sealed to it


def _workload() -> tuple[str, ...]:
    return ("sh", "-c",
            f"echo {MARKER} | tr a-z A-Z > /data/results.txt && cp /data/results.txt /copy-on-scratch.txt && sync && "
            "echo mounted $(grep -c ' /data ' /proc/mounts) $(grep ' /run/secrets ' /proc/mounts | cut -d' ' -f3) && "
            "echo digest $(cat /data/results.txt /run/secrets/api-token | sha256sum | cut -c1-64) && "
            "sleep 3")


def _settings(stack: Stack, tmp_path: Path, swtpm: Swtpm) -> Any:
    images = tmp_path / "images"
    policy = local_policy(images, ek_ca=swtpm.state.ek_ca)
    path = tmp_path / "policy.json"
    path.write_text(policy.model_dump_json())
    return stack.settings.model_copy(update={
        "tpm": swtpm.tcti, "attest_policy": path, "measurement_log": tmp_path / "measurements.jsonl",
        "images_dir": images, "instances_dir": tmp_path / "instances", "min_trust": TrustState.TRUSTED,
        "attest_interval_s": 3600.0, "sweep_interval_s": 0.3, "attest_timeout_s": 60.0,
        "key_release_timeout_s": 60.0, "client_secrets_timeout_s": 120.0})


async def _all_messages(admin: Any) -> list[tuple[str, bytes]]:
    """Every message of every qvm stream and every KV bucket, raw."""
    out: list[tuple[str, bytes]] = []
    streams = [s.name for s in STREAMS.values()] + [f"KV_{b}" for b in (BUCKET, "qvm_nodes", "qvm_jobs",
                                                                        "qvm_attest_challenges", "qvm_attest_nodes")]
    for name in streams:
        async for batch in read_stream(admin.js, name, ">"):
            out += [(m.subject, m.data) for m in batch]
    return out


def _forms(secret: bytes) -> list[bytes]:
    """A secret as it could leak: raw, hex (both cases), base64."""
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret),
            base64.b64encode(secret).rstrip(b"=")]


async def test_confidential_job_keys_and_secrets_reach_only_the_attested_guest(
        stack: Stack, swtpm: Swtpm, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bundle = build_test_image(tmp_path / "images")
    image_digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    settings = _settings(stack, tmp_path, swtpm)
    create_kek_file(tmp_path / "kek.json", bytearray(b"test passphrase"))
    ring = PassphraseFileSource(tmp_path / "kek.json", bytearray(b"test passphrase")).load()
    kb_bus = await stack.bus("key-broker")
    broker = KeyBroker(kb_bus, settings, ring, Kv(await kb_bus.js.key_value(BUCKET)))
    admin, market = await stack.bus("admin"), await stack.bus("marketplace")
    agent = await attested_agent(stack, settings, vmm=QemuMicrovm(accel=settings.vm_accel), cores=2)
    services = (agent, await Verifier.create(await stack.bus("attestation-verifier"), settings),
                await Scheduler.create(await stack.bus("scheduler"), settings),
                Janitor(await stack.bus("janitor"), settings), broker)
    client = ConfidentialClient(market, settings.measurement_pcr)
    dek = b""
    workdir_files: dict[str, bytes] = {}
    async with running(*services):
        await client.submit(with_output_key(JobSubmitted(
            owner="alice", image=IMAGE, command=_workload(), max_runtime_s=300,
            profile=HardwareProfile(cpu_cores=1, ram_mib=256), volume_mib=32, client_secrets=True), OUTPUT_KEY), JOB)
        verified = await client.verify(JOB, expected_images=[image_digest], timeout_s=240)
        assert verified.claims.image_manifest_sha256 == image_digest and verified.node_id == "node-a"
        assert verified.launch.job_id == JOB and verified.public_key.hex() == verified.launch.public_key

        # The key-broker released the volume key to this instance; the test (holding the KEK) reads it back
        # from the store, to look for it everywhere afterwards.
        async def released() -> bool:
            rec, _, _ = await broker.kv.get(job_key(JOB), JobKeys)
            return isinstance(rec, JobKeys) and rec.holder == verified.instance_id
        await eventually(released, timeout=60, what="the key release")
        rec, _, _ = await broker.kv.get(job_key(JOB), JobKeys)
        assert isinstance(rec, JobKeys)
        dek = bytes(ring.unwrap(WrappedKey.from_bytes(bytes.fromhex(rec.wrapped)), dek_aad(JOB)))

        await client.release_secrets(verified, {"api-token": SECRET})

        async def printed_digest() -> bool:
            return b"digest" in _output(await _job_events(admin), complete=False)
        await eventually(printed_digest, timeout=120, what="the workload's digest")
        instances = tmp_path / "instances"
        for path in instances.rglob("*"):  # the workload sleeps: its work directory is still there
            if path.is_file() and not path.is_socket():
                with contextlib.suppress(OSError):  # a file removed meanwhile
                    workdir_files[str(path.relative_to(instances))] = path.read_bytes()

        async def done() -> bool:
            view = (await job_book(admin)).get(JOB)
            return view is not None and view.terminal
        await eventually(done, timeout=120, what="the job to end")
        await eventually(lambda: _has(admin, EventType.KEYS_DESTROYED), timeout=30, what="the key destruction")
        await eventually(lambda: _has(admin, EventType.TEARDOWN_RECORD), timeout=30, what="the teardown record")

    view = (await job_book(admin)).get(JOB)
    events = await _job_events(admin)
    assert view is not None and view.state is JobState.DONE and view.exit_code == 0, (view, _failures(events))
    out = _output(events).decode()  # opened by the client: all of it, verified against instance.exited
    want = hashlib.sha256(f"{WRITTEN}\n".encode() + SECRET).hexdigest()
    assert f"digest {want}" in out and "mounted 1 tmpfs" in out, out
    assert (await client.open_output(JOB, OUTPUT_KEY)).data.decode() == out

    # Order: verdict, then key, then the client's secrets, then the workload.
    at = {str(e.spec.type): e.envelope.time_ns for e in events}
    assert at["instance.attested"] <= at["key.released"] <= at["key.secrets_released"] <= at["instance.running"]
    released = next(e.payload for e in events if isinstance(e.payload, KeyReleased))
    assert released.instance_id == verified.instance_id
    secrets = next(e.payload for e in events if isinstance(e.payload, SecretsReleased))
    assert secrets.verified == verified.claims

    destroyed = next(e.payload for e in events if isinstance(e.payload, KeysDestroyed))
    assert destroyed.volume is not None and destroyed.volume.wrapped_deleted
    assert destroyed.volume.released_to == verified.instance_id
    erased = next(e.payload for e in events if isinstance(e.payload, InstanceDestroyed))
    assert erased.volume is not None and erased.volume.luks_header_found and erased.volume.verified_zero
    assert erased.volume.removed
    assert erased.ram is not None and erased.ram.verified and erased.ram.bytes_scrubbed > 0
    record = next(e.payload for e in events if isinstance(e.payload, TeardownRecord))
    assert record.complete, record.steps
    assert {st.name: st.status for st in record.steps} == {"instance": "ok", "guest_ram": "ok", "volume": "ok",
                                                           "keys": "ok"}
    assert at["teardown.record"] <= at["job.done"]
    tomb, _, _ = await broker.kv.get(job_key(JOB), JobKeys)
    assert isinstance(tomb, JobKeys) and tomb.destroyed and not tomb.wrapped

    # Nothing secret anywhere: streams and buckets, log lines, the agent's work directory while it ran.
    assert len(dek) == 32
    # The workload's output is the client's too: on the bus only sealed to its key, never in a log line.
    secrets_forms = (_forms(dek) + _forms(SECRET.strip()) + [WRITTEN.encode()] + _forms(f"digest {want}".encode())
                     + _forms(b"mounted 1 tmpfs"))
    messages = await _all_messages(admin)
    assert len(messages) > 20
    for subject, data in messages:
        for form in secrets_forms:
            assert form not in data, f"a secret in a message on {subject}"
    lines = [caplog.text] + [str(r.__dict__) for r in caplog.records]
    for form in secrets_forms:
        assert not any(form.decode(errors="replace") in line for line in lines), "a secret in a log line"
    # The volume (LUKS2, key from the broker) and the scratch disk under the overlay, where the workload also
    # wrote the marker (plain dm-crypt, key made in the guest): both only ciphertext on the host.
    assert any(name.endswith("volume.luks") for name in workdir_files), sorted(workdir_files)
    assert any(name.endswith("scratch.ext4") for name in workdir_files), sorted(workdir_files)
    for name, data in workdir_files.items():
        for form in secrets_forms:
            assert form not in data, f"a secret in the work directory: {name}"
    assert not any((tmp_path / "instances").iterdir())  # and the work directory is gone


async def _job_events(admin: Any) -> list[Event]:
    out: list[Event] = []
    for stream, subject in (("QVM_JOBS", f"qvm.jobs.{JOB}.>"), ("QVM_KEYS", f"qvm.keys.{JOB}.>"),
                            ("QVM_TEARDOWN", f"qvm.teardown.{JOB}.>")):
        async for batch in read_stream(admin.js, stream, subject):
            out += [admin.codec.decode(m.subject, m.data) for m in batch]
    return sorted(out, key=lambda e: e.envelope.time_ns)


async def _has(admin: Any, etype: EventType) -> bool:
    return any(e.spec.type is etype for e in await _job_events(admin))


def _output(events: list[Event], complete: bool = True) -> bytes:
    return open_output_events(events, JOB, OUTPUT_KEY, require_complete=complete).data


def _failures(events: list[Event]) -> list[str]:
    return [f"{e.spec.type}: {e.payload}" for e in events if "fail" in str(e.spec.type) or "refused" in str(e.spec.type)]

