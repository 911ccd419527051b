"""A job's output, which only its client can read.

    key = new_output_key()                                  # X25519, kept in memory by the client only
    job_id = await client.submit(with_output_key(job, key))
    ...
    output = await client.open_output(job_id, key)          # or open_output(bus, job_id, key)
    print(output.data.decode())

The node-agent seals every chunk of the workload's output to the job's `output_key` (see
`shared.crypto.output`); a job without one gets no output published at all. Opening checks everything the
client can check: every chunk comes from the node the job was placed on and the instance that reported the
exit, the chunks run 0..n-1 with no gap and no conflicting copy, their digest is the one in the signed
`instance.exited`, each opens under this key bound to this job, instance and seq (so none was swapped,
reordered or altered), and the byte count matches (all of it, or only the first MiB when the node reports
the output truncated).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import x25519

from shared.bus import Bus
from shared.codec import Event
from shared.crypto import CryptoError
from shared.crypto.output import open_chunk, sealed_digest
from shared.errors import ReasonedError
from shared.events import Domain, InstanceExited, InstanceOutput, JobPlaced, JobSubmitted, scope_filter
from shared.replay import fold_jobs

__all__ = ["JobOutput", "OutputError", "new_output_key", "open_output", "open_output_events", "public_key_hex",
           "with_output_key"]


class OutputError(ReasonedError):
    """The output could not be opened or verified: `output_not_sealed`, `output_key_mismatch`,
    `output_unfinished`, `output_incomplete`, `output_conflict`, `output_digest_mismatch`,
    `output_unopenable`, `output_size_mismatch`."""


@dataclass(frozen=True)
class JobOutput:
    job_id: str
    instance_id: str
    data: bytes  # the published output, opened, in order
    complete: bool  # verified against the exit event (digest, chunk count, byte count)
    exit_code: int | None = None
    total_bytes: int | None = None  # what the workload wrote in all (the exit event's count)
    truncated: bool = False  # only the first MiB was published


def new_output_key() -> x25519.X25519PrivateKey:
    """A fresh X25519 key pair for one job's output; the private key stays in the caller's memory."""
    return x25519.X25519PrivateKey.generate()


def public_key_hex(private_key: x25519.X25519PrivateKey) -> str:
    return private_key.public_key().public_bytes_raw().hex()


def with_output_key(job: JobSubmitted, private_key: x25519.X25519PrivateKey) -> JobSubmitted:
    """`job` with its `output_key` set to this key's public half (validated like any submitted job)."""
    return JobSubmitted.model_validate({**job.model_dump(), "output_key": public_key_hex(private_key)})


def open_output_events(events: Iterable[Event], job_id: str, private_key: x25519.X25519PrivateKey, *,
                       require_complete: bool = True) -> JobOutput:
    """Open and verify a job's output from its events (as `fold_jobs` returns them).

    With `require_complete` (the default) the instance must have exited and everything is checked against
    its `instance.exited`; without, a job that ended before its workload did yields the chunks published
    until then, opened and in order but not known to be all (`complete` False).
    """
    mine = [e for e in events if e.job_id == job_id]
    submitted = next((e.payload for e in mine if isinstance(e.payload, JobSubmitted)), None)
    if submitted is not None:
        if submitted.output_key is None:
            raise OutputError("output_not_sealed", f"job {job_id} gave no output_key: no output was published")
        if submitted.output_key != public_key_hex(private_key):
            raise OutputError("output_key_mismatch", f"job {job_id}'s output is sealed to another key "
                                                     f"({submitted.output_key[:16]}…)")
    placed = [e.payload for e in mine if isinstance(e.payload, JobPlaced)]
    if placed:  # only the node the scheduler placed the job on speaks for its instance
        mine = [e for e in mine if not isinstance(e.payload, InstanceExited | InstanceOutput)
                or e.node_id == placed[-1].node_id]
    exit_event = next((e for e in mine if isinstance(e.payload, InstanceExited)), None)
    if exit_event is not None:
        assert isinstance(exit_event.payload, InstanceExited)
        exited: InstanceExited | None = exit_event.payload
        instance_id, node_id = exit_event.payload.instance_id, exit_event.node_id
    else:
        if require_complete:
            raise OutputError("output_unfinished", f"job {job_id}'s workload has not exited (no instance.exited)")
        exited = None
        last = next((e for e in reversed(mine) if isinstance(e.payload, InstanceOutput)), None)
        if last is None:
            return JobOutput(job_id, "", b"", complete=False)
        assert isinstance(last.payload, InstanceOutput)
        instance_id, node_id = last.payload.instance_id, last.node_id

    chunks: dict[int, str] = {}
    for e in mine:
        p = e.payload
        if not isinstance(p, InstanceOutput) or p.instance_id != instance_id or e.node_id != node_id:
            continue  # another instance's, or published by a node that did not run this one
        if chunks.setdefault(p.seq, p.sealed) != p.sealed:
            raise OutputError("output_conflict", f"two different chunks {p.seq} for instance {instance_id}")
    if exited is not None:
        count = exited.output_chunks
        if sorted(chunks) != list(range(count)):
            missing = sorted(set(range(count)) - set(chunks))
            extra = sorted(set(chunks) - set(range(count)))
            raise OutputError("output_incomplete", f"{count} chunks reported; missing {missing[:10]}, "
                                                   f"unexpected {extra[:10]}")
    else:
        count = 0
        while count in chunks:  # only the unbroken run from 0
            count += 1
    sealed = [bytes.fromhex(chunks[seq]) for seq in range(count)]
    if exited is not None and sealed_digest(sealed) != exited.output_sha256:
        raise OutputError("output_digest_mismatch", "the chunks read are not the ones the node reported")
    parts: list[bytes] = []
    for seq, blob in enumerate(sealed):
        try:
            parts.append(open_chunk(blob, private_key, job_id, instance_id, seq))
        except CryptoError:
            raise OutputError("output_unopenable", f"chunk {seq} does not open with this key for job {job_id}, "
                                                   f"instance {instance_id}") from None
    data = b"".join(parts)
    if exited is None:
        return JobOutput(job_id, instance_id, data, complete=False)
    if (len(data) >= exited.output_bytes) if exited.output_truncated else (len(data) != exited.output_bytes):
        raise OutputError("output_size_mismatch", f"{len(data)} bytes opened, the node reported "
                                                  f"{exited.output_bytes}"
                                                  + (" (truncated)" if exited.output_truncated else ""))
    return JobOutput(job_id, instance_id, data, complete=True, exit_code=exited.exit_code,
                     total_bytes=exited.output_bytes, truncated=exited.output_truncated)


async def open_output(bus: Bus, job_id: str, private_key: x25519.X25519PrivateKey, *,
                      require_complete: bool = True) -> JobOutput:
    """Read the job's events from the bus and open its output (see `open_output_events`)."""
    _, events = await fold_jobs(bus.js, bus.codec, scope_filter(Domain.JOBS, job_id))
    return await asyncio.to_thread(open_output_events, events, job_id, private_key,
                                   require_complete=require_complete)
