"""What the commands print: the two consoles, JSON, and the tables several commands share."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from curate.engine.runner import StageResult

# Wide tables when the output goes to a file or a pipe (rich would assume 80 columns).
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, soft_wrap=True)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=1, sort_keys=True, default=str))


def show_results(results: list[StageResult], as_json: bool, dry_run: bool = False) -> None:
    """One line per stage run: what it kept, dropped and flagged, and how long it took."""
    if as_json:
        emit_json([r.summary() | {"dry_run": dry_run} for r in results])
        return
    title = "stages (dry run: nothing written)" if dry_run else "stages"
    table = Table(title=title, title_justify="left")
    for col in ("stage", "manifest", "samples", "kept", "dropped here", "flagged here", "time"):
        table.add_column(col)
    for r in results:
        s = r.summary()
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped_here"].items()) or "-"
        flagged = ", ".join(f"{k} {v}" for k, v in s["flagged_here"].items()) or "-"
        when = "cached" if s["from_cache"] else f"{s['elapsed_s']:.2f} s"
        stage = f"{s['stage']} {s['source']}" if s["source"] else s["stage"]
        table.add_row(stage, s["manifest"][:12], str(s["samples"]), str(s["kept"]),
                      dropped, flagged, when)
    stdout.print(table)


def show_export(report: dict[str, Any], out: Path, as_json: bool) -> None:
    """What an MVTec-layout export wrote, per category and split, and what it skipped."""
    if as_json:
        emit_json({k: v for k, v in report.items() if k != "files"} | {"out": str(out)})
        return
    stdout.print(f"exported {report['written']} samples of manifest {report['manifest'][:12]} "
                 f"to {out}")
    for category, splits in report["counts"].items():
        for split, labels_ in splits.items():
            stdout.print(f"  {category}/{split}: " +
                         ", ".join(f"{k} {v}" for k, v in labels_.items()))
    for s in report["skipped"]:
        stdout.print(f"  [yellow]skipped[/] {s['path']}: {s['why']}", highlight=False)
