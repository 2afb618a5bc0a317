"""The ``curate`` command line: parse, call the library, show progress and results.

Every command takes ``--workspace`` (default ``$CURATE_WORKSPACE`` or ``./curate-workspace``),
``--seed``, ``--jobs``, ``--executor`` / ``--ray-address`` and ``--json`` (machine-readable output
on stdout). Exit status: 0 done,
1 failed (one sentence on stderr saying what and where), 2 bad usage. The one exit policy is
:class:`CurateGroup`'s: a CurateError or an OSError of the environment (full disk, no
permission, ...) is one sentence; anything else is a bug and shows its traceback, as every
failure does with ``curate --debug`` (or ``CURATE_DEBUG=1``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from curate import __version__
from curate.core.errors import CurateError, UsageError
from curate.core.failure import environment_failure
from curate.core.manifest import Manifest, diff
from curate.core.optional import require
from curate.engine.runner import (
    EXECUTORS,
    Context,
    StageResult,
    default_jobs,
    make_params,
    run_stage,
)
from curate.engine.workspace import Workspace

# Wide tables when the output goes to a file or a pipe (rich would assume 80 columns).
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, soft_wrap=True)


class Failure(click.ClickException):
    """A failure the user can act on, on its way out: printed as one line, exit status 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        # One line whatever the message quotes (a library's error may span several).
        stderr.print(f"[bold red]error:[/] {escape(' '.join(self.message.split()))}",
                     highlight=False)


def common_options(fn: Callable) -> Callable:
    """--workspace --seed --jobs --executor --ray-address --ray-data --json on every command.
    The executor options are kept on the click context for :func:`_context` (every command
    that runs stages builds its Context there)."""

    @click.option("--workspace", "-w", type=click.Path(file_okay=False, path_type=Path),
                  default=lambda: os.environ.get("CURATE_WORKSPACE", "curate-workspace"),
                  show_default="$CURATE_WORKSPACE or ./curate-workspace",
                  help="Folder holding manifests, artifact store and cache.")
    @click.option("--seed", type=int, default=0, show_default=True,
                  help="Seed for every random choice (same seed, same manifests).")
    @click.option("--jobs", "-j", type=click.IntRange(min=1), default=default_jobs,
                  show_default="number of CPUs, at most 8", help="Worker processes.")
    @click.option("--executor", type=click.Choice(EXECUTORS), default=None,
                  show_default="process with --jobs > 1, else local",
                  help="Where per-sample work runs: inline, a process pool, or Ray tasks.")
    @click.option("--ray-address", default=None, metavar="ADDRESS",
                  help="Ray cluster to join with --executor ray (e.g. 'auto' or "
                       "'ray://head:10001'); default: a local Ray runtime.")
    @click.option("--ray-data", is_flag=True,
                  help="With --executor ray: workers read each saved input manifest through "
                       "Ray Data (read_parquet -> map_batches) instead of receiving its rows "
                       "as tasks.")
    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
    @functools.wraps(fn)
    def wrapper(*args, executor, ray_address, ray_data, **kwargs):
        meta = click.get_current_context().meta
        meta["curate.executor"], meta["curate.ray_address"] = executor, ray_address
        meta["curate.ray_data"] = ray_data
        return fn(*args, **kwargs)

    return wrapper


def _context(workspace: Path, seed: int, jobs: int, *, create: bool = True,
             write: bool = True) -> Context:
    """The Context a command runs in. A command that writes the workspace holds its lock
    until the context closes: from before it reads HEAD until after it moved it, so that a
    second writer waits instead of losing a result (see curate.core.lock). Readers (``write=False``)
    never take it nor wait for it."""
    click_ctx = click.get_current_context(silent=True)
    meta = click_ctx.meta if click_ctx is not None else {}
    ctx = Context(Workspace.open(workspace, create=create), jobs=jobs, seed=seed,
                  console=stderr, executor=meta.get("curate.executor"),
                  ray_address=meta.get("curate.ray_address"),
                  ray_data=meta.get("curate.ray_data", False))
    if write:
        try:
            ctx.lock_workspace(shlex.join(["curate", *sys.argv[1:]]))
        except BaseException:
            ctx.close()
            raise
    return ctx


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=1, sort_keys=True, default=str))


def _show_results(results: list[StageResult], as_json: bool, dry_run: bool = False) -> None:
    if as_json:
        _emit_json([r.summary() | {"dry_run": dry_run} for r in results])
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


def _given(option: str) -> bool:
    """Whether the user gave ``option`` (on the command line or in its environment variable)
    rather than leaving it at its default."""
    source = click.get_current_context().get_parameter_source(option)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        options[key] = yaml.safe_load(value) if value else ""
    return options


# ------------------------------------------------------------------------------- exit policy
class BadUsage(click.UsageError):
    """Bad usage, exit 2, in one line like every other failure: the message and where the
    help is, instead of click's three-line usage reminder."""

    def show(self, file=None) -> None:
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


@cli.command()
@click.argument("kind", type=click.Choice(["kolektorsdd", "kolektorsdd2", "mtd", "severstal",
                                           "casting", "mvtec"]))
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", default="", help="Source name in the manifest (default: KIND).")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Reader option, e.g. -o format=coco (casting), -o release=boxes (kolektorsdd).")
@common_options
def ingest(kind, path, name, options, workspace, seed, jobs, as_json):
    """Read a source folder as distributed into a new manifest.

    Every file under PATH ends up in the manifest or in its inventory (unpaired, ignored,
    rejected, each with why). Images are hashed and their headers probed, not decoded.

    \b
    Example:
      curate ingest mtd ~/data/Magnetic-tile-defect-datasets. --workspace ws
      curate ingest casting ./casting -o format=voc -w ws
    """
    from curate.stages.ingest import Ingest, IngestParams

    params = IngestParams(kind=kind, source=name, options=_parse_options(options))
    with _context(workspace, seed, jobs) as ctx:
        result = run_stage(Ingest(path), [], params, ctx)
    _show_results([result], as_json)
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


@cli.command()
@click.argument("manifest", required=False)
@click.option("--threshold", default="auto", show_default=True,
              help="Mask binarisation: 'auto' (127, or 0 for 0/1 masks) or 0..254.")
@click.option("--tolerance", type=float, default=1.0, show_default=True,
              help="Pixels a box or polygon may overshoot the image.")
@common_options
def labels(manifest, threshold, tolerance, workspace, seed, jobs, as_json):
    """Turn every annotation (mask files, RLE, boxes, polygons) into a pixel mask.

    MANIFEST is an id, a unique prefix or 'latest' (default).

    \b
    Example:
      curate labels --workspace ws
    """
    from curate.stages.labels import Labels

    values = {"threshold": threshold if threshold == "auto" else _int(threshold, "--threshold"),
              "tolerance": tolerance}
    _run_one(Labels(), manifest, make_params(Labels, values), workspace, seed, jobs, as_json,
             dry_run=False)


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or an integer, got {value!r}",
                                 param_hint=name) from None


@cli.command()
@click.argument("manifests", nargs=-1, required=True)
@common_options
def merge(manifests, workspace, seed, jobs, as_json):
    """Combine manifests of different sources into one.

    \b
    Example:
      curate merge 3f2a9c 81be07 --workspace ws
    """
    from curate.stages.merge import Merge, MergeParams

    with _context(workspace, seed, jobs, create=False) as ctx:
        inputs = [ctx.workspace.load(ref) for ref in manifests]
        result = run_stage(Merge(), inputs, MergeParams(), ctx)
    _show_results([result], as_json)


class StageDefault(click.Option):
    """An option whose default is the same-named field of a stage's Params dataclass
    (``params="module:Class"``): the value is stated once, in the stage, and read only when
    needed, since stage modules are slow to import."""

    def __init__(self, *args: Any, params: str, **kwargs: Any):
        super().__init__(*args, show_default=True, **kwargs)
        self.params = params

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        module, name = self.params.split(":")
        (field,) = (f for f in dataclasses.fields(getattr(importlib.import_module(module), name))
                    if f.name == self.name)
        return field.default


_DEDUP = "curate.stages.dedup:DedupParams"


@cli.command()
@click.argument("manifest", required=False)
@click.option("--method", type=click.Choice(["phash", "dhash", "whash"]), cls=StageDefault,
              params=_DEDUP, help="Perceptual hash.")
@click.option("--radius", type=click.IntRange(0, 32), cls=StageDefault, params=_DEDUP,
              help="Largest Hamming distance (of 64 bits) between near duplicates.")
@click.option("--transforms", type=click.Choice(["none", "flips", "dihedral"]),
              cls=StageDefault, params=_DEDUP, help="Also match flipped (flips) or flipped and "
                                                    "rotated (dihedral) copies.")
@click.option("--group-radius", type=click.IntRange(0, 32), cls=StageDefault, params=_DEDUP,
              help="Distance that puts images in one split group (when not given: at least "
                   "--radius).")
@click.option("--across-labels", is_flag=True,
              help="Let samples with different labels be duplicates of each other.")
@click.option("--keep-near", is_flag=True,
              help="Only cluster and group near duplicates; drop exact duplicates alone.")
@click.option("--decode", type=click.Choice(["full", "reduced"]), cls=StageDefault,
              params=_DEDUP,
              help="full: hash exactly what imagehash hashes; reduced: decode JPEGs at 1/2-1/8 "
                   "scale (faster, hashes a few bits off imagehash's).")
@click.option("--dry-run", is_flag=True, help="Report what would be dropped; write nothing.")
@common_options
def dedup(manifest, method, radius, transforms, group_radius, across_labels, keep_near, decode,
          dry_run, workspace, seed, jobs, as_json):
    """Drop exact and near-duplicate images (perceptual hashes, exact sub-quadratic search).

    Within each cluster of duplicates, the largest image is kept (then the sharpest, then
    the first by path); the others are dropped naming the kept one and the distance. Every
    sample also gets a group id (its near-duplicate component) for the train/test split.

    \b
    Example:
      curate dedup --transforms flips --dry-run -w ws
    """
    from curate.stages.dedup import Dedup, cluster_summary

    if not _given("group_radius"):  # groups never split near duplicates
        group_radius = max(radius, group_radius)
    params = make_params(Dedup, {
        "method": method, "radius": radius, "transforms": transforms,
        "group_radius": group_radius,
        "across_labels": across_labels, "drop_near": not keep_near, "decode": decode})
    result = _run_one(Dedup(), manifest, params, workspace, seed, jobs, as_json, dry_run)
    if not as_json:
        s = cluster_summary(result.manifest)
        stdout.print(f"{s['clusters']} clusters of duplicates (largest {s['largest_cluster']}), "
                     f"{s['groups']} groups of more than one sample (largest "
                     f"{s['largest_group']})")


@cli.command()
@click.argument("manifest", required=False)
@click.option("--min-side", type=click.IntRange(min=1), default=64, show_default=True,
              help="Smallest acceptable shorter side, in pixels.")
@click.option("--blur-z", type=float, default=-3.0, show_default=True,
              help="Drop when sharpness is this many robust deviations below the category's "
                   "median.")
@click.option("--max-clipped", type=click.FloatRange(0, 1, min_open=True), default=0.4,
              show_default=True, help="Largest fraction of pixels at <= 5 or >= 250.")
@click.option("--min-contrast", type=float, default=16.0, show_default=True,
              help="Smallest 1st-to-99th percentile range of grey levels.")
@click.option("--dry-run", is_flag=True, help="Report what would be dropped; write nothing.")
@common_options
def quality(manifest, min_side, blur_z, max_clipped, min_contrast, dry_run, workspace, seed,
            jobs, as_json):
    """Drop blurred, over- or under-exposed, low-contrast and too small images.

    Every measured value is recorded; blur is judged against the category's own
    distribution (robust z-score).

    \b
    Example:
      curate quality --blur-z -3.5 --dry-run -w ws
    """
    from curate.stages.quality import Quality

    params = make_params(Quality, {"min_side": min_side, "blur_z": blur_z,
                                   "max_clipped": max_clipped, "min_contrast": min_contrast})
    _run_one(Quality(), manifest, params, workspace, seed, jobs, as_json, dry_run)


def _run_one(stage, manifest, params, workspace, seed, jobs, as_json, dry_run) -> StageResult:
    """Run one single-input stage on MANIFEST and show the result (nothing saved if dry)."""
    with _context(workspace, seed, jobs, create=False) as ctx:
        result = run_stage(stage, [ctx.workspace.load(manifest)], params, ctx,
                           save=not dry_run)
    _show_results([result], as_json, dry_run=dry_run)
    return result


@cli.command("build")
@click.argument("recipe")
@click.option("--sources", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding the downloaded sources (found by folder name or layout).")
@click.option("--source", "explicit", multiple=True, metavar="KIND=PATH",
              help="Where one source is, e.g. --source mtd=~/data/MTD (wins over --sources).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Export folder  [default: ./<recipe name>]")
@click.option("--no-card", is_flag=True, help="Skip the dataset card.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier curate export of another manifest at --out (one of "
                   "the same manifest is replaced without it).")
@common_options
def build_cmd(recipe, sources, explicit, out, no_card, overwrite, workspace, seed, jobs,
              as_json):
    """Build a dataset from a recipe: ingest, curate, split, export, card.

    RECIPE is a built-in name (hss-iad) or a YAML file; its seed is used unless --seed is
    given. Missing sources are reported and skipped. Every stage is cached: rerun after a crash (or a changed parameter) and only
    what is not done yet runs.

    \b
    Example:
      curate build hss-iad --sources ~/downloads -w ws --out hss-iad
    """
    from curate.app.build import build, export_all
    from curate.app.recipe import load_recipe

    r = load_recipe(recipe)
    pairs = _parse_options(explicit)
    if not _given("seed"):  # the recipe's seed, unless --seed (even --seed 0) says otherwise
        seed = r.seed
    with _context(workspace, seed, jobs) as ctx:
        result = build(r, ctx, sources, {k: Path(str(v)).expanduser() for k, v in pairs.items()})
        exports = export_all(result, r, ctx, out or Path(r.name), card=not no_card,
                             overwrite=overwrite)
    if as_json:
        _emit_json({"recipe": r.name, "manifest": result.manifest.id, "sources": result.sources,
                    "missing": result.missing, "stages": [s.summary() for s in result.stages],
                    "exports": exports})
        return
    for kind, path in result.sources.items():
        stdout.print(f"source {kind}: {path}", highlight=False)
    for kind, why in result.missing.items():
        stdout.print(f"[yellow]missing[/] {kind}: {why}", highlight=False)
    _show_results(result.stages, as_json=False)
    _show_export(exports["mvtec"], out or Path(r.name), as_json=False)
    for fmt in ("realnet", "realiad"):
        if fmt in exports:
            stdout.print(f"{fmt} sample lists: {len(exports[fmt])} files")
    if "card" in exports:
        stdout.print(f"dataset card: {exports['card']}")


# ------------------------------------------------------------------------------- manifest
@cli.group("manifest")
def manifest_group() -> None:
    """List, show, diff and verify manifests."""


@manifest_group.command("list")
@common_options
def manifest_list(workspace, seed, jobs, as_json):
    """All manifests in the workspace, oldest first (* marks the latest).

    Banks and blends (`curate sdas`) are side products: never the latest.

    \b
    Example:
      curate manifest list --workspace ws
    """
    ws = Workspace.open(workspace, create=False)
    infos = ws.list()
    head = ws.head()
    # A damaged manifest does not hide the others (listing is how one looks into a damaged
    # workspace): it is listed as unreadable, named on stderr, and the exit status is 1.
    if as_json:
        _emit_json([vars(i) | {"latest": i.id == head} for i in infos])
    else:
        table = Table()
        for col in ("", "id", "stage", "parents", "samples", "kept", "dropped", "created"):
            table.add_column(col)
        for i in infos:
            if i.problem:
                table.add_row("*" if i.id == head else "", i.id, "[red]unreadable[/]",
                              "-", "-", "-", "-", "-")
                continue
            stage = f"{i.stage} (side product)" if i.side_product else i.stage
            table.add_row("*" if i.id == head else "", i.id, stage,
                          " ".join(p[:12] for p in i.parents) or "-", str(i.samples),
                          str(i.kept), str(i.dropped), i.created_at[:19].replace("T", " "))
        stdout.print(table)
    damaged = [i for i in infos if i.problem]
    for i in damaged:
        stderr.print(f"[bold red]error:[/] {escape(i.problem)}", highlight=False)
    if damaged:
        sys.exit(1)


@manifest_group.command("show")
@click.argument("manifest", required=False)
@click.option("--rows", "n_rows", type=click.IntRange(min=0), default=0,
              help="Also print the first N rows.")
@common_options
def manifest_show(manifest, n_rows, workspace, seed, jobs, as_json):
    """Header, counts and inventory of one manifest (default: the latest).

    \b
    Example:
      curate manifest show latest --rows 5 --workspace ws
    """
    m = Workspace.open(workspace, create=False).load(manifest)
    rows = [r for _, r in zip(range(n_rows), m.rows(), strict=False)]
    if as_json:
        _emit_json({"header": m.header, "roots": m.roots, "rows": rows})
        return
    h = m.header
    stdout.print(f"[bold]{m.id}[/]  stage {h['stage']['name']} v{h['stage']['version']}  "
                 f"params {json.dumps(h['stage']['params'], sort_keys=True)}")
    stdout.print(f"parents: {', '.join(h['parents']) or '-'}   seed: {h['seed']}")
    for name, spec in h["sources"].items():
        stdout.print(f"source {name}: {spec['kind']} {json.dumps(spec['options'])} at "
                     f"{m.roots.get(name, '?')}")
    c = h["counts"]
    stdout.print(f"samples {c['samples']}: kept {c['kept']}, dropped {c['dropped']}")
    for code, n in c["reasons"].items():
        stdout.print(f"  dropped {code}: {n}")
    for code, n in c["flags"].items():
        stdout.print(f"  flagged {code}: {n}")
    for category, labels_ in c["kept_by_category"].items():
        stdout.print(f"  {category}: " + ", ".join(f"{k} {v}" for k, v in labels_.items()))
    for source, inv in h["inventory"].items():
        for kind in ("unpaired", "ignored", "rejected"):
            for entry in inv[kind]:
                stdout.print(f"  {source} {kind}: {entry['path']} ({entry['why']})",
                             highlight=False)
    for row in rows:
        stdout.print(json.dumps(row, sort_keys=True), highlight=False)


@manifest_group.command("diff")
@click.argument("old")
@click.argument("new", required=False)
@common_options
def manifest_diff(old, new, workspace, seed, jobs, as_json):
    """Samples added, removed and changed (field by field) from OLD to NEW (default: latest).

    \b
    Example:
      curate manifest diff 3f2a9c latest --workspace ws
    """
    ws = Workspace.open(workspace, create=False)
    d = diff(ws.load(old), ws.load(new))
    if as_json:
        _emit_json(d)
        return
    stdout.print(f"{d['old']} -> {d['new']}: {len(d['added'])} added, "
                 f"{len(d['removed'])} removed, {len(d['changed'])} changed")
    for kind in ("added", "removed"):
        for r in d[kind]:
            stdout.print(f"  {kind} {r['source']}:{r['path']}", highlight=False)
    for c in d["changed"]:
        fields = ", ".join(f"{k}: {_brief(v['old'])} -> {_brief(v['new'])}"
                           for k, v in c["changes"].items())
        stdout.print(f"  changed {c['source']}:{c['path']}  {fields}", highlight=False)


def _brief(value: Any, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"


@manifest_group.command("verify")
@click.argument("manifest", required=False)
@click.option("--no-originals", is_flag=True,
              help="Skip re-hashing the original files (manifest and store only).")
@common_options
def manifest_verify(manifest, no_originals, workspace, seed, jobs, as_json):
    """Check a manifest's integrity, its artifacts and (by default) the original files.

    Exit status 1 if anything is wrong.

    \b
    Example:
      curate manifest verify latest --workspace ws
    """
    from curate.engine.verify import verify

    with _context(workspace, seed, jobs, create=False, write=False) as ctx:
        m = ctx.workspace.load(manifest)
        problems = verify(m, ctx, originals=not no_originals)
    if as_json:
        _emit_json({"manifest": m.id, "ok": not problems, "problems": problems})
    elif problems:
        for p in problems:
            stderr.print(f"[red]problem:[/] {p}", highlight=False)
    else:
        stdout.print(f"manifest {m.id}: OK ({len(m)} samples"
                     f"{'' if no_originals else ', originals re-hashed'})")
    if problems:
        sys.exit(1)


# ------------------------------------------------------------------------------- review
@cli.group("review")
def review_group() -> None:
    """Review a manifest in the FiftyOne App and pull the decisions back.

    \b
    Tags reviewers use: drop, keep, mask-bad, relabel:<label>, move:train,
    move:test, category:<name>.
    """


@review_group.command("push")
@click.argument("manifest", required=False)
@click.option("--name", default=None, help="Dataset name  [default: curate-<ws>-<manifest>]")
@common_options
def review_push(manifest, name, workspace, seed, jobs, as_json):
    """Push a manifest (default: the latest) to a persistent FiftyOne dataset.

    Images stay where they are; masks and foregrounds come from the store. Pushing again adds
    only what is missing and keeps the reviewers' tags.

    \b
    Example:
      curate review push -w ws
    """
    from curate.export.fiftyone import push

    ws = Workspace.open(workspace, create=False)
    result = push(ws, ws.load(manifest), name)
    if as_json:
        _emit_json(vars(result))
        return
    stdout.print(f"dataset {result.dataset}: manifest {result.manifest[:12]}, {result.added} "
                 f"samples added, {result.already_there} already there; saved views: "
                 f"{', '.join(result.views) or 'none'}")
    stdout.print(f"next: curate review open {result.dataset} -w {workspace}")


@review_group.command("open")
@click.argument("name")
@click.option("--port", type=click.IntRange(1, 65535), default=5151, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Interface to serve on (loopback: only this machine can connect).")
@common_options
def review_open(name, port, address, workspace, seed, jobs, as_json):
    """Serve the FiftyOne App for a pushed dataset and print its URL (Ctrl-C to stop).

    \b
    Example:
      curate review open curate-3f2a9c01-81be07d2c4aa --port 5151
    """
    from curate.export.fiftyone import launch

    session = launch(name, port=port, address=address)
    url = f"http://{address}:{port}/datasets/{name}"
    if as_json:
        _emit_json({"url": url, "dataset": name})
    else:
        stdout.print(f"FiftyOne App for {name}: {url}  (Ctrl-C to stop)")
    sys.stdout.flush()
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        pass


@review_group.command("pull")
@click.argument("name")
@common_options
def review_pull(name, workspace, seed, jobs, as_json):
    """Turn the reviewers' tags of a dataset into a new manifest (stage review).

    Unknown or contradictory tags stop the pull, naming them and the samples.

    \b
    Example:
      curate review pull curate-3f2a9c01-81be07d2c4aa -w ws
    """
    from curate.stages.review import pull

    with _context(workspace, seed, jobs, create=False) as ctx:
        result = pull(ctx, name)
    _show_results([result], as_json)


# ------------------------------------------------------------------------------- export
@cli.group("export")
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


def _export_options(fn: Callable) -> Callable:
    """The options every file export shares."""
    fn = click.option("--images", type=click.Choice(["png", "keep"]), default="png",
                      show_default=True,
                      help="Re-encode images as PNG (what MVTec loaders glob for), or copy the "
                           "originals byte for byte in their own format (faster).")(fn)
    fn = click.option("--overwrite", is_flag=True,
                      help="Replace an earlier curate export of another manifest at --out "
                           "(one of the same manifest is replaced without it).")(fn)
    fn = click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
                      help="Folder to write (must be new, empty, or an earlier export with "
                           "--overwrite).")(fn)
    return click.argument("manifest", required=False)(fn)


@export_group.command("mvtec")
@_export_options
@common_options
def export_mvtec_cmd(manifest, out, overwrite, images, workspace, seed, jobs, as_json):
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
    with _context(workspace, seed, jobs, create=False, write=False) as ctx:
        report = export_mvtec(ctx.workspace.load(manifest), out, ctx, overwrite=overwrite,
                              images=images)
    _show_export(report, out, as_json)


def _export_with_lists(fmt: str, manifest, out, overwrite, images, workspace, seed, jobs,
                       as_json) -> None:
    """The MVTec tree and ``fmt``'s sample lists into --out, as `curate build` writes them:
    the lists name files of the tree, so a list without its tree (or beside a tree of another
    manifest) could not be loaded."""
    from curate.app.build import export_manifest

    with _context(workspace, seed, jobs, create=False, write=False) as ctx:
        exports = export_manifest(ctx.workspace.load(manifest), ctx, out, [fmt],
                                  overwrite=overwrite, images=images)
    if as_json:
        _emit_json(exports["mvtec"] | {"out": str(out), fmt: exports[fmt]})
        return
    _show_export(exports["mvtec"], out, as_json=False)
    stdout.print(f"{fmt} sample lists: {len(exports[fmt])} files in {out / fmt}",
                 highlight=False)


@export_group.command("realnet")
@_export_options
@common_options
def export_realnet_cmd(manifest, out, overwrite, images, workspace, seed, jobs, as_json):
    """The MVTec-AD tree plus RealNet's sample lists (realnet/train_<Category>.json, ...).

    Point RealNet's image_dir at --out and its meta_file at --out/realnet/train_{}.json.

    \b
    Example (after a review round trip):
      curate export realnet --out mtd-realnet -w ws
    """
    _export_with_lists("realnet", manifest, out, overwrite, images, workspace, seed, jobs,
                       as_json)


@export_group.command("realiad")
@_export_options
@common_options
def export_realiad_cmd(manifest, out, overwrite, images, workspace, seed, jobs, as_json):
    """The MVTec-AD tree plus Real-IAD's JSON lists (realiad/<Category>.json).

    \b
    Example:
      curate export realiad --out mtd-realiad -w ws
    """
    _export_with_lists("realiad", manifest, out, overwrite, images, workspace, seed, jobs,
                       as_json)


# The FiftyOne dataset is an export like the others: the same command under this group.
export_group.add_command(review_push, "fiftyone")


def _show_export(report: dict[str, Any], out: Path, as_json: bool) -> None:
    if as_json:
        _emit_json({k: v for k, v in report.items() if k != "files"} | {"out": str(out)})
        return
    stdout.print(f"exported {report['written']} samples of manifest {report['manifest'][:12]} "
                 f"to {out}")
    for category, splits in report["counts"].items():
        for split, labels_ in splits.items():
            stdout.print(f"  {category}/{split}: " +
                         ", ".join(f"{k} {v}" for k, v in labels_.items()))
    for s in report["skipped"]:
        stdout.print(f"  [yellow]skipped[/] {s['path']}: {s['why']}", highlight=False)


# ------------------------------------------------------------------------------- demo
@cli.command()
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo"), show_default=True,
              help="Folder for the generated sources, the workspace and the export.")
@click.option("--mtd", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None,
              help="Build from the real MTD in this folder  [default: the generated sample; "
                   "run from the root of a curate checkout, the real MTD of the development "
                   "data beside it when there]")
@click.option("--no-mtd", is_flag=True, help="Use only the generated MTD sample.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the generated samples (the build itself uses the recipe's seed, "
                   "as `curate build` does).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=default_jobs,
              show_default="number of CPUs, at most 8", help="Worker processes.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def demo(out, mtd, no_mtd, seed, jobs, as_json):
    """Build HSS-IAD end to end on a small generated sample of every source.

    Generates tiny datasets in the original layouts of KolektorSDD, KolektorSDD2, MTD,
    Severstal and Casting under OUT/sources and runs `curate build hss-iad` on them: ingest,
    dedup, quality, foreground, labels, label filter, casting reclassification, split;
    exports the MVTec layout, RealNet and Real-IAD lists and the dataset card to OUT/export,
    and verifies the result. The workspace is OUT/workspace. The real MTD replaces the
    generated one with --mtd PATH (or, run from the root of a curate checkout, the
    development data beside it); the demo says which MTD it used.

    \b
    Example:
      curate demo --out demo
    """
    from curate.app.demo import RECIPE, choose_mtd, run_demo
    from curate.app.recipe import load_recipe

    mtd, which_mtd = choose_mtd(mtd, no_mtd)
    recipe = load_recipe(RECIPE)
    if not as_json:
        stdout.print(which_mtd, highlight=False)
    with _context(out / "workspace", recipe.seed, jobs) as ctx:
        result = run_demo(ctx, out, mtd=mtd, seed=seed, recipe=recipe)
    b = result.build
    if as_json:
        _emit_json({"manifest": b.manifest.id, "mtd": which_mtd, "sources": b.sources,
                    "missing": b.missing,
                    "stages": [s.summary() for s in b.stages], "exports": b.exports,
                    "problems": result.problems})
    else:
        _show_results(b.stages, as_json=False)
        _show_export(b.exports["mvtec"], out / "export", as_json=False)
        stdout.print(f"dataset card: {b.exports.get('card')}")
        verdict = "OK" if not result.problems else f"{len(result.problems)} problems"
        stdout.print(f"verify: {verdict}; workspace {out / 'workspace'}")
        for p in result.problems:
            stderr.print(f"[red]problem:[/] {p}", highlight=False)
    if result.problems:
        sys.exit(1)


# ------------------------------------------------------------------------------- card
@cli.command()
@click.argument("manifest", required=False)
@click.option("--export", "export_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="A folder written by `curate export mvtec`.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for card.md and its plots in card/  [default: the export folder]")
@click.option("--recipe", default=None,
              help="The recipe (name or YAML file) that built the manifest: the card names it "
                   "and lists the recipe's sources the manifest lacks.")
@common_options
def card(manifest, export_dir, out, recipe, workspace, seed, jobs, as_json):
    """Write a dataset card (card.md, plots in card/) describing an export.

    Images per category and split, defect areas and defect aspect ratios (as in Fig. 4 of
    the HSS-IAD paper), what curation dropped or flagged and why, and every source's
    licence and citation. MANIFEST is an id, a unique prefix or 'latest'; by default the
    manifest the export was written from.

    \b
    Example:
      curate card --export mtd-mvtec --workspace ws
    """
    from curate.app.recipe import load_recipe
    from curate.export.card import missing_sources, write_card
    from curate.export.index import read_report

    ws = Workspace.open(workspace, create=False)
    if manifest is None:
        manifest = read_report(export_dir)["manifest"]
    m = ws.load(manifest)
    r = load_recipe(recipe) if recipe else None
    path = write_card(m, export_dir, ws.store, out, recipe=r and r.name,
                      missing=r and missing_sources([s.kind for s in r.sources], m))
    if as_json:
        _emit_json({"card": str(path), "manifest": m.id, "export": str(export_dir)})
    else:
        stdout.print(f"wrote the dataset card of manifest {m.id[:12]} to {path}")

# ------------------------------------------------------------------------------- bench
@cli.command("bench")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--detector", "-d", type=click.Choice(["dinomaly", "cras", "realnet"]),
              default="dinomaly", show_default=True, help="Bundled detector to train and evaluate.")
@click.option("--protocol", type=click.Choice(["multi-class", "class-separated"]),
              default="multi-class", show_default=True,
              help="One model for all categories (Table III) or one per category (Table IV).")
@click.option("--backbone", default=None, help="Backbone name (default: the detector's paper "
              "backbone, e.g. dinov2_vitb14_reg, wide_resnet50_2).")
@click.option("--weights", default=None, help="Backbone weight file or folder (default: the "
              "local torch / Hugging Face caches; 'random' for a pipeline test).")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Training iterations (default: the paper's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Training batch size (default: the paper's).")
@click.option("--category", "categories", multiple=True, help="Only these categories.")
@click.option("--eval-size", type=click.IntRange(min=8), default=256, show_default=True,
              help="Maps and masks are scored on this square size.")
@click.option("--device", default=None, help="torch device (default: cuda if present).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Detector option, e.g. --option dropout=0.4.")
@click.option("--out", "-o", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench-results"), show_default=True,
              help="Folder for the Markdown, CSV and JSON tables.")
@click.option("--save-models", is_flag=True, help="Also save the trained detectors to --out.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random choice.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="Train here, or each model as a Ray task (with "
              "--device cuda each task asks Ray for one GPU, so the class-separated models "
              "train on a cluster's GPUs at once; the export and --out must be on storage "
              "every node sees).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Ray cluster to join with --executor ray; default: a local Ray runtime.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def bench_cmd(export_dir, detector, protocol, backbone, weights, iterations, batch_size,
              categories, eval_size, device, options, out, save_models, seed, executor,
              ray_address, as_json):
    """Train a bundled detector on an MVTec-layout export and score it (HSS-IAD Tables III/IV).

    Per category and averaged: I-AUROC, I-AP, I-F1max, P-AUROC, P-AP, P-F1max, AUPRO@0.3.
    Writes bench-<detector>-<protocol>.{md,csv,json} to --out, with the curate version and
    commit, backbone weights hash, seed and device. The last training state is evaluated.

    \b
    Example:
      curate bench hss-iad/export --detector dinomaly --protocol multi-class \\
          --weights ~/weights/dinov2_vitb14_reg4_pretrain.pth
    """
    require("torch", "curate bench")
    from detectors.backbones import WeightsNotFoundError
    from detectors.bench import run_bench
    from detectors.data import DatasetError
    from detectors.errors import DetectorConfigError

    gpus = 1 if (device or "").startswith("cuda") else 0
    try:
        with Context(None, executor=executor, ray_address=ray_address, console=stderr) as ctx:
            result = run_bench(
                export_dir.absolute(), detector, protocol, backbone=backbone, weights=weights,
                seed=seed, device=device, iterations=iterations, batch_size=batch_size,
                categories=list(categories) or None, eval_size=eval_size,
                options=_parse_options(options), progress=not as_json,
                models_dir=out.absolute() if save_models else None,
                run_jobs=lambda fn, jobs: ctx.tasks(fn, jobs, num_gpus=gpus, desc="bench"))
    except (DatasetError, WeightsNotFoundError, DetectorConfigError) as exc:
        # The user's mistakes (export, weights, options); any other error is a bug.
        raise Failure(str(exc)) from exc
    paths = result.write(out)
    if as_json:
        _emit_json(result.to_json() | {"files": {k: str(v) for k, v in paths.items()}})
    else:
        stdout.print(result.markdown(), markup=False, highlight=False)
        stdout.print("wrote " + ", ".join(str(p) for p in paths.values()))


# ------------------------------------------------------------------------------- sdas
@cli.group("sdas")
def sdas_group() -> None:
    """SDAS anomaly synthesis (RealNet): train a diffusion model, sample banks, blend.

    \b
    Example (one category of an HSS-IAD build):
      curate sdas train --category Magnetic-tile-defect --out mtd-ddpm --steps 50000 -w ws
      curate sdas sample --category Magnetic-tile-defect --checkpoint mtd-ddpm -n 10000 -w ws
      curate sdas blend --category Magnetic-tile-defect --bank <bank id> -w ws
      curate sdas export --bank <bank id> --out data/HSS-IAD/sdas -w ws

    Banks and blends are side products: `latest` stays on the dataset; name them by id.
    """


def _sdas_import(module: str):
    return require(module, "curate sdas")


@sdas_group.command("train")
@click.argument("manifest", required=False)
@click.option("--category", required=True, help="Train on this category's normal images.")
@click.option("--out", "-o", "out", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Checkpoint folder (an existing one is resumed).")
@click.option("--steps", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Total optimisation steps (a resumed run continues up to this many).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--image-size", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--model", "model_preset", default="unet2d", show_default=True,
              help="unet2d (diffusers UNet2DModel), unet2d-small, adm (RealNet's ADM, "
                   "unconditional), or the tiny test presets.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.9999, show_default=True)
@click.option("--save-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if present).")
@common_options
def sdas_train(manifest, category, out, steps, batch_size, image_size, model_preset, lr,
               ema_decay, save_every, device, workspace, seed, jobs, as_json):
    """Train a diffusion model on one category's kept normal training images.

    Seeded and resumable: run the same command again after a stop and it continues from the
    last checkpoint exactly as an uninterrupted run would. bf16 autocast on a GPU.

    \b
    Example:
      curate sdas train --category Magnetic-tile-defect --out mtd-ddpm --steps 50000 -w ws
    """
    train_mod = _sdas_import("curate.stages.sdas.train")
    from curate.stages.sdas.stage import ProgressBar, training_images

    torch = _sdas_import("torch")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = train_mod.TrainConfig(preset=model_preset, image_size=image_size, steps=steps,
                                   batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                                   save_every=save_every, seed=seed, device=device)
    # Writes only the checkpoint folder: hours of training must not lock the workspace.
    with _context(workspace, seed, jobs, create=False, write=False) as ctx:
        m = ctx.workspace.load(manifest)
        images = training_images(ctx.workspace, m, category)
        bar_ = ProgressBar(ctx, f"sdas train {category}", steps, loss=float("nan"))
        with bar_ as (bar, task):
            result = train_mod.train(
                images, out, config, info={"manifest": m.id, "category": category,
                                           "images": len(images)},
                on_step=lambda step, loss: bar.update(task, completed=step, loss=loss))
    summary = {"out": str(result.out), "step": result.step, "resumed_from": result.resumed_from,
               "images": len(images), "last_loss": result.losses[-1] if result.losses else None}
    if as_json:
        _emit_json(summary)
    else:
        stdout.print(f"trained {result.step} steps (resumed from {result.resumed_from}) on "
                     f"{len(images)} images; last loss {summary['last_loss']}; EMA weights in "
                     f"{result.out / 'ema.safetensors'}", highlight=False)


@sdas_group.command("sample")
@click.argument("manifest", required=False)
@click.option("--category", required=True, help="Category the bank is for (names its rows).")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, path_type=Path),
              help="A `curate sdas train` folder or an official ADM checkpoint (.pt).")
@click.option("--n", "-n", "n", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Synthetic images to make.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Reverse steps (respaced).")
@click.option("--spacing", type=click.Choice(["ddim", "even"]), default="ddim",
              show_default=True, help="ddim: 0, T/K, 2T/K, ... (RealNet's ddim20); even: "
                                      "rounded even spacing from 0 to T-1.")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm",
              show_default=True, help="Ancestral (1+s)·Σ, or DDIM plus s·Σ.")
@click.option("--strength", nargs=2, type=float, default=None,
              help="s ~ U(A, B) per image  [default: 0.1 0.2 (ddpm), 0.01 0.03 (ddim)]")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--class-label", type=int, default=None,
              help="Class index of a class-conditional checkpoint (RealNet: MVTec order).")
@click.option("--device", default=None, help="torch device (default: cuda if present).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True, help="Model arithmetic (bf16/fp16 autocast on a GPU).")
@common_options
def sdas_sample(manifest, category, checkpoint, n, steps, spacing, sampler, strength,
                batch_size, class_label, device, precision, workspace, seed, jobs, as_json):
    """Sample a bank of SDAS synthetic anomalies into the store, one manifest row per image.

    Each row records its seed, strength s, steps, sampler and the checkpoint's sha256. The
    bank's parent is MANIFEST (default: latest, if any). Resumable: a killed run continues,
    and ends with the same files and manifest id as an uninterrupted one. The bank is a side
    product: `latest` stays on the dataset; name the bank by the id printed.

    \b
    Example:
      curate sdas sample --category Magnetic-tile-defect --checkpoint mtd-ddpm -n 10000 -w ws
    """
    sampler_mod = _sdas_import("curate.stages.sdas.sampler")
    from curate.stages.sdas.stage import SdasSample

    torch = _sdas_import("torch")
    low, high = strength or sampler_mod.DEFAULT_STRENGTH[sampler]
    params = make_params(SdasSample, {
        "category": category, "checkpoint": str(checkpoint.absolute()), "n": n, "steps": steps,
        "spacing": spacing, "sampler": sampler, "strength_min": low, "strength_max": high,
        "batch_size": batch_size, "class_label": class_label, "precision": precision,
        "device": device or ("cuda" if torch.cuda.is_available() else "cpu")})
    with _context(workspace, seed, jobs) as ctx:
        ws = ctx.workspace
        parents = [ws.load(manifest)] if manifest or ws.head() else []
        result = run_stage(SdasSample(), parents, params, ctx)
    _show_results([result], as_json)
    _show_side_product(result, "bank", as_json)


@sdas_group.command("blend")
@click.argument("manifest", required=False)
@click.option("--category", required=True, help="Blend into this category's normal images.")
@click.option("--bank", default=None, help="Bank manifest (sdas sample) to take anomalies "
              "from; without it, procedural textures.")
@click.option("--n", "-n", "n", type=click.IntRange(min=0), default=0, show_default=True,
              help="Blended images to make (0: one per normal training image).")
@click.option("--size", type=click.IntRange(min=8), default=256, show_default=True,
              help="Square size of the blended images.")
@click.option("--delta", nargs=2, type=float, default=(0.5, 1.0), show_default=True,
              help="Opacity δ ~ U(A, B).")
@common_options
def sdas_blend(manifest, category, bank, n, size, delta, workspace, seed, jobs, as_json):
    """Blend anomalies into normal images: Perlin mask × foreground, written with their masks.

    A = (1 − M)·I + (1 − δ)·M·I + δ·M·P. MANIFEST (default: the bank's parent, else latest)
    gives the normal images; the output can be reviewed with `curate review push <id>`. The
    blend is a side product: `latest` stays on the dataset; name the blend by the id printed.

    \b
    Example:
      curate sdas blend --category Magnetic-tile-defect --bank 3f2a9c -w ws
      curate review push <blend id> -w ws
    """
    from curate.stages.sdas.stage import SdasBlend

    with _context(workspace, seed, jobs, create=False) as ctx:
        ws = ctx.workspace
        banks = [ws.load(bank)] if bank else []
        if manifest is None and banks and banks[0].header["parents"]:
            manifest = banks[0].header["parents"][0]
        params = make_params(SdasBlend, {"category": category, "n": n, "size": size,
                                         "delta_min": delta[0], "delta_max": delta[1],
                                         "bank": banks[0].id if banks else ""})
        result = run_stage(SdasBlend(), [ws.load(manifest), *banks], params, ctx)
    _show_results([result], as_json)
    _show_side_product(result, "blend", as_json)


def _show_side_product(result: StageResult, what: str, as_json: bool) -> None:
    """Say that a bank or blend left ``latest`` on the dataset, and how to name it instead."""
    if not as_json:  # (the JSON has the full id)
        stdout.print(f"{what} {result.manifest.id} is a side product: `latest` stays where "
                     f"it was; name the {what} by its id", highlight=False)


@sdas_group.command("export")
@click.option("--bank", "banks", multiple=True, required=True, metavar="ID",
              help="Bank manifest (sdas sample) to write; repeat for one bank per category.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="RealNet's sdas folder (data/<dataset>/sdas): must be new, empty, or an "
                   "earlier bank export with --overwrite.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier bank export at --out.")
@common_options
def sdas_export(banks, out, overwrite, workspace, seed, jobs, as_json):
    """Write banks in RealNet's SDAS folder layout.

    Each bank's images go flat to OUT/<Category>/<index>.png; point RealNet's `sdas_dir` at
    OUT/{} (its config: data/<dataset>/sdas/{}).
    OUT/curate-sdas.json maps each file to its bank, sample id, seed and strength. All or
    nothing: a failure leaves OUT as it was.

    \b
    Example:
      curate sdas export --bank 3f2a9c --out data/HSS-IAD/sdas -w ws
    """
    from curate.export.sdas import export_banks

    # Writes only to --out: a reader of the workspace, it neither takes nor waits for the lock.
    with _context(workspace, seed, jobs, create=False, write=False) as ctx:
        ws = ctx.workspace
        index = export_banks(ws, [ws.load(bank) for bank in banks], out, overwrite=overwrite)
    if as_json:
        _emit_json({k: v for k, v in index.items() if k != "files"} | {"out": str(out)})
        return
    for bank in index["banks"]:
        stdout.print(f"exported {bank['images']} images of bank {bank['manifest'][:12]} to "
                     f"{out / bank['folder']}", highlight=False)
    stdout.print(f"RealNet: sdas_dir: {out}/{{}}", highlight=False)


# ------------------------------------------------------------------------------- ssfilter
@cli.command("filter-noise")
@click.argument("target", required=False)
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder mode: TARGET is a folder of images; write the clean folder here.")
@click.option("--mode", type=click.Choice(["lite", "full"]), default="lite", show_default=True,
              help="lite: patch comparison only (no training); full: a Dinomaly-style model "
                   "with dropout uncertainty, trained on the set (a DINOv2 backbone, or a "
                   "decoder over the randconv / texture descriptor).")
@click.option("--kappa1", type=click.IntRange(min=1), default=20, show_default=True,
              help="Random shufflings of the set (voting rounds).")
@click.option("--kappa2", type=click.IntRange(min=0), default=5, show_default=True,
              help="Keep a sample judged normal in more than this many shufflings.")
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--backbone", default="randconv", show_default=True,
              help="Patch descriptor: randconv or texture (no weights), or a bundled backbone "
                   "(dinov2_vits14_reg, wide_resnet50_2, ...).")
@click.option("--weights", default=None,
              help="Backbone weight file or folder (default: local caches; 'random' for tests).")
@click.option("--image-size", type=click.IntRange(min=16), default=None,
              help="Square size images are resized to  [default: 256, 224 for DINOv2]")
@click.option("--border", type=click.FloatRange(0, 0.5, max_open=True), default=0.04,
              show_default=True, help="randconv: share of each side of an image left out of "
              "its patches (fixture edges and dark strips along a side outrank real defects).")
@click.option("--recall-tau", type=float, default=3.0, show_default=True,
              help="Lite: also judge normal the upper-half samples within this many standard "
                   "deviations of the lower half's mean (negative: lower half only).")
@click.option("--hard-normals", type=click.IntRange(min=0), default=0, show_default=True,
              help="Flag the K kept normal images that look most anomalous (per category).")
@click.option("--no-drop", is_flag=True, help="Manifest mode: score and flag only.")
@click.option("--iterations", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Full mode: training iterations.")
@click.option("--cold-start", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Full mode: iterations before uncertainty joins the score.")
@click.option("--device", default=None,
              help="torch device (default: cuda if present). With --executor ray, 'cuda' "
                   "makes each category a Ray task that asks for one GPU.")
@common_options
def filter_noise(target, out, mode, kappa1, kappa2, batch_size, backbone, weights, image_size,
                 border, recall_tau, hard_normals, no_drop, iterations, cold_start, device, workspace,
                 seed, jobs, as_json):
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
    ssfilter = require("curate.stages.ssfilter.stage", "curate filter-noise")
    SSFilter, filter_folder = ssfilter.SSFilter, ssfilter.filter_folder
    params = make_params(SSFilter, {
        "mode": mode, "kappa1": kappa1, "kappa2": kappa2, "batch_size": batch_size,
        "backbone": backbone, "weights": weights, "image_size": image_size, "border": border,
        "recall_tau": None if recall_tau < 0 else recall_tau, "hard_normals": hard_normals,
        "drop": not no_drop, "iterations": iterations, "cold_start": cold_start,
        "device": device})
    if out is None:
        with _context(workspace, seed, jobs, create=False) as ctx:
            result = run_stage(SSFilter(), [ctx.workspace.load(target)], params, ctx)
        _show_results([result], as_json)
        return
    if target is None:
        raise click.UsageError("folder mode needs the input FOLDER as TARGET")
    from rich.progress import Progress

    with Progress(console=stderr, transient=True, disable=as_json) as bar:
        task = bar.add_task("ssfilter", total=None)
        report = filter_folder(Path(target), out, params, seed, progress=lambda
                               what, done, total: bar.update(task, description=f"ssfilter: {what}",
                                                             completed=done, total=total))
    if as_json:
        _emit_json(report.summary())
    else:
        stdout.print(f"{report.images} images: kept {report.kept}, removed {report.removed}, "
                     f"unreadable {report.unreadable}, hard normals {report.hard_normals}; "
                     f"report {report.report}" +
                     (f", removed images {report.sheet}" if report.sheet else ""),
                     highlight=False)


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


if __name__ == "__main__":
    main()
