"""The filter-noise command: remove anomalies hidden in a normal training set (SSFilter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from curate.core.optional import require
from curate.engine.progress import ProgressBar
from curate.engine.runner import make_params, run_stage

from .options import (
    StageCommand,
    json_option,
    open_context,
    run_options,
    workspace_of,
    workspace_option,
)
from .output import emit_json, show_results, stderr, stdout


@click.command("filter-noise", cls=StageCommand,
               stage_params="curate.stages.ssfilter.params:SSFilterParams",
               # Tuning knobs, not on the command line.
               by_hand=("sim_ratio", "image_ratio", "passes", "dropout"))
@click.argument("target", required=False)
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder mode: TARGET is a folder of images; write the clean folder here.")
@workspace_option
@run_options
@json_option
def filter_noise(target: str | None, out: Path | None, values: dict[str, Any], workspace: Path,
                 seed: int, jobs: int, as_json: bool) -> None:
    """Remove anomalies hidden in a normal training set (SSFilter).

    Every normal image is scored by how unlike the other images of its batch its patches
    are, over KAPPA1 shufflings; it is kept when judged normal more than KAPPA2 times.
    With --out, TARGET is a folder of images (never modified): OUT gets links to the kept
    images, ssfilter-report.csv and removed.png (most suspicious first). Without --out,
    TARGET is a manifest (default: latest): failing samples are dropped with reason
    noise_filter, and --hard-normals flags normal images for the test set.

    \b
    Example:
      curate filter-noise ./train/good --out ./train-clean --hard-normals 10
      curate filter-noise -w ws --hard-normals 20
    """
    SSFilter = require("curate.stages.ssfilter.stage", "curate filter-noise").SSFilter
    filter_folder = require("curate.stages.ssfilter.folder", "curate filter-noise").filter_folder
    if values["recall_tau"] < 0:  # the command line's way of saying None
        values["recall_tau"] = None
    params = make_params(SSFilter, values)
    if out is None:
        with open_context(workspace, seed=seed, jobs=jobs, create=False) as ctx:
            result = run_stage(SSFilter(), [workspace_of(ctx).load(target)], params, ctx)
        show_results([result], as_json)
        return
    if target is None:
        raise click.UsageError("folder mode needs the input FOLDER as TARGET")
    with ProgressBar(stderr, "ssfilter", None, enabled=not as_json) as bar:
        report = filter_folder(Path(target), out, params, seed, progress=lambda
                               what, done, total: bar.update(description=f"ssfilter: {what}",
                                                             completed=done, total=total))
    if as_json:
        emit_json(report.summary())
    else:
        stdout.print(f"{report.images} images: kept {report.kept}, removed {report.removed}, "
                     f"unreadable {report.unreadable}, hard normals {report.hard_normals}; "
                     f"report {report.report}" +
                     (f", removed images {report.sheet}" if report.sheet else ""),
                     highlight=False)
