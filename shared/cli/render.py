"""How the CLI shows an event's payload in one line (without bulky or secret-free-but-noisy fields)."""

from __future__ import annotations

from shared.crypto.output import SEALED_OVERHEAD
from shared.events import InstanceOutput
from shared.models import Frozen

__all__ = ["summarize"]

_NOISY = ("job", "inventory")  # the assignment's job copy, full inventories


def summarize(payload: Frozen, width: int = 160) -> str:
    data = payload.model_dump(mode="json")
    for key in _NOISY:
        data.pop(key, None)
    if isinstance(payload, InstanceOutput):  # ciphertext only the client can open: say so, not the blob
        del data["sealed"], data["suite"]
        data["output"] = f"sealed, {max(0, len(payload.sealed) // 2 - SEALED_OVERHEAD)} bytes"
    return ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, "", [], {}))[:width]
