"""The ``curate`` command line: parse, call the library, show progress and results.

One module per command group (:mod:`.stages`, :mod:`.build`, :mod:`.manifest`, :mod:`.review`,
:mod:`.export`, :mod:`.bench`, :mod:`.sdas`, :mod:`.noise`); the options they share and the
stage options made from each stage's Params are in :mod:`.options`, what they print in
:mod:`.output`. Every command takes ``--json`` (machine-readable output on stdout), those that
read a workspace ``--workspace`` (default ``$CURATE_WORKSPACE`` or ``./curate-workspace``), and
those that run stages ``--seed``, ``--jobs``, ``--executor`` / ``--ray-address``.

Exit status: 0 done, 1 failed (one sentence on stderr saying what and where), 2 bad usage. The
one exit policy is :class:`CurateGroup`'s: a CurateError or an OSError of the environment (full
disk, no permission, ...) is one sentence; anything else is a bug and shows its traceback, as
every failure does with ``curate --debug`` (or ``CURATE_DEBUG=1``).
"""

from __future__ import annotations

import sys
import traceback
from typing import IO, Any

import click
from rich.markup import escape

from curate import __version__
from curate.core.errors import CurateError, UsageError
from curate.core.failure import environment_failure

from . import bench, build, export, manifest, noise, review, sdas, stages
from .output import stderr


class Failure(click.ClickException):
    """A failure the user can act on, on its way out: printed as one line, exit status 1."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        # One line whatever the message quotes (a library's error may span several).
        stderr.print(f"[bold red]error:[/] {escape(' '.join(self.message.split()))}",
                     highlight=False)


# ------------------------------------------------------------------------------- exit policy
class BadUsage(click.UsageError):
    """Bad usage, exit 2, in one line like every other failure: the message and where the
    help is, instead of click's three-line usage reminder."""

    def show(self, file: IO[Any] | None = None) -> None:
        where = f" (see `{self.ctx.command_path} --help`)" if self.ctx is not None else ""
        stderr.print(f"[bold red]error:[/] {escape(' '.join(self.format_message().split()))}"
                     f"{escape(where)}", highlight=False)


def _one_line_usage(exc: click.UsageError) -> BadUsage:
    if isinstance(exc, BadUsage):
        return exc
    return BadUsage(exc.format_message(), exc.ctx)


class CurateGroup(click.Group):
    """The top-level group, which every command's failure passes through: the one place that
    decides how it is shown (see :mod:`curate.core.failure`). A CurateError or an OSError of the
    environment becomes one sentence, exit 1 (a UsageError: exit 2, like click's own usage
    errors); anything else is a bug and keeps its traceback. With ``--debug`` every failure
    shows its traceback first."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (CurateError, OSError) as exc:
            if isinstance(exc, CurateError):
                shown: click.ClickException = (BadUsage(str(exc), ctx)
                                               if isinstance(exc, UsageError)
                                               else Failure(str(exc)))
            elif (sentence := environment_failure(exc)) is not None:
                shown = Failure(sentence)
            else:
                raise  # an OSError curate caused: a bug, shown with its traceback
            if ctx.params.get("debug"):
                click.echo("".join(traceback.format_exception(exc)), err=True, nl=False)
            raise shown from exc
        except click.ClickException as exc:
            if ctx.params.get("debug") and exc.__cause__ is not None:
                click.echo("".join(traceback.format_exception(exc)), err=True, nl=False)
            if isinstance(exc, click.UsageError):
                raise _one_line_usage(exc) from exc
            raise

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # The group's own options and the command name: the same one-line usage errors.
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _one_line_usage(exc) from exc


# ------------------------------------------------------------------------------- commands
@click.group(cls=CurateGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="curate")
@click.option("--debug", is_flag=True, envvar="CURATE_DEBUG",
              help="Show the traceback of every failure, not only of bugs (or set "
                   "CURATE_DEBUG=1).")
def cli(debug: bool) -> None:
    """Build, curate and benchmark industrial anomaly-detection datasets.

    \b
    Example (the real MTD data, then masks, then an MVTec-layout export):
      curate ingest mtd ~/data/Magnetic-tile-defect-datasets. -w ws
      curate labels -w ws
      curate export mvtec --out mtd-mvtec -w ws
    """


for command in (stages.ingest, stages.labels, stages.merge, stages.dedup, stages.quality,
                build.build_cmd, manifest.manifest_group, review.review_group,
                export.export_group, build.demo, build.card, bench.bench_cmd, sdas.sdas_group,
                noise.filter_noise):
    cli.add_command(command)


def main() -> None:
    """Run the command line. A failure the user can act on was already turned into one
    sentence (:class:`CurateGroup`); what reaches here is a bug: its traceback, then a line
    saying so, exit 1."""
    try:
        cli(prog_name="curate")
    except Exception:  # noqa: BLE001 - a bug, reported as one
        traceback.print_exc()
        stderr.print("[bold red]error:[/] this is a bug in curate: please report it with the "
                     "traceback above", highlight=False)
        sys.exit(1)

