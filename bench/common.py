"""Shared helpers: figures against targets or against the machine's own limits, percentiles, windowed
concurrency, log counting."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TextIO, TypeVar

__all__ = ["Figure", "LogCounter", "fmt_rate", "percentile", "say", "say_to", "section", "windowed"]

T = TypeVar("T")


_out: list[TextIO] = []


def say(text: str = "") -> None:
    """Progress and per-benchmark lines: stdout, or stderr when `--json` keeps stdout for the document."""
    print(text, file=_out[0] if _out else sys.stdout, flush=True)


def say_to(stream: TextIO) -> None:
    _out[:] = [stream]


def section(title: str, method: str) -> None:
    say()
    say(f"== {title} ==")
    say(f"method: {method}")


@dataclass(frozen=True)
class Figure:
    """One summary row: a measured value and, optionally, what it is held against.

    Either a `limit`: the physical or library bound of the same work, measured on this machine in the same
    run (`limit_of` says what it is), with `target` then the ratio value / limit to reach (at least it when
    `higher_is_better`, at most it otherwise); a machine that is faster or slower moves both. Or, with no
    limit, a fixed `target` in the figure's own unit (figures whose budget is absolute: a latency a user
    waits on)."""

    name: str
    value: float | None
    unit: str
    target: float | None = None
    higher_is_better: bool = False
    note: str = ""
    check: bool | None = None  # a pass/fail row without a numeric target
    check_target: str = ""
    limit: float | None = None
    limit_of: str = ""

    @property
    def ratio(self) -> float | None:
        """value / limit when the figure has a limit, else value / target."""
        base = self.limit if self.limit is not None else self.target
        if self.value is None or not base:
            return None
        return self.value / base

    @property
    def met(self) -> bool | None:
        if self.check is not None:
            return self.check
        if self.value is None or self.target is None:
            return None
        if self.limit is not None:
            ratio = self.ratio
            if ratio is None:
                return None
            return ratio >= self.target if self.higher_is_better else ratio <= self.target
        return self.value >= self.target if self.higher_is_better else self.value < self.target

    def limit_text(self) -> str:
        if self.limit is None:
            return "-"
        return f"{_num(self.limit)} {self.unit}".strip()

    def value_text(self) -> str:
        if self.value is None:
            return "error"
        return f"{_num(self.value)} {self.unit}".strip()

    def target_text(self) -> str:
        if self.check_target:
            return self.check_target
        if self.target is None:
            return "-"
        if self.limit is not None:
            return f"{'>=' if self.higher_is_better else '<='} {self.target:.2f}x"
        return f"{'>=' if self.higher_is_better else '<'} {_num(self.target)} {self.unit}".strip()

    def as_dict(self) -> dict[str, object]:
        """The row for `--json`."""
        return {"name": self.name, "measured": self.value, "unit": self.unit, "limit": self.limit,
                "limit_of": self.limit_of or None, "ratio": self.ratio if self.limit is not None else None,
                "target_ratio": self.target if self.limit is not None else None,
                "target": self.target if self.limit is None else None,
                "higher_is_better": self.higher_is_better, "met": self.met, "note": self.note or None}

    def line(self) -> str:
        """The figure as one printed line, with target and ratio when it has a target."""
        out = f"  {self.name:<46} {self.value_text():>18}"
        if self.limit is not None:
            out += f"   limit {self.limit_text()} ({self.limit_of})"
        if self.target is not None or self.check is not None:
            ratio = self.ratio
            out += f"   target {self.target_text():<16}"
            if ratio is not None:
                out += f" ratio {ratio:.2f}"
            out += f"  {'met' if self.met else 'NOT met'}"
        if self.note:
            out += f"   ({self.note})"
        return out


def _num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s" if seconds > 0 else "n/a"


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (p in 0..100)."""
    if not sorted_values:
        return math.nan
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[min(k, len(sorted_values) - 1)]


async def windowed(items: Sequence[T], fn: Callable[[T], Awaitable[object]], window: int = 64) -> None:
    """Run `fn` over `items` with at most `window` in flight (a sliding window, no stop between groups)."""
    sem = asyncio.Semaphore(window)

    async def one(x: T) -> None:
        try:
            await fn(x)
        finally:
            sem.release()

    tasks = []
    for x in items:
        await sem.acquire()
        tasks.append(asyncio.create_task(one(x)))
    await asyncio.gather(*tasks)


class LogCounter(logging.Handler):
    """Counts warnings and errors the services log, instead of letting them flood the output."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname.lower()} {record.name}: {record.getMessage()[:80]}"] += 1

    def install(self) -> None:
        root = logging.getLogger()
        root.addHandler(self)
        root.setLevel(logging.WARNING)

    def uninstall(self) -> None:
        logging.getLogger().removeHandler(self)

    def drain(self) -> str:
        """A one-line summary of what was logged since the last drain."""
        if not self.counts:
            return "service warnings/errors logged: none"
        top = ", ".join(f"{n}x {k}" for k, n in self.counts.most_common(3))
        total = sum(self.counts.values())
        self.counts.clear()
        return f"service warnings/errors logged: {total} ({top})"
