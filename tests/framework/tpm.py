"""swtpm for tests: TPMs manufactured once per session (swtpm_setup takes about a second), copied into
each test's own directory and started on that test's own ports."""

from __future__ import annotations

import shutil
from pathlib import Path

from shared.tpm.swtpm import Swtpm, SwtpmState


def manufactured(root: Path) -> SwtpmState:
    return SwtpmState(root).manufacture()


def start_copy(template: SwtpmState, dest: Path) -> Swtpm:
    """A running TPM with the template's identity (EK, seeds) and its own state directory."""
    shutil.copytree(template.root, dest, ignore=shutil.ignore_patterns("*.log", ".lock"))
    return Swtpm(SwtpmState(dest)).start()
