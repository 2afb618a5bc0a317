"""The export commands: a manifest written out in the layout a tool reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from curate.export.mvtec import IMAGE_MODES

from .options import (
    copy_option,
    json_option,
    open_context,
    parallel_options,
    workspace_of,
    workspace_option,
)
from .output import emit_json, show_export, stdout
from .review import review_push


@click.group("export")
def export_group() -> None:
    """Write a manifest (any version: an id, a unique prefix, default the latest) out in the
    layout a tool reads.

    \b
    mvtec     the MVTec-AD tree (anomalib, most detectors)
    realnet   the MVTec tree plus RealNet's sample lists in realnet/
    realiad   the MVTec tree plus Real-IAD's JSON lists in realiad/
    fiftyone  a FiftyOne dataset for the App (the same as `curate review push`)

    Every file export is all or nothing, into a new or empty --out (or an earlier export
    with --overwrite).
    """


def _export_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every file export shares."""
    fn = click.option("--images", type=click.Choice(IMAGE_MODES), default="png",
                      show_default=True,
                      help="Re-encode images as PNG (what MVTec loaders glob for), or copy the "
                           "originals byte for byte in their own format (faster).")(fn)
    fn = click.option("--overwrite", is_flag=True,
                      help="Replace an earlier curate export of another manifest at --out "
                           "(one of the same manifest is replaced without it).")(fn)
    fn = copy_option(fn)
    fn = click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
                      help="Folder to write (must be new, empty, or an earlier export with "
                           "--overwrite).")(fn)
    return click.argument("manifest", required=False)(fn)


@export_group.command("mvtec")
@_export_options
@workspace_option
@parallel_options
@json_option
def export_mvtec_cmd(manifest: str | None, out: Path, overwrite: bool, images: str,
                     copy: bool, workspace: Path, jobs: int, as_json: bool) -> None:
    """MVTec-AD layout: <Category>/{train,test}/<label>/*.png + ground_truth masks.

    Kept samples only; a sample without a split goes to test, and a defective one always
    does (anomalib refuses defects under train/). Files are numbered per folder (000.png,
    000_mask.png) so images and masks pair by sorting; curate-export.json maps each file to
    its sample. A defective sample without a usable mask is skipped and listed. All or
    nothing: a failure leaves --out as it was.

    \b
    Example:
      curate export mvtec --out mtd-mvtec --workspace ws
    """
    from curate.export.mvtec import export_mvtec

    # Writes only to --out: a reader of the workspace, it neither takes nor waits for the lock.
    with open_context(workspace, jobs=jobs, create=False, write=False) as ctx:
        report = export_mvtec(workspace_of(ctx).load(manifest), out, ctx, overwrite=overwrite,
                              images=images, link=not copy)
    show_export(report, out, as_json)


def _export_with_lists(fmt: str, manifest: str | None, out: Path, overwrite: bool,
                       images: str, copy: bool, workspace: Path, jobs: int, as_json: bool
                       ) -> None:
    """The MVTec tree and ``fmt``'s sample lists into --out, as `curate build` writes them:
    the lists name files of the tree, so a list without its tree (or beside a tree of another
    manifest) could not be loaded."""
    from curate.app.build import export_manifest

    with open_context(workspace, jobs=jobs, create=False, write=False) as ctx:
        exports = export_manifest(workspace_of(ctx).load(manifest), ctx, out, [fmt],
                                  overwrite=overwrite, images=images, link=not copy)
    if as_json:
        emit_json(exports["mvtec"] | {"out": str(out), fmt: exports[fmt]})
        return
    show_export(exports["mvtec"], out, as_json=False)
    stdout.print(f"{fmt} sample lists: {len(exports[fmt])} files in {out / fmt}",
                 highlight=False)


@export_group.command("realnet")
@_export_options
@workspace_option
@parallel_options
@json_option
def export_realnet_cmd(manifest: str | None, out: Path, overwrite: bool, images: str, copy: bool,
                       workspace: Path, jobs: int, as_json: bool) -> None:
    """The MVTec-AD tree plus RealNet's sample lists (realnet/train_<Category>.json, ...).

    Point RealNet's image_dir at --out and its meta_file at --out/realnet/train_{}.json.

    \b
    Example (after a review round trip):
      curate export realnet --out mtd-realnet -w ws
    """
    _export_with_lists("realnet", manifest, out, overwrite, images, copy, workspace, jobs,
                       as_json)


@export_group.command("realiad")
@_export_options
@workspace_option
@parallel_options
@json_option
def export_realiad_cmd(manifest: str | None, out: Path, overwrite: bool, images: str, copy: bool,
                       workspace: Path, jobs: int, as_json: bool) -> None:
    """The MVTec-AD tree plus Real-IAD's JSON lists (realiad/<Category>.json).

    \b
    Example:
      curate export realiad --out mtd-realiad -w ws
    """
    _export_with_lists("realiad", manifest, out, overwrite, images, copy, workspace, jobs,
                       as_json)


# The FiftyOne dataset is an export like the others: the same command under this group.
export_group.add_command(review_push, "fiftyone")
