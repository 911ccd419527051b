"""The output streamer's end: a chunk being published by the periodic flush when the workload ends is
finished and counted, never cut off halfway (CI saw an exit report count 1 chunk while 2 were on the bus)."""

from __future__ import annotations

import asyncio

from services.node_agent.output import OutputStreamer


async def test_stopping_waits_for_a_flush_in_progress() -> None:
    emitted: list[tuple[int, bytes]] = []
    counted: list[int] = []
    in_emit = asyncio.Event()
    release = asyncio.Event()

    async def emit(seq: int, chunk: bytes) -> None:
        emitted.append((seq, chunk))  # on the bus from here on
        in_emit.set()
        await release.wait()  # the broker's ack still on its way
        counted.append(seq)  # what the exit report counts

    streamer = OutputStreamer(emit)
    await streamer.add(b"first\n")
    flusher = asyncio.create_task(streamer.flush_every(0.01))
    await asyncio.wait_for(in_emit.wait(), 5)  # the periodic flush is publishing chunk 0
    await streamer.add(b"second\n")
    stopping = asyncio.create_task(streamer.stop(flusher))
    await asyncio.sleep(0.05)
    assert not stopping.done(), "stop waits for the flush in progress"
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert emitted == [(0, b"first\n"), (1, b"second\n")]
    assert counted == [0, 1], "every chunk on the bus is counted"
    assert flusher.cancelled()
