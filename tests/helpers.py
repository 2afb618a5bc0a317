"""Helpers the tests share (import with ``from helpers import ...``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from curate.files import sha256_file, walk_files
from curate.fixtures import Fixture
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

def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: compare before and after to prove nothing changed."""
    return {rel: sha256_file(root / rel) for rel in walk_files(root)}


def assert_every_file_accounted_for(manifest, root: Path) -> None:
    """Each file under ``root`` is a row's image, a row's mask or annotation file, or listed
    in the inventory (annotation files, unpaired, ignored): nothing vanishes."""
    (inventory,) = manifest.header["inventory"].values()
    rows = manifest.row_list()
    seen = {r["path"] for r in rows}
    seen |= {r["annotation"][k] for r in rows for k in ("mask", "file") if k in r["annotation"]}
    seen |= set(inventory["annotation_files"])
    seen |= {e["path"] for e in inventory["unpaired"] + inventory["ignored"]}
    files = set(walk_files(root))
    assert seen == files
    assert inventory["files"] == len(files)


def kept_counts(manifest) -> Counter[tuple[str | None, str]]:
    """Kept rows by (source split, label), as :meth:`Fixture.counts` gives the truth."""
    return Counter((r["source_split"], r["label"]) for r in manifest.rows()
                   if r["status"] == "kept")


def reasons(manifest) -> dict[str, list[tuple[str, str]]]:
    """Path -> [(code, detail)] of every dropped row."""
    return {r["path"]: [(n["code"], n["detail"]) for n in r["reasons"]]
            for r in manifest.rows() if r["status"] == "dropped"}


def assert_masks_match(workspace, labelled, fixture: Fixture) -> None:
    """After ``labels``, every sample's mask (and per-class masks) equal what was drawn."""
    rows = {r["path"]: r for r in labelled.rows()}
    assert set(fixture.samples) <= set(rows)
    for path, drawn in fixture.samples.items():
        row = rows[path]
        assert row["status"] == "kept", (path, row["reasons"])
        if drawn.mask is None:
            assert "mask" not in row["artifacts"], path
            continue
        assert np.array_equal(workspace.store.read_mask(row["artifacts"]["mask"]), drawn.mask), path
        for cls, mask in drawn.class_masks.items():
            got = workspace.store.read_mask(row["artifacts"][f"mask:{cls}"])
            assert np.array_equal(got, mask), (path, cls)


def truncate(path: Path) -> None:
    """Cut off the end of a file, as an interrupted copy leaves it (these files are tiny:
    cutting more would leave a broken header rather than a truncated image)."""
    path.write_bytes(path.read_bytes()[:-16])


def mtd_subset(mtd_root: Path, out: Path, per_class: dict[str, int]) -> Path:
    """A small MTD-shaped tree of links to the real files (nothing copied)."""
    for folder, n in per_class.items():
        target = out / folder / "Imgs"
        target.mkdir(parents=True)
        for jpg in sorted((mtd_root / folder / "Imgs").glob("*.jpg"))[:n]:
            (target / jpg.name).symlink_to(jpg)
            (target / jpg.with_suffix(".png").name).symlink_to(jpg.with_suffix(".png"))
    return out


def mtd_images(root: Path, folder: str, count: int) -> list[Path]:
    """The first ``count`` images of an MTD class folder (skips when the data has fewer)."""
    import pytest

    found = sorted((root / folder / "Imgs").glob("*.jpg"))[:count]
    if len(found) < count:
        pytest.skip(f"fewer than {count} images in {root / folder / 'Imgs'}")
    return found
