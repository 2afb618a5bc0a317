"""Masks looked at once (curate.engine.mask_facts): facts equal to measuring the mask itself,
recorded by the stage that makes the mask, and a stored mask decoded at most once whatever
reads it after (label_filter, the export), never in a dry run's fact store."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from helpers import by_path, ingest, labels
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from curate.app.build import build, export_all
from curate.app.recipe import load_recipe
from curate.core.manifest import Manifest, new_row
from curate.engine.facts import FactStore
from curate.engine.mask_facts import MaskAtSize, MaskLook, MaskStats, compute_mask_facts, look_masks
from curate.engine.runner import Context, run_stage
from curate.engine.store import Store
from curate.engine.workspace import Workspace
from curate.export.mvtec import export_mvtec
from curate.imaging.masks import pixels_at_train_size
from curate.stages.label_filter import LabelFilter, LabelFilterParams
from curate.stages.labels import Labels, LabelsParams
from curate.testing import fixtures


# ------------------------------------------------------------------------- the facts
def regions(mask: np.ndarray) -> int:
    """8-connected regions by flood fill: a reference that shares no code with the stage."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    n = (y + dy, x + dx)
                    if (0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1]
                            and mask[n] and not seen[n]):
                        seen[n] = True
                        stack.append(n)
    return count


masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda shape: arrays(np.bool_, shape))


@given(mask=masks, size=st.integers(1, 40))
def test_facts_are_the_masks_own_measures_held_or_decoded(tmp_path_factory, mask, size):
    store = Store(tmp_path_factory.mktemp("store"))
    key = store.put_mask(mask)
    extractors = [MaskStats(), MaskAtSize(size)]
    held = compute_mask_facts(key, mask, store, extractors)
    decoded = MaskLook(key, store)
    assert {ex.key: ex.compute(decoded) for ex in extractors} == held
    assert decoded.decodes == 1  # both extractors from one decode
    assert held[MaskStats().key] == {"pixels": int(mask.sum()), "height": mask.shape[0],
                                     "width": mask.shape[1], "components": regions(mask)}
    assert held[MaskAtSize(size).key] == {"pixels": pixels_at_train_size(mask, size)}


def test_mask_facts_are_told_apart_from_image_facts():
    assert MaskStats().kind == MaskAtSize(8).kind == "mask"
    assert MaskAtSize(8).key != MaskAtSize(16).key  # the size is a parameter: its own facts


# ------------------------------------------------------------------------- decoded once
@pytest.fixture
def sources(tmp_path):
    return fixtures.write_all(tmp_path / "sources", seed=5)


def count_reads(monkeypatch) -> Counter[str]:
    """Every Store.read_mask by key (the inline executor runs in this process)."""
    reads: Counter[str] = Counter()
    read_mask = Store.read_mask

    def counted(self, key):
        reads[key] += 1
        return read_mask(self, key)

    monkeypatch.setattr(Store, "read_mask", counted)
    return reads


def stored_masks(manifest: Manifest) -> set[str]:
    return {r["artifacts"]["mask"] for r in manifest.rows() if "mask" in r["artifacts"]}


def test_labels_records_facts_and_nothing_decodes_a_mask_again(ctx, sources, tmp_path,
                                                               monkeypatch):
    reads = count_reads(monkeypatch)
    params = LabelFilterParams(train_size=32)
    ctx.prefetch = LabelFilter().facts(params)  # as a build sets it
    labelled = labels(ctx, ingest(ctx, "mtd", sources["mtd"]))
    ctx.prefetch = []
    keys = stored_masks(labelled)
    assert keys and not reads
    facts = ctx.workspace.facts
    assert all(k in facts.read(MaskStats()) and k in facts.read(MaskAtSize(32)) for k in keys)
    filtered = run_stage(LabelFilter(), [labelled], params, ctx).manifest
    export_mvtec(filtered, tmp_path / "out", ctx)
    assert not reads and ctx.counts["decoded_masks"] == 0


def test_each_stored_mask_is_decoded_at_most_once(ctx, sources, tmp_path, monkeypatch):
    """labels run alone (`curate labels`: no later stage to ask for facts) records MaskStats;
    label_filter decodes each mask once for its size facts; the export and later runs, none."""
    reads = count_reads(monkeypatch)
    labelled = labels(ctx, ingest(ctx, "severstal", sources["severstal"]))
    keys = stored_masks(labelled)
    filtered = run_stage(LabelFilter(), [labelled], LabelFilterParams(train_size=32),
                         ctx).manifest
    assert reads == Counter(keys) and ctx.counts["decoded_masks"] == len(keys)
    export_mvtec(filtered, tmp_path / "out", ctx)
    assert reads == Counter(keys)
    with Context(Workspace.open(ctx.workspace.root), progress=False) as again:
        again_params = LabelFilterParams(train_size=32, min_pixels=50)  # runs anew: same facts
        result = run_stage(LabelFilter(), [labelled], again_params, again)
        assert not result.from_cache
        export_mvtec(result.manifest, tmp_path / "again", again)
        assert again.counts["decoded_masks"] == 0
    assert reads == Counter(keys)


def test_a_build_decodes_no_mask_not_even_for_its_card(tmp_path, sources, monkeypatch):
    reads = count_reads(monkeypatch)
    recipe = load_recipe("hss-iad")
    with Context(Workspace.open(tmp_path / "ws"), jobs=1, progress=False) as ctx:
        result = build(recipe, ctx, sources["mtd"].parent)
        export_all(result, recipe, ctx, tmp_path / "out", card=True)
        assert ctx.counts["decoded_masks"] == 0
    assert not reads


def rows_with_masks(store: Store, masks: list[np.ndarray | None]) -> Manifest:
    """Defect rows whose masks were stored by hand: no stage recorded their facts."""
    rows = []
    for k, mask in enumerate(masks):
        row = new_row(source="s", path=f"img{k:03d}.png", category="A", label="scratch",
                      width=20, height=10, measures={"labels.mask_fraction": 0.0})
        if mask is not None:
            row["artifacts"] = {"mask": store.put_mask(mask)}
        rows.append(row)
    return Manifest.build(rows, stage="labels", stage_version="1", roots={"s": "/nowhere"})


def test_a_dry_run_writes_no_facts(ctx):
    store = ctx.workspace.store
    m = rows_with_masks(store, [np.eye(10, 20, dtype=bool), np.zeros((10, 20), bool), None])
    dry = run_stage(LabelFilter(), [m], LabelFilterParams(), ctx, save=False)
    assert ctx.counts["decoded_masks"] == 2
    assert not list(ctx.workspace.facts.root.glob("mask.*/*.parquet"))
    # Another process over the workspace finds none, so it decodes and keeps them; same output.
    with Context(Workspace.open(ctx.workspace.root), progress=False) as real:
        saved = run_stage(LabelFilter(), [m], LabelFilterParams(), real)
        assert real.counts["decoded_masks"] == 2
    assert saved.manifest.id == dry.manifest.id
    assert len(FactStore(ctx.workspace.facts.root).read(MaskStats())) == 2


def test_a_missing_mask_drops_its_samples_naming_each(ctx):
    store = ctx.workspace.store
    mask = np.ones((10, 20), bool)
    m = rows_with_masks(store, [mask, mask])
    store.path(store.put_mask(mask)).unlink()
    out = by_path(run_stage(LabelFilter(), [m], LabelFilterParams(), ctx).manifest)
    for path in ("img000.png", "img001.png"):
        (reason,) = out[path]["reasons"]
        assert reason["detail"].startswith(f"{path}: artifact ") and "missing" in \
            reason["detail"]
    looked = look_masks(ctx, "test", [m.row_list()[0]["artifacts"]["mask"]], [MaskStats()])
    assert looked.failed and ctx.counts["decoded_masks"] == 0


# ------------------------------------------------------------------------- the real MTD
@pytest.mark.slow
def test_label_filter_on_the_real_mtd_is_what_decoding_each_mask_gives(tmp_path, mtd_root):
    """Facts recorded by labels, facts decoded by label_filter: one manifest; and its measures
    are those of the decoded masks."""
    with Context(Workspace.open(tmp_path / "a"), jobs=2, progress=False) as ctx:
        ctx.prefetch = LabelFilter().facts(LabelFilterParams())
        recorded = run_stage(Labels(), [ingest(ctx, "mtd", mtd_root)], LabelsParams(), ctx)
        ctx.prefetch = []
        a = run_stage(LabelFilter(), [recorded.manifest], LabelFilterParams(), ctx).manifest
        assert ctx.counts["decoded_masks"] == 0
    with Context(Workspace.open(tmp_path / "b"), jobs=2, progress=False) as ctx:
        labelled = labels(ctx, ingest(ctx, "mtd", mtd_root))
        b = run_stage(LabelFilter(), [labelled], LabelFilterParams(), ctx).manifest
        assert ctx.counts["decoded_masks"] == len(stored_masks(labelled))
        store = ctx.workspace.store
        for row in b.rows():
            if "label_filter.mask_pixels" not in row["measures"]:
                continue
            mask = store.read_mask(row["artifacts"]["mask"])
            assert row["measures"]["label_filter.mask_pixels"] == int(mask.sum())
            if "label_filter.train_pixels" in row["measures"]:
                assert row["measures"]["label_filter.train_pixels"] == \
                    pixels_at_train_size(mask, 256)
    assert a.id == b.id
