"""The one progress bar of curate: a rich bar on a console, for one task.

Every long loop shows the same bar — the runner's maps over samples, the per-category jobs of
ssfilter, SDAS sampling and training: description, bar, done of total, time elapsed and
remaining, and any extra fields the caller names (``loss=``, shown after the time). A stage gets
one from :meth:`curate.engine.runner.Context.progress`, which knows the console and whether
progress is shown; the bar disappears when done (``transient``), so logs keep only results.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressBar:
    """A context manager: ``with ProgressBar(console, "dedup", 100) as bar: bar.update(...)``.

    ``total`` None: unknown yet (a spinner-like bar until :meth:`update` gives one).
    ``fields``: extra values shown after the time, each as ``name value`` (floats to 4
    decimals), updated through :meth:`update`. ``enabled`` False: nothing is drawn.
    """

    def __init__(self, console: Console, desc: str, total: int | None, *,
                 enabled: bool = True, **fields: Any):
        columns: list[ProgressColumn] = [
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn()]
        columns += [TextColumn(f"{name} {{task.fields[{name}]:.4f}}") for name in fields]
        self._progress = Progress(*columns, console=console, transient=True,
                                  disable=not enabled)
        self._task: TaskID = self._progress.add_task(desc, total=total, **fields)

    def update(self, *, completed: float | None = None, advance: float | None = None,
               total: float | None = None, description: str | None = None,
               **fields: Any) -> None:
        """Set how much is done (``completed``) or add to it (``advance``); ``total``,
        ``description`` and the extra fields change when given."""
        self._progress.update(self._task, completed=completed, advance=advance, total=total,
                              description=description, **fields)

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
