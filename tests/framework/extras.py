"""pyproject.toml's dependencies and extras, and what they install, for the checks that each image installs
only its own extra."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def requirement_name(requirement: str) -> tuple[str, set[str]]:
    """A requirement's normalised distribution name and its extras: `qvm[a,b]>=1` -> ("qvm", {"a", "b"})."""
    m = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement)
    assert m, requirement
    extras = {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}
    return re.sub(r"[-_.]+", "-", m.group(1)).lower(), extras


@cache
def project() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        data: dict[str, Any] = tomllib.load(f)["project"]
    return data


def extras() -> dict[str, list[str]]:
    found: dict[str, list[str]] = project()["optional-dependencies"]
    return found


def _closure(start: Iterable[str], step: Callable[[str], Iterable[str]]) -> set[str]:
    todo, seen = list(start), set[str]()
    while todo:
        item = todo.pop()
        if item not in seen:
            seen.add(item)
            todo += step(item)
    return seen


def distributions(*names: str) -> set[str]:
    """The distributions that qvm with these extras requires directly (qvm's own extras expanded)."""
    reqs = {e: [requirement_name(r) for r in rs] for e, rs in extras().items()}
    chosen = _closure(names, lambda e: [n for name, nested in reqs[e] if name == "qvm" for n in nested])
    return ({requirement_name(r)[0] for r in project()["dependencies"]}
            | {name for e in chosen for name, _ in reqs[e] if name != "qvm"})


def _requires(dist: str) -> list[str]:
    try:
        found = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [requirement_name(r)[0] for r in found if not re.search(r"\bextra\s*==", r)]


def installed(dists: set[str]) -> set[str]:
    """`dists` and what they pull in, transitively (requirements of their own extras left out)."""
    return _closure(dists, _requires)


def modules_of(dists: set[str]) -> set[str]:
    """The top-level modules these (installed) distributions provide."""
    owners = importlib.metadata.packages_distributions()
    return {mod for mod, names in owners.items() if any(requirement_name(n)[0] in dists for n in names)}
