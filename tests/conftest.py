from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared.telemetry import setup_tracing
from shared.tpm.swtpm import Swtpm, SwtpmState
from tests.framework.stack import Stack, running_stack
from tests.framework.tpm import manufactured, start_copy

setup_tracing("tests")
# The eBPF runtime guard denies what a host process does to a VMM; tests that mean to exercise it turn it on
# (settings.guard / QVM_GUARD), the others (and every agent, `qvm up` or demo they start) run without it.
os.environ.setdefault("QVM_GUARD", "off")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """A real nats-server (mutual TLS, generated permissions, JetStream) just for this test."""
    async with running_stack(tmp_path) as s:
        yield s


@pytest.fixture(scope="session")
def tpm_templates(tmp_path_factory: pytest.TempPathFactory) -> tuple[SwtpmState, SwtpmState]:
    """Two manufactured swtpm states (two different TPMs), made once per test session (per worker)."""
    if shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None:
        pytest.skip("swtpm is not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("tpm-templates")
    return manufactured(root / "a"), manufactured(root / "b")


@pytest.fixture
def swtpm(tpm_templates: tuple[SwtpmState, SwtpmState], tmp_path: Path) -> Iterator[Swtpm]:
    """A running swtpm of this test's own (a copy of template a)."""
    tpm = start_copy(tpm_templates[0], tmp_path / "tpm")
    try:
        yield tpm
    finally:
        tpm.stop()
