"""Running a recipe: find the sources, ingest, merge, run the stages in order, export.

Every step goes through the runner's cache, so a build is resumable for free: killed halfway
(even with ``kill -9``), it reruns every finished stage from the cache and redoes only the
rest, ending with the same final manifest id as an uninterrupted run; changing one late
stage's parameters reruns that stage and those after it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.app.recipe import Recipe
from curate.core.errors import CurateError, UsageError
from curate.core.manifest import KEPT, Manifest
from curate.engine.facts import StoredPng
from curate.engine.mask_facts import MaskRegions, look_masks
from curate.engine.runner import Context, StageResult, run_stage
from curate.sources.discover import discover
from curate.stages import stage_class
from curate.stages.ingest import Ingest, IngestParams
from curate.stages.merge import Merge, MergeParams


@dataclass
class BuildResult:
    recipe: str
    stages: list[StageResult]
    sources: dict[str, str]
    missing: dict[str, str]
    exports: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> Manifest:
        return self.stages[-1].manifest


def build(recipe: Recipe, ctx: Context, sources_dir: Path | None,
          explicit: dict[str, Path] | None = None) -> BuildResult:
    """Ingest the recipe's sources found under ``sources_dir`` and run its stages."""
    explicit = {k: Path(v).absolute() for k, v in (explicit or {}).items()}
    unknown = sorted(set(explicit) - {s.kind for s in recipe.sources})
    if unknown:
        raise CurateError(f"--source names {', '.join(unknown)}, which recipe {recipe.name} "
                          f"does not use (it uses {', '.join(s.kind for s in recipe.sources)})")
    if sources_dir is None and not explicit:
        raise UsageError(f"recipe {recipe.name} needs its sources: give --sources DIR (the folder "
                         f"of downloads) or --source KIND=PATH (kinds: "
                         f"{', '.join(s.kind for s in recipe.sources)})")
    if sources_dir is not None and not Path(sources_dir).is_dir():
        raise CurateError(f"{sources_dir}: no such folder (--sources: the folder holding the "
                          f"downloaded sources)")
    found, missing = discover(sources_dir,
                              [s.kind for s in recipe.sources],
                              {s.kind: s.folder_names for s in recipe.sources if s.folder_names},
                              explicit)
    required = [s.kind for s in recipe.sources if s.required and s.kind in missing]
    if required:
        raise CurateError(f"recipe {recipe.name} requires {', '.join(required)}: "
                          f"{missing[required[0]]}")
    if not found:
        raise CurateError(f"none of the sources of recipe {recipe.name} was found in "
                          f"{sources_dir}: " + "; ".join(f"{k}: {why}" for k, why in
                                                         missing.items()))

    results: list[StageResult] = []
    for source in recipe.sources:
        if source.kind not in found:
            continue
        options = dict(source.options)
        if source.category:
            options["category"] = source.category
        params = IngestParams(kind=source.kind, source=source.name, options=options)
        results.append(run_stage(Ingest(found[source.kind]), [], params, ctx))
    ingested = [r.manifest for r in results]
    if len(ingested) > 1:
        results.append(run_stage(Merge(), ingested, MergeParams(), ctx))
    # Look once: whichever stage first decodes an image computes every fact the recipe will
    # ask of it (later stages' and the export's) from that one decode.
    stages = [(stage_class(step.stage)(), step.params) for step in recipe.stages]
    ctx.prefetch = [ex for stage, params in stages for ex in stage.facts(params)]
    if recipe.exports:
        # The export's PNGs from the same decode; the card's region shapes from the masks
        # labels holds (curate.engine.mask_facts).
        ctx.prefetch += [StoredPng(), MaskRegions()]
    try:
        for stage, params in stages:
            results.append(run_stage(stage, [results[-1].manifest], params, ctx))
    finally:
        ctx.prefetch = []
    return BuildResult(recipe.name, results, {k: str(v) for k, v in found.items()}, missing)


def export_all(result: BuildResult, recipe: Recipe, ctx: Context, out: Path, *,
               card: bool = True, overwrite: bool = False, link: bool = True
               ) -> dict[str, Any]:
    """The recipe's exports of the final manifest into ``out``, then the dataset card beside
    them (see :func:`export_manifest`); the card names the recipe and its missing sources.

    An earlier export at ``out`` is replaced as ``curate export`` replaces one: silently if it
    was made from the same manifest (the build ran again), else only with ``overwrite``."""
    exports = export_manifest(result.manifest, ctx, out, recipe.exports, card=card,
                              overwrite=overwrite, recipe=recipe.name, missing=result.missing,
                              link=link)
    result.exports = exports
    return exports


def export_manifest(manifest: Manifest, ctx: Context, out: Path, formats: Collection[str], *,
                    card: bool = False, overwrite: bool = False, images: str = "png",
                    recipe: str | None = None, missing: dict[str, str] | None = None,
                    link: bool = True) -> dict[str, Any]:
    """The MVTec tree of ``manifest`` in ``out`` (first: the sample lists point into it), the
    sample lists of ``formats`` ("realnet", "realiad") beside it, and the dataset card if
    ``card`` (``recipe`` and ``missing``, the sources the recipe found missing, go on it).

    All written into one temporary folder that replaces ``out`` only once everything is in
    it: a failure anywhere leaves ``out`` as it was (see :mod:`curate.export.staging`). The
    export's report (``curate-export.json``) is written once and handed to the lists and
    the card as it is, not read back."""
    from curate.export.mvtec import MARKER, write_mvtec
    from curate.export.staging import staged

    if ctx.workspace is None:  # the masks and foregrounds to export are in its store
        raise CurateError(f"exporting manifest {manifest.id} needs the workspace it was saved in")
    store = ctx.workspace.store
    exports: dict[str, Any] = {}
    with staged(out, marker=MARKER, overwrite=overwrite, manifest=manifest.id) as tmp:
        def final(paths: list[Path]) -> list[str]:
            return [str(Path(out) / p.relative_to(tmp)) for p in paths]

        report = write_mvtec(manifest, tmp, ctx, images=images, link=link)
        beside = {"realnet", "realiad", "card", "card.md"}  # what the lists and card write
        clash = sorted(c for c in report["counts"] if c.lower() in beside)
        if clash:
            raise CurateError(f"category {clash[0]!r} has the name of a folder the build "
                              f"writes beside the categories ({', '.join(sorted(beside))}): "
                              "rename the category (the recipe's category option)")
        exports["mvtec"] = {k: v for k, v in report.items() if k != "files"}
        if "realnet" in formats:
            from curate.export.realnet import export_realnet

            exports["realnet"] = final(export_realnet(tmp, report))
        if "realiad" in formats:
            from curate.export.realiad import export_realiad

            exports["realiad"] = final(export_realiad(tmp, report))
        if card:
            from curate.export.card import write_card

            (exports["card"],) = final([write_card(manifest, tmp, store,
                                                   report=report, recipe=recipe,
                                                   missing=missing,
                                                   ratios=_region_ratios(manifest, ctx))])
    return exports


def _region_ratios(manifest: Manifest, ctx: Context) -> dict[str, list[float]]:
    """The card's region aspect ratios of every kept mask, from the masks' facts (recorded by
    the build's labels; any missing computed on all cores, without writing: an export only
    reads the workspace)."""
    regions = MaskRegions()
    keys = list(dict.fromkeys(key for key, status in zip(
        (a.get("mask") for a in manifest.column_values("artifacts")),
        manifest.column_values("status"), strict=True) if key is not None and status == KEPT))
    persist, ctx.persist_facts = ctx.persist_facts, False
    try:
        looked = look_masks(ctx, "card", keys, [regions], desc="card: masks")
    finally:
        ctx.persist_facts = persist
    found = [k for k in keys if k not in looked.failed]
    return dict(zip(found, looked[regions].column(found, "aspect_ratios"), strict=True))
