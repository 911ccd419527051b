"""How the CLI shows an event's payload in one line (without bulky or secret-free-but-noisy fields)."""

from __future__ import annotations

from shared.models import Frozen

__all__ = ["summarize"]

_NOISY = ("job", "inventory", "data_b64")  # the assignment's job copy, full inventories, output bytes


def summarize(payload: Frozen, width: int = 160) -> str:
    data = payload.model_dump(mode="json")
    for key in _NOISY:
        data.pop(key, None)
    return ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, "", [], {}))[:width]
