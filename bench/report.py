"""The final summary: one table (figure, measured, limit, ratio, target, met), or one JSON document."""

from __future__ import annotations

import json
from typing import TextIO

from rich.console import Console
from rich.table import Table

from bench.common import Figure

__all__ = ["summary", "summary_json"]


def _ordered(figures: list[Figure]) -> list[Figure]:
    """Figures held against this machine's limits first (in bench order), then the others."""
    return [f for f in figures if f.limit is not None] + [f for f in figures if f.limit is None]


def summary(figures: list[Figure], *, title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("limit (this machine, this run)", justify="right")
    table.add_column("limit is")
    table.add_column("ratio", justify="right")
    table.add_column("target", justify="right")
    table.add_column("met", justify="center")
    for f in _ordered(figures):
        ratio = f.ratio if f.limit is not None else None
        met = f.met
        table.add_row(
            f.name, f.value_text(), f.limit_text(), f.limit_of or "-", "-" if ratio is None else f"{ratio:.2f}",
            f.target_text(), "-" if met is None else ("[green]yes[/green]" if met else "[red]no[/red]"),
        )
    Console(width=170).print(table)


def summary_json(figures: list[Figure], meta: dict[str, object], out: TextIO) -> None:
    json.dump({**meta, "figures": [f.as_dict() for f in _ordered(figures)]}, out, indent=1)
    out.write("\n")
