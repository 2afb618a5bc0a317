"""Helpers the tests share (import with ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

from curate.runner import Context, run_stage
from curate.stages.ingest import Ingest, IngestParams
from curate.stages.labels import Labels, LabelsParams


def ingest(ctx: Context, kind: str, root: Path, source: str = "", **options):
    """Run the ingest stage and return its manifest."""
    params = IngestParams(kind=kind, source=source, options=options)
    return run_stage(Ingest(root), [], params, ctx).manifest


def labels(ctx: Context, manifest, **params):
    return run_stage(Labels(), [manifest], LabelsParams(**params), ctx).manifest


def by_path(manifest) -> dict[str, dict]:
    return {r["path"]: r for r in manifest.rows()}
