"""The final summary table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from bench.common import Figure

__all__ = ["summary"]


def summary(figures: list[Figure], *, title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("target", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("met", justify="center")
    for f in figures:
        ratio = f.ratio
        met = f.met
        table.add_row(
            f.name, f.value_text(), f.target_text(), "-" if ratio is None else f"{ratio:.2f}",
            "-" if met is None else ("[green]yes[/green]" if met else "[red]no[/red]"),
        )
    Console(width=130).print(table)
