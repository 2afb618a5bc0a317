"""The MVTec AD reader on generated copies of its layout: a folder of categories or one."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    assert_every_file_accounted_for,
    assert_masks_match,
    by_path,
    ingest,
    kept_counts,
    labels,
    reasons,
    tree_digest,
    truncate,
)

from curate.core.errors import CurateError
from curate.imaging.io import encode_png
from curate.testing.fixtures import Fixture, write_mvtec


@pytest.fixture
def mvtec(tmp_path):
    return write_mvtec(tmp_path / "mvtec", seed=5)


def test_folder_of_categories(ctx, workspace, mvtec):
    before = tree_digest(mvtec.root)
    m = ingest(ctx, "mvtec", mvtec.root)
    assert kept_counts(m) == mvtec.counts() == {
        ("train", "good"): 6, ("test", "good"): 4, ("test", "broken_large"): 2,
        ("test", "contamination"): 2, ("test", "bent"): 2}
    assert m.header["counts"]["kept_by_category"] == {
        "bottle": {"good": 5, "broken_large": 2, "contamination": 2},
        "grid": {"good": 5, "bent": 2}}
    assert_every_file_accounted_for(m, mvtec.root)
    row = by_path(m)["bottle/test/broken_large/000.png"]
    assert row["annotation"] == {"mask": "bottle/ground_truth/broken_large/000_mask.png",
                                 "mask_sha256": row["annotation"]["mask_sha256"]}
    assert row["defect_classes"] == ["broken_large"] and row["channels"] == 3
    assert by_path(m)["grid/train/good/000.png"]["channels"] == 1
    ignored = m.header["inventory"]["mvtec"]["ignored"]
    assert [e["path"] for e in ignored] == ["license.txt", "readme.txt"]
    assert_masks_match(workspace, labels(ctx, m), mvtec)
    assert tree_digest(mvtec.root) == before


def test_single_category_folder(ctx, workspace, mvtec):
    bottle = mvtec.root / "bottle"
    m = ingest(ctx, "mvtec", bottle)
    row = by_path(m)["test/broken_large/000.png"]
    assert (row["category"], row["label"], row["source_split"]) == (
        "bottle", "broken_large", "test")
    assert row["annotation"]["mask"] == "ground_truth/broken_large/000_mask.png"
    assert_every_file_accounted_for(m, bottle)
    only_bottle = Fixture("mvtec", bottle, {
        p.removeprefix("bottle/"): s for p, s in mvtec.samples.items() if p.startswith("bottle/")})
    assert kept_counts(m) == only_bottle.counts()
    assert_masks_match(workspace, labels(ctx, m), only_bottle)
    renamed = ingest(ctx, "mvtec", bottle, category="Bottle_C1")
    assert {r["category"] for r in renamed.rows()} == {"Bottle_C1"}


def test_category_option_is_refused_for_a_folder_of_categories(ctx, mvtec):
    with pytest.raises(CurateError, match="holds several categories"):
        ingest(ctx, "mvtec", mvtec.root, category="bottle")


def test_defect_without_mask_is_dropped_and_orphan_mask_listed(ctx, mvtec):
    (mvtec.root / "grid/ground_truth/bent/001_mask.png").unlink()
    (mvtec.root / "bottle/test/contamination/000.png").unlink()
    m = ingest(ctx, "mvtec", mvtec.root)
    assert reasons(m) == {"grid/test/bent/001.png": [
        ("missing_mask", "grid/test/bent/001.png: no mask grid/ground_truth/bent/001_mask.png")]}
    assert m.header["inventory"]["mvtec"]["unpaired"] == [
        {"path": "bottle/ground_truth/contamination/000_mask.png",
         "why": "mask without a defect image of the same name"}]
    assert_every_file_accounted_for(m, mvtec.root)


def test_extensions_match_whatever_their_case(ctx, mvtec):
    (mvtec.root / "grid/test/bent/000.png").rename(mvtec.root / "grid/test/bent/000.PNG")
    (mvtec.root / "grid/ground_truth/bent/000_mask.png").rename(
        mvtec.root / "grid/ground_truth/bent/000_mask.Png")
    row = by_path(ingest(ctx, "mvtec", mvtec.root))["grid/test/bent/000.PNG"]
    assert row["status"] == "kept"
    assert row["annotation"]["mask"] == "grid/ground_truth/bent/000_mask.Png"


def test_truncated_png_is_unreadable(ctx, mvtec):
    truncate(mvtec.root / "bottle/train/good/001.png")
    ((code, detail),) = reasons(ingest(ctx, "mvtec", mvtec.root))["bottle/train/good/001.png"]
    assert code == "unreadable_image" and detail.startswith("bottle/train/good/001.png:")


def test_mask_of_another_size_is_dropped_by_labels(ctx, mvtec):
    (mvtec.root / "bottle/ground_truth/broken_large/001_mask.png").write_bytes(
        encode_png(np.zeros((16, 16), np.uint8)))
    labelled = labels(ctx, ingest(ctx, "mvtec", mvtec.root))
    ((code, detail),) = reasons(labelled)["bottle/test/broken_large/001.png"]
    assert code == "mask_size_mismatch"
    assert "mask bottle/ground_truth/broken_large/001_mask.png is 16x16" in detail


def test_empty_folder_and_unknown_layout_stop_with_one_sentence(ctx, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="the folder is empty"):
        ingest(ctx, "mvtec", tmp_path / "empty")
    (tmp_path / "flat/bottle").mkdir(parents=True)
    (tmp_path / "flat/bottle/000.png").write_bytes(b"")
    with pytest.raises(CurateError, match="no mvtec layout found; expected <Category>/train/"):
        ingest(ctx, "mvtec", tmp_path / "flat")
