"""The commands that make a whole dataset: build (from a recipe), demo, and its card."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from curate.engine.workspace import Workspace

from .options import (
    copy_option,
    given,
    jobs_option,
    json_option,
    open_context,
    parse_key_values,
    run_options,
    seed_option,
    workspace_option,
)
from .output import emit_json, show_export, show_results, stderr, stdout


@click.command("build")
@click.argument("recipe")
@click.option("--sources", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding the downloaded sources (found by folder name or layout).")
@click.option("--source", "explicit", multiple=True, metavar="KIND=PATH",
              help="Where one source is, e.g. --source mtd=~/data/MTD (wins over --sources).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Export folder  [default: ./<recipe name>]")
@click.option("--no-card", is_flag=True, help="Skip the dataset card.")
@copy_option
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier curate export of another manifest at --out (one of "
                   "the same manifest is replaced without it).")
@workspace_option
@run_options
@json_option
def build_cmd(recipe: str, sources: Path | None, explicit: tuple[str, ...], out: Path | None,
              no_card: bool, copy: bool, overwrite: bool, workspace: Path, seed: int, jobs: int,
              as_json: bool) -> None:
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
    pairs = parse_key_values(explicit, "--source")
    if not given("seed"):  # the recipe's seed, unless --seed (even --seed 0) says otherwise
        seed = r.seed
    with open_context(workspace, seed=seed, jobs=jobs) as ctx:
        result = build(r, ctx, sources, {k: Path(str(v)).expanduser() for k, v in pairs.items()})
        exports = export_all(result, r, ctx, out or Path(r.name), card=not no_card,
                             overwrite=overwrite, link=not copy)
    if as_json:
        emit_json({"recipe": r.name, "manifest": result.manifest.id, "sources": result.sources,
                   "missing": result.missing, "stages": [s.summary() for s in result.stages],
                   "exports": exports, "decoded": ctx.counts["decoded"]})
        return
    for kind, path in result.sources.items():
        stdout.print(f"source {kind}: {path}", highlight=False)
    for kind, why in result.missing.items():
        stdout.print(f"[yellow]missing[/] {kind}: {why}", highlight=False)
    show_results(result.stages, as_json=False)
    show_export(exports["mvtec"], out or Path(r.name), as_json=False)
    for fmt in ("realnet", "realiad"):
        if fmt in exports:
            stdout.print(f"{fmt} sample lists: {len(exports[fmt])} files")
    if "card" in exports:
        stdout.print(f"dataset card: {exports['card']}")


@click.command()
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo"), show_default=True,
              help="Folder for the generated sources, the workspace and the export.")
@click.option("--mtd", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None,
              help="Build from the real MTD in this folder  [default: the generated sample; "
                   "run from the root of a curate checkout, the real MTD of the development "
                   "data beside it when there]")
@click.option("--no-mtd", is_flag=True, help="Use only the generated MTD sample.")
@seed_option(help="Seed of the generated samples (the build itself uses the recipe's seed, "
                  "as `curate build` does).")
@jobs_option
@json_option
def demo(out: Path, mtd: Path | None, no_mtd: bool, seed: int, jobs: int, as_json: bool) -> None:
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
    with open_context(out / "workspace", seed=recipe.seed, jobs=jobs) as ctx:
        result = run_demo(ctx, out, mtd=mtd, seed=seed, recipe=recipe)
    b = result.build
    if as_json:
        emit_json({"manifest": b.manifest.id, "mtd": which_mtd, "sources": b.sources,
                   "missing": b.missing,
                   "stages": [s.summary() for s in b.stages], "exports": b.exports,
                   "problems": result.problems})
    else:
        show_results(b.stages, as_json=False)
        show_export(b.exports["mvtec"], out / "export", as_json=False)
        stdout.print(f"dataset card: {b.exports.get('card')}")
        verdict = "OK" if not result.problems else f"{len(result.problems)} problems"
        stdout.print(f"verify: {verdict}; workspace {out / 'workspace'}")
        for p in result.problems:
            stderr.print(f"[red]problem:[/] {p}", highlight=False)
    if result.problems:
        sys.exit(1)


@click.command()
@click.argument("manifest", required=False)
@click.option("--export", "export_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="A folder written by `curate export mvtec`.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for card.md and its plots in card/  [default: the export folder]")
@click.option("--recipe", default=None,
              help="The recipe (name or YAML file) that built the manifest: the card names it "
                   "and lists the recipe's sources the manifest lacks.")
@workspace_option
@json_option
def card(manifest: str | None, export_dir: Path, out: Path | None, recipe: str | None,
         workspace: Path, as_json: bool) -> None:
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
    from curate.engine.mask_facts import MaskRegions
    from curate.export.card import missing_sources, write_card
    from curate.export.index import read_report

    ws = Workspace.open(workspace, create=False)
    if manifest is None:
        manifest = read_report(export_dir)["manifest"]
    m = ws.load(manifest)
    r = load_recipe(recipe) if recipe else None
    # The masks' region shapes a build recorded (the card reads the other masks itself).
    regions = ws.facts.read(MaskRegions()).table
    ratios = dict(zip(regions.column("key").to_pylist(),
                      regions.column("aspect_ratios").to_pylist(), strict=True))
    path = write_card(m, export_dir, ws.store, out, recipe=r.name if r else None,
                      missing=missing_sources([s.kind for s in r.sources], m) if r else None,
                      ratios=ratios)
    if as_json:
        emit_json({"card": str(path), "manifest": m.id, "export": str(export_dir)})
    else:
        stdout.print(f"wrote the dataset card of manifest {m.id[:12]} to {path}")
