from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.telemetry import setup_tracing
from tests.framework.stack import Stack, running_stack

setup_tracing("tests")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """A real nats-server (mutual TLS, generated permissions, JetStream) just for this test."""
    async with running_stack(tmp_path) as s:
        yield s
