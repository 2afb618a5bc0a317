"""The commands that run one curation stage: ingest, labels, merge, dedup, quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from curate.core.manifest import Manifest
from curate.engine.runner import Stage, StageResult, make_params, run_stage
from curate.sources import READERS

from .options import (
    StageCommand,
    dry_run_option,
    given,
    json_option,
    open_context,
    parse_key_values,
    run_options,
    workspace_of,
    workspace_option,
)
from .output import show_results, stdout


@click.command(cls=StageCommand, stage_params="curate.stages.ingest:IngestParams",
               # KIND and PATH are arguments (PATH is the stage's own, not a parameter); the
               # source name is --name, and the reader options are repeated KEY=VALUE pairs.
               by_hand=("kind", "source", "options"))
@click.argument("kind", type=click.Choice(list(READERS)))
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", default="", help="Source name in the manifest (default: KIND).")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Reader option, e.g. -o format=coco (casting), -o release=boxes (kolektorsdd).")
@workspace_option
@run_options
@json_option
def ingest(kind: str, path: Path, name: str, options: tuple[str, ...], values: dict[str, Any],
           workspace: Path, seed: int, jobs: int, as_json: bool) -> None:
    """Read a source folder as distributed into a new manifest.

    Every file under PATH ends up in the manifest or in its inventory (unpaired, ignored,
    rejected, each with why). Images are hashed and their headers probed, not decoded.

    \b
    Example:
      curate ingest mtd ~/data/Magnetic-tile-defect-datasets. --workspace ws
      curate ingest casting ./casting -o format=voc -w ws
    """
    from curate.stages.ingest import Ingest

    params = make_params(Ingest, values | {
        "kind": kind, "source": name, "options": parse_key_values(options, "--option")})
    with open_context(workspace, seed=seed, jobs=jobs) as ctx:
        result = run_stage(Ingest(path), [], params, ctx)
    show_results([result], as_json)
    if not as_json:
        _show_inventory(result.manifest)


def _show_inventory(manifest: Manifest) -> None:
    for source, inv in manifest.header["inventory"].items():
        parts = [f"{inv['files']} files",
                 f"{len(inv['annotation_files'])} annotation files",
                 f"{len(inv['unpaired'])} unpaired", f"{len(inv['ignored'])} ignored",
                 f"{len(inv['rejected'])} rejected annotation entries"]
        stdout.print(f"{source}: " + ", ".join(parts) +
                     " (`curate manifest show` lists them)")


@click.command(cls=StageCommand, stage_params="curate.stages.labels:LabelsParams")
@click.argument("manifest", required=False)
@workspace_option
@run_options
@json_option
def labels(manifest: str | None, values: dict[str, Any], workspace: Path, seed: int, jobs: int,
           as_json: bool) -> None:
    """Turn every annotation (mask files, RLE, boxes, polygons) into a pixel mask.

    MANIFEST is an id, a unique prefix or 'latest' (default).

    \b
    Example:
      curate labels --workspace ws
    """
    from curate.stages.labels import Labels

    _run_one(Labels(), manifest, make_params(Labels, values), workspace, seed, jobs, as_json,
             dry_run=False)


@click.command()
@click.argument("manifests", nargs=-1, required=True)
@workspace_option
@run_options
@json_option
def merge(manifests: tuple[str, ...], workspace: Path, seed: int, jobs: int,
          as_json: bool) -> None:
    """Combine manifests of different sources into one.

    \b
    Example:
      curate merge 3f2a9c 81be07 --workspace ws
    """
    from curate.stages.merge import Merge, MergeParams

    with open_context(workspace, seed=seed, jobs=jobs, create=False) as ctx:
        inputs = [workspace_of(ctx).load(ref) for ref in manifests]
        result = run_stage(Merge(), inputs, MergeParams(), ctx)
    show_results([result], as_json)


@click.command(cls=StageCommand, stage_params="curate.stages.dedup:DedupParams")
@click.argument("manifest", required=False)
@dry_run_option
@workspace_option
@run_options
@json_option
def dedup(manifest: str | None, values: dict[str, Any], dry_run: bool, workspace: Path,
          seed: int, jobs: int, as_json: bool) -> None:
    """Drop exact and near-duplicate images (perceptual hashes, exact sub-quadratic search).

    Within each cluster of duplicates, the largest image is kept (then the sharpest, then
    the first by path); the others are dropped naming the kept one and the distance. Every
    sample also gets a group id (its near-duplicate component) for the train/test split.

    \b
    Example:
      curate dedup --transforms flips --dry-run -w ws
    """
    from curate.stages.dedup import Dedup, cluster_summary

    if not given("group_radius"):  # groups never split near duplicates
        values["group_radius"] = max(values["radius"], values["group_radius"])
    result = _run_one(Dedup(), manifest, make_params(Dedup, values), workspace, seed, jobs,
                      as_json, dry_run)
    if not as_json:
        s = cluster_summary(result.manifest)
        stdout.print(f"{s['clusters']} clusters of duplicates (largest {s['largest_cluster']}), "
                     f"{s['groups']} groups of more than one sample (largest "
                     f"{s['largest_group']})")


@click.command(cls=StageCommand, stage_params="curate.stages.quality:QualityParams",
               by_hand=("min_category",))  # a tuning knob, not on the command line
@click.argument("manifest", required=False)
@dry_run_option
@workspace_option
@run_options
@json_option
def quality(manifest: str | None, values: dict[str, Any], dry_run: bool, workspace: Path,
            seed: int, jobs: int, as_json: bool) -> None:
    """Drop blurred, over- or under-exposed, low-contrast and too small images.

    Every measured value is recorded; blur is judged against the category's own
    distribution (robust z-score).

    \b
    Example:
      curate quality --blur-z -3.5 --dry-run -w ws
    """
    from curate.stages.quality import Quality

    _run_one(Quality(), manifest, make_params(Quality, values), workspace, seed, jobs, as_json,
             dry_run)


def _run_one(stage: Stage, manifest: str | None, params: Any, workspace: Path, seed: int,
             jobs: int, as_json: bool, dry_run: bool) -> StageResult:
    """Run one single-input stage on MANIFEST and show the result (nothing saved if dry)."""
    with open_context(workspace, seed=seed, jobs=jobs, create=False) as ctx:
        result = run_stage(stage, [workspace_of(ctx).load(manifest)], params, ctx,
                           save=not dry_run)
    show_results([result], as_json, dry_run=dry_run)
    return result
