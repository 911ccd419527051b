"""The node-agent's handle on the runtime guard: one loader process (qvm-guard-loader) per agent, spoken to
over its stdin/stdout.

Why a separate loader process rather than BPF from Python: libbpf does the CO-RE relocations, the ring buffer
and the attach; the agent only sends a few words per instance and reads JSON lines. If the agent dies, the
loader sees EOF (and its parent-death signal) and exits, and the kernel detaches every program with it: a
crashed agent leaves no stale enforcement behind (and no guard either until it restarts: the guard protects
running jobs from the host, it is not a tripwire that outlives its owner).

Modes (`RuntimeGuard.mode`, rules.py): "enforce" where the kernel runs BPF LSM programs (the rules marked
enforced deny the syscall), "observe" where it does not (tracepoints: every rule is reported, none denied,
`Finding.enforced` is false and the agent's answer comes after the fact). `start()` lets the loader pick
(enforce if it can, else observe; `fallback` says why not enforce) unless told a mode. Observe mode matches
protected files by path as well as by inode, so `watch`/`protect` also send each file's absolute path (and
its resolved path, where that differs).

Each RuntimeGuard loads its own copy of the programs and maps, so two guards on one host (two agents, two
pytest workers) are independent: each judges and reports only the VMMs it was told to watch. Where both
deny the same syscall, the kernel applies the first denial; only the guard whose maps matched reports it.

Slots: the BPF maps name instances by a small number. Slots are handed out round-robin and a slot's
instance id is remembered after `unwatch` until the slot is reused, so a finding still in flight when an
instance is unwatched is attributed to the right instance.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.guard.build import GuardBuild, GuardError, loader_argv, loader_failure, parse_ready
from shared.guard.rules import MODES, RULES, Mode, Severity
from shared.telemetry import get_logger

__all__ = ["MAX_SLOTS", "Finding", "RuntimeGuard"]

log = get_logger("qvm.node_agent.guard")

MAX_SLOTS = 1024  # QVM_MAX_SLOTS in guard.bpf.c
MAX_PATH_BYTES = 127  # QVM_PATH_BYTES - 1 in guard.bpf.c: the longest protected path observe mode matches
READY_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 30.0
LINE_LIMIT = 2 << 20  # the longest line the loader writes is a `status` reply (< 1 MiB)
STDERR_LINES = 20


@dataclass(frozen=True)
class Finding:
    """Something a watched instance (or the host, against one) did that a rule names.

    `pid`: the acting process (tgid), `tid` its thread; `target_pid`: the process acted on (the VMM for the
    host_* rules, the forked child for vmm_fork, 0 where there is none). `monotonic_ns`: when the kernel saw
    it, on CLOCK_MONOTONIC (comparable with time.monotonic_ns()). `enforced`: what actually happened: the
    syscall was denied (enforce mode, a rule that denies); false in observe mode, where it went on."""

    rule: str
    severity: Severity
    enforced: bool
    instance_id: str | None
    pid: int
    tid: int
    comm: str
    target_pid: int
    detail: str
    monotonic_ns: int


_End = GuardError | None  # what ends the findings stream: None on close(), the error if the loader died
_QueueItem = Finding | GuardError | None


class _FindingStream:
    """`async for f in guard.findings()`. Not an async generator on purpose: cancelling a wait (asyncio.wait_for
    around `__anext__`) must not close the stream."""

    def __init__(self, queue: asyncio.Queue[_QueueItem]) -> None:
        self._queue = queue

    def __aiter__(self) -> _FindingStream:
        return self

    async def __anext__(self) -> Finding:
        item = await self._queue.get()
        if isinstance(item, Finding):
            return item
        self._queue.put_nowait(item)  # the end marker stays for every other reader
        if item is None:
            raise StopAsyncIteration
        raise item


def _int(obj: dict[str, Any], key: str) -> int:
    v = obj.get(key)
    if type(v) is not int or v < 0:
        raise ValueError(f"{key}: not a non-negative integer")
    return v


def _str(obj: dict[str, Any], key: str, limit: int = 512) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or len(v) > limit:
        raise ValueError(f"{key}: not a string of at most {limit} characters")
    return v


class RuntimeGuard:
    """A running guard. Start with `await RuntimeGuard.start(build)`; end with `await guard.close()`."""

    def __init__(self, build: GuardBuild, proc: asyncio.subprocess.Process, queue_size: int) -> None:
        self.build = build
        self.mode: Mode = "observe"  # set from the loader's ready line
        self.fallback = ""  # why the loader, left to choose, did not enforce
        self.absent: tuple[str, ...] = ()  # observe-mode tracepoints this kernel lacks (their syscalls too)
        self._proc = proc
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue(maxsize=queue_size)
        self._lock = asyncio.Lock()
        self._pending: collections.deque[asyncio.Future[dict[str, Any]]] = collections.deque()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._slots: dict[str, int] = {}  # watched instance -> slot
        self._slot_ids: dict[int, str] = {}  # slot -> instance (kept after unwatch until the slot is reused)
        self._files: dict[int, dict[str, Path]] = {}  # slot -> protected file basename -> path
        self._next_slot = 0
        self._closing = False
        self._ended: _End = None
        self._end_queued = False
        self.dropped = 0  # findings dropped because no one read them (queue full)
        self.lost = 0  # events the kernel's ring buffer had no room for
        self._reader: asyncio.Task[None] | None = None
        self._stderr_reader: asyncio.Task[None] | None = None

    # ---- life cycle ----

    @classmethod
    async def start(cls, build: GuardBuild, *, mode: Mode | None = None, ready_timeout_s: float = READY_TIMEOUT_S,
                    queue_size: int = 10_000) -> RuntimeGuard:
        """Spawn the loader, wait until every program of the mode is attached, and register this process as
        the agent (allowed to read its VMMs and their files). `mode` None: enforce where the kernel runs BPF
        LSM programs, else observe (`guard.mode` says which, `guard.fallback` why not enforce). Raises
        GuardError (lsm_inactive / lsm_refused for an explicit enforce the kernel cannot do)."""
        if build.verify_only:
            raise GuardError("bad_request", "the check-only build cannot run as a guard")
        if mode is not None and mode not in MODES:
            raise GuardError("bad_request", f"no guard mode {mode!r}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *loader_argv(build, mode), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=LINE_LIMIT)
        except OSError as exc:
            raise GuardError("loader_failed", f"cannot start {build.loader_path}: {exc}") from None
        guard = cls(build, proc, queue_size)
        guard._stderr_reader = asyncio.create_task(guard._read_stderr())
        try:
            await guard._wait_ready(ready_timeout_s)
        except BaseException:
            await guard._stop_process()
            raise
        guard._reader = asyncio.create_task(guard._read_stdout())
        try:
            await guard._command(f"agent {os.getpid()}")
        except BaseException:
            await guard.close()
            raise
        return guard

    async def _wait_ready(self, timeout_s: float) -> None:
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout_s)
        except (TimeoutError, ValueError) as exc:
            raise GuardError("loader_failed", f"the loader did not get ready: {exc or 'timeout'}") from None
        ready = parse_ready(line.decode(errors="replace"))
        if ready is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 10)
            if self._stderr_reader is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._stderr_reader), 5)
            raise loader_failure("\n".join(self._stderr), self._proc.returncode)
        mode, fallback, absent = ready.get("mode"), ready.get("fallback"), ready.get("absent")
        if mode not in MODES:
            raise GuardError("loader_failed", f"the loader runs in an unknown mode {mode!r}")
        self.mode = "enforce" if mode == "enforce" else "observe"
        self.fallback = fallback if isinstance(fallback, str) else ""
        self.absent = tuple(a for a in absent if isinstance(a, str)) if isinstance(absent, list) else ()
        log.info("runtime guard ready", extra={"attached": ready.get("attached"), "mode": self.mode,
                                               "fallback": self.fallback[:300], "absent": list(self.absent),
                                               "guard_digest": self.build.digest[:16]})

    async def close(self) -> None:
        """Detach everything (the loader exits; the kernel drops its programs) and end `findings()`."""
        if self._closing:
            return
        self._closing = True
        await self._stop_process()
        for task in (self._reader, self._stderr_reader):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(task, 5)
        self._fail_pending(GuardError("loader_exited", "the guard is closed"))
        self._end(None)

    async def _stop_process(self) -> None:
        proc = self._proc
        if proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    @property
    def running(self) -> bool:
        return self._proc.returncode is None and not self._closing

    @property
    def enforcing(self) -> bool:
        """Whether the kernel denies what the rules marked enforced (enforce mode); False in observe mode."""
        return self.mode == "enforce"

    @property
    def watched(self) -> dict[str, int]:
        return dict(self._slots)

    # ---- instances ----

    async def watch(self, instance_id: str, vmm_pid: int, protected_files: Sequence[Path] = ()) -> int:
        """Put a running VMM (and every process it forked or will fork) under the rules, with its protected
        files (volume, scratch). Call it once the VMM has exec'd its binary (the exec itself would be denied, or
        reported). Returns the instance's slot. Raises GuardError (bad_request: already watched, no such
        process, a file that cannot be stat'ed, in observe mode a path longer than 127 bytes)."""
        if instance_id in self._slots:
            raise GuardError("bad_request", f"instance {instance_id} is already watched")
        checked = [self._check_file(path) for path in protected_files]
        slot = self._allocate_slot()
        self._slot_ids[slot] = instance_id
        self._files[slot] = {}
        await self._command(f"watch {slot} {vmm_pid}")
        try:
            for path, commands in zip(protected_files, checked, strict=True):
                for command in commands:
                    await self._command(command.format(slot=slot))
                self._files[slot][path.name] = path
        except BaseException:
            with contextlib.suppress(GuardError):
                await self._command(f"unwatch {slot}")
            raise
        self._slots[instance_id] = slot
        return slot

    async def protect(self, instance_id: str, protected_files: Sequence[Path]) -> None:
        """More protected files for a watched instance (a scratch disk created after launch)."""
        slot = self._slots.get(instance_id)
        if slot is None:
            raise GuardError("bad_request", f"instance {instance_id} is not watched")
        checked = [self._check_file(path) for path in protected_files]
        for path, commands in zip(protected_files, checked, strict=True):
            for command in commands:
                await self._command(command.format(slot=slot))
            self._files[slot][path.name] = path

    def _check_file(self, path: Path) -> list[str]:
        """The loader commands that protect `path` ("{slot}" to fill in): by inode (enforce mode's file_open)
        and, in observe mode, by each absolute name the file is opened by (as given, and resolved)."""
        try:
            st = os.stat(path)
        except OSError as exc:
            raise GuardError("bad_request", f"protected file {path}: {exc.strerror}") from None
        commands = [f"protect {{slot}} {st.st_dev} {st.st_ino}"]
        if self.mode == "observe":
            names = dict.fromkeys(os.fsencode(p) for p in (os.path.abspath(path), os.path.realpath(path)))
            for name in names:
                if len(name) > MAX_PATH_BYTES or b"\0" in name:
                    raise GuardError("bad_request", f"protected file {path}: observe mode matches paths of at "
                                     f"most {MAX_PATH_BYTES} bytes")
                commands.append(f"protectpath {{slot}} {name.hex()}")
        return commands

    async def unprotect(self, instance_id: str) -> None:
        """Release a watched instance's files, its processes staying watched: for a teardown that erases the
        volume with another process (`cryptsetup erase`) before the VMM is gone."""
        slot = self._slots.get(instance_id)
        if slot is not None:
            await self._command(f"unprotect {slot}")
            self._files[slot] = {}

    async def unwatch(self, instance_id: str) -> None:
        """Forget an instance: its processes and files are ordinary again. Unknown instances are ignored (a
        teardown may run twice). Call it before a teardown touches the instance's files from another process
        (`cryptsetup erase` is not the agent: it would be denied, as any host process is)."""
        slot = self._slots.pop(instance_id, None)
        if slot is not None:
            await self._command(f"unwatch {slot}")

    async def status(self) -> dict[str, Any]:
        """The loader's view of its maps: agents, live slots with their member processes, protected files."""
        return await self._command("status")

    def findings(self) -> AsyncIterator[Finding]:
        """Findings as they arrive, until close() (then the iteration ends) or the loader's death (then it
        raises GuardError). Meant for one reader: each finding goes to one `__anext__`."""
        return _FindingStream(self._queue)

    async def next_finding(self, rule: str | None = None, match: Callable[[Finding], bool] | None = None,
                           timeout_s: float = 10.0) -> Finding:
        """The next finding of `rule` (any rule: None) that `match`es, within `timeout_s` (else TimeoutError);
        the findings before it are consumed and dropped. For tests and benchmarks: the agent reads
        `findings()`."""
        stream = self.findings()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no {rule or 'finding'} within {timeout_s}s")
            f = await asyncio.wait_for(anext(stream), left)
            if (rule is None or f.rule == rule) and (match is None or match(f)):
                return f

    def _allocate_slot(self) -> int:
        used = set(self._slots.values())
        for i in range(MAX_SLOTS):
            slot = (self._next_slot + i) % MAX_SLOTS
            if slot not in used:
                self._next_slot = (slot + 1) % MAX_SLOTS
                return slot
        raise GuardError("bad_request", f"more than {MAX_SLOTS} instances watched")

    # ---- the line protocol ----

    async def _command(self, line: str) -> dict[str, Any]:
        async with self._lock:
            if not self.running or self._proc.stdin is None:
                raise self._ended or GuardError("loader_exited", "the guard is not running")
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending.append(fut)
            try:
                self._proc.stdin.write(line.encode() + b"\n")
                await self._proc.stdin.drain()
            except (OSError, RuntimeError) as exc:
                self._pending.remove(fut)
                raise GuardError("loader_exited", f"writing to the loader: {exc}") from None
            try:
                reply = await asyncio.wait_for(fut, COMMAND_TIMEOUT_S)
            except TimeoutError:
                # The (cancelled) future stays queued: a late reply is matched to it and dropped, so replies
                # never shift onto later commands.
                raise GuardError("loader_failed", f"no reply to {line.split()[0]!r}") from None
        if reply.get("reply") != "ok":
            raise GuardError("bad_request", f"{line.split()[0]}: {reply.get('error', 'refused')}")
        return reply

    async def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        while True:
            try:
                line = await self._proc.stdout.readline()
            except ValueError:  # a line over LINE_LIMIT: the loader never writes one
                log.warning("runtime guard: over-long line from the loader ignored")
                continue
            if not line:
                break
            self._dispatch(line)
        code = await self._proc.wait()
        if self._closing:
            return
        if self._stderr_reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._stderr_reader), 5)
        err = GuardError("loader_exited", f"the guard loader exited ({code}): "
                         f"{' | '.join(self._stderr) or 'no error output'}")
        log.error("runtime guard: loader exited", extra={"error": err.detail[:500]})
        self._fail_pending(err)
        self._end(err)

    async def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            self._stderr.append(line.decode(errors="replace").strip()[:4000])

    def _dispatch(self, raw: bytes) -> None:
        try:
            obj = json.loads(raw)
        except ValueError:
            log.warning("runtime guard: garbled line from the loader ignored", extra={"line": raw[:200].decode(
                errors="replace")})
            return
        if not isinstance(obj, dict):
            log.warning("runtime guard: unexpected line from the loader ignored")
            return
        if "reply" in obj:
            fut = self._pending.popleft() if self._pending else None
            if fut is None or fut.done():
                log.warning("runtime guard: reply with no command ignored")
            else:
                fut.set_result(obj)
        elif "rule" in obj:
            self._on_event(obj)
        elif "notice" in obj:
            self._on_notice(obj)
        else:
            log.warning("runtime guard: unknown line from the loader ignored", extra={"keys": sorted(obj)[:10]})

    def _on_event(self, obj: dict[str, Any]) -> None:
        try:
            name = _str(obj, "rule", 64)
            rule = RULES.get(name)
            if rule is None:
                raise ValueError(f"unknown rule {name!r}")
            enforced = obj.get("enforced")
            if not isinstance(enforced, bool):
                raise ValueError("enforced: not a boolean")
            slot = _int(obj, "slot")
            detail = _str(obj, "detail")
            finding = Finding(rule=name, severity=rule.severity, enforced=enforced,
                              instance_id=self._slot_ids.get(slot), pid=_int(obj, "tgid"), tid=_int(obj, "pid"),
                              comm=_str(obj, "comm", 64), target_pid=_int(obj, "target"),
                              detail=str(self._files.get(slot, {}).get(detail, detail)),
                              monotonic_ns=_int(obj, "ktime_ns"))
        except ValueError as exc:
            log.warning("runtime guard: malformed event ignored", extra={"error": str(exc)[:200]})
            return
        if enforced != rule.enforced_in(self.mode):
            log.warning("runtime guard: the loaded programs disagree with the rule table (stale build?)",
                        extra={"rule": name, "mode": self.mode})
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            self.dropped += 1
            log.warning("runtime guard: findings queue full, oldest dropped", extra={"dropped": self.dropped})
        self._queue.put_nowait(finding)

    def _on_notice(self, obj: dict[str, Any]) -> None:
        notice = obj.get("notice")
        if notice == "lost" and type(obj.get("count")) is int:
            self.lost = obj["count"]
            log.warning("runtime guard: kernel ring buffer overflowed, events lost (verdicts still applied)",
                        extra={"lost": self.lost})
        elif notice == "members_full":
            log.error("runtime guard: a forked VMM process could not be tracked (members map full)",
                      extra={"slot": obj.get("slot"), "pid": obj.get("tgid")})
        else:
            log.warning("runtime guard: loader notice", extra={"notice": str(notice)[:64]})

    def _fail_pending(self, err: GuardError) -> None:
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(err)

    def _end(self, item: _End) -> None:
        """Queue the end of `findings()` once: the loader's error if it died, else None (closed)."""
        if self._end_queued:
            return
        self._end_queued = True
        self._ended = item
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
        self._queue.put_nowait(item)
