"""Helpers the tests share (import with ``from helpers import ...``)."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.core.files import sha256_file, walk_files
from curate.core.manifest import Manifest, new_row
from curate.engine.runner import Context, Stage, map_updates, run_stage
from curate.stages.ingest import Ingest, IngestParams
from curate.stages.labels import Labels, LabelsParams
from curate.testing.fixtures import Fixture


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
    """Each entry under ``root`` the walk finds (a file it lists, or an entry it leaves out:
    see ``curate.core.files.walk_files``) is a row's image, a row's mask or annotation file, or
    listed in the inventory (annotation files, unpaired, ignored): nothing vanishes."""
    (inventory,) = manifest.header["inventory"].values()
    rows = manifest.row_list()
    seen = {r["path"] for r in rows}
    seen |= {r["annotation"][k] for r in rows for k in ("mask", "file") if k in r["annotation"]}
    seen |= set(inventory["annotation_files"])
    seen |= {e["path"] for e in inventory["unpaired"] + inventory["ignored"]}
    left_out: list[str] = []
    files = set(walk_files(root, on_skip=lambda rel, why: left_out.append(rel)))
    entries = files | set(left_out)
    assert seen == entries
    assert inventory["files"] == len(entries) == len(files) + len(left_out)


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
    """A small MTD-shaped tree of hard links to the real files (nothing copied where the
    file system allows). Not symbolic links: readers do not follow a link out of the source
    folder."""
    for folder, n in per_class.items():
        target = out / folder / "Imgs"
        target.mkdir(parents=True)
        for jpg in sorted((mtd_root / folder / "Imgs").glob("*.jpg"))[:n]:
            for original in (jpg, jpg.with_suffix(".png")):
                try:
                    os.link(original, target / original.name)
                except OSError:  # another file system: a copy of these small files
                    shutil.copyfile(original, target / original.name)
    return out


def mtd_images(root: Path, folder: str, count: int) -> list[Path]:
    """The first ``count`` images of an MTD class folder (skips when the data has fewer)."""
    import pytest

    found = sorted((root / folder / "Imgs").glob("*.jpg"))[:count]
    if len(found) < count:
        pytest.skip(f"fewer than {count} images in {root / folder / 'Imgs'}")
    return found


# ----------------------------------------------------------------------------- worker faults
# A stage whose worker process dies once (executors must retry it) and whose one bad sample
# raises (it must be dropped, not retried).
@dataclass(frozen=True)
class CrashParams:
    marker: str  # the first worker to see this file missing creates it and dies
    fail_on: str = ""


def crash_once(row, env):
    if row["path"] == env.params.fail_on:
        raise ValueError("this sample is bad")
    if row["path"] == "img05.png" and not os.path.exists(env.params.marker):
        Path(env.params.marker).touch()
        os._exit(1)  # the worker process dies, as an OOM kill or a lost node does
    return {"measures": {"crash.value": float(env.rng(row).normal())}}


class CrashOnce(Stage):
    name = "crash_once"
    version = "1"
    Params = CrashParams
    uses_seed = True

    def run(self, inputs, params, ctx):
        (m,) = inputs
        return self.output_updates(m, map_updates(self, m, params, ctx, crash_once), params, ctx)


def synthetic(n=40) -> Manifest:
    rows = [new_row(source="s", path=f"img{i:02d}.png", category="C", label="good",
                    width=4, height=4) for i in range(n)]
    return Manifest.build(rows, stage="ingest", stage_version="1", roots={"s": "/nowhere"})


def tiny_diffusion_checkpoint(folder: Path, size: int = 16) -> Path:
    """A `curate sdas train` folder holding a tiny random UNet (seeded)."""
    import torch
    from safetensors.torch import save_file

    from curate.stages.sdas.models import build_model, preset, write_model_json

    folder.mkdir(parents=True, exist_ok=True)
    arch, config = preset("unet2d-tiny")
    torch.manual_seed(0)
    model = build_model(arch, config, size)
    write_model_json(folder, arch, config, size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "ema.safetensors"))
    return folder
