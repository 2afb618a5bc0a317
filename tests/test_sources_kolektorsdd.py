"""The KolektorSDD reader on generated copies of its layout."""

from __future__ import annotations

import shutil

import cv2
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
from curate.testing.fixtures import write_kolektorsdd


@pytest.fixture
def ksdd(tmp_path):
    return write_kolektorsdd(tmp_path / "KolektorSDD", seed=1)


def test_ingests_with_labels_from_the_masks(ctx, workspace, ksdd):
    before = tree_digest(ksdd.root)
    m = ingest(ctx, "kolektorsdd", ksdd.root)
    assert kept_counts(m) == ksdd.counts() == {(None, "defect"): 3, (None, "good"): 9}
    assert_every_file_accounted_for(m, ksdd.root)
    row = by_path(m)["kos01/Part0.jpg"]
    assert (row["category"], row["format"], row["channels"]) == ("KolektorSDD", "jpeg", 1)
    assert row["height"] > row["width"]  # tall, not square
    assert row["annotation"]["mask"] == "kos01/Part0_label.bmp"
    assert_masks_match(workspace, labels(ctx, m), ksdd)
    assert tree_digest(ksdd.root) == before


def test_boxes_release_is_read_the_same_way_and_recorded(ctx, workspace, tmp_path):
    boxes = write_kolektorsdd(tmp_path / "boxes", seed=1, release="boxes")
    m = ingest(ctx, "kolektorsdd", boxes.root, release="boxes")
    assert m.header["sources"]["kolektorsdd"]["options"]["release"] == "boxes"
    assert_masks_match(workspace, labels(ctx, m), boxes)
    drawn = next(s.mask for s in boxes.samples.values() if s.mask is not None)
    ys, xs = np.nonzero(drawn)
    assert drawn.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # a filled rectangle


def test_unknown_release_is_refused(ctx, ksdd):
    with pytest.raises(CurateError, match="release='coarse'.*fine, boxes"):
        ingest(ctx, "kolektorsdd", ksdd.root, release="coarse")


def test_known_faulty_sample_is_skipped_unless_asked(ctx, ksdd):
    (ksdd.root / "kos21").mkdir()
    for name in ("Part7.jpg", "Part7_label.bmp"):
        shutil.copy(ksdd.root / "kos01" / name.replace("7", "0"), ksdd.root / "kos21" / name)
    ((code, detail),) = reasons(ingest(ctx, "kolektorsdd", ksdd.root))["kos21/Part7.jpg"]
    assert code == "known_faulty" and "kos21/Part7.jpg" in detail and "loader" in detail
    kept = ingest(ctx, "kolektorsdd", ksdd.root, skip_known_faulty=False)
    assert by_path(kept)["kos21/Part7.jpg"]["status"] == "kept"


def test_image_without_mask_is_dropped_and_orphan_mask_listed(ctx, ksdd):
    (ksdd.root / "kos01/Part1_label.bmp").unlink()
    (ksdd.root / "kos02/Part2.jpg").unlink()
    m = ingest(ctx, "kolektorsdd", ksdd.root)
    assert reasons(m) == {"kos01/Part1.jpg": [
        ("missing_mask", "kos01/Part1.jpg: no mask kos01/Part1_label.bmp beside the image")]}
    unpaired = m.header["inventory"]["kolektorsdd"]["unpaired"]
    assert unpaired == [{"path": "kos02/Part2_label.bmp",
                         "why": "mask without an image of the same stem"}]
    assert_every_file_accounted_for(m, ksdd.root)


def test_extensions_match_whatever_their_case(ctx, workspace, ksdd):
    (ksdd.root / "kos01/Part0.jpg").rename(ksdd.root / "kos01/Part0.JPG")
    (ksdd.root / "kos01/Part0_label.bmp").rename(ksdd.root / "kos01/Part0_label.BMP")
    m = ingest(ctx, "kolektorsdd", ksdd.root)
    row = by_path(m)["kos01/Part0.JPG"]
    assert row["status"] == "kept" and row["annotation"]["mask"] == "kos01/Part0_label.BMP"
    assert kept_counts(m) == ksdd.counts()


def test_truncated_jpeg_is_unreadable(ctx, ksdd):
    truncate(ksdd.root / "kos03/Part2.jpg")
    ((code, detail),) = reasons(ingest(ctx, "kolektorsdd", ksdd.root))["kos03/Part2.jpg"]
    assert code == "unreadable_image" and detail.startswith("kos03/Part2.jpg: truncated JPEG")


def test_non_image_with_an_image_extension_is_unreadable(ctx, ksdd):
    (ksdd.root / "kos03/Part2.jpg").write_text("not a picture")
    ((code, detail),) = reasons(ingest(ctx, "kolektorsdd", ksdd.root))["kos03/Part2.jpg"]
    assert code == "unreadable_image" and detail.startswith("kos03/Part2.jpg:")


def test_mask_of_another_size_is_dropped_by_labels(ctx, ksdd):
    cv2.imwrite(str(ksdd.root / "kos02/Part1_label.bmp"), np.full((7, 5), 255, np.uint8))
    labelled = labels(ctx, ingest(ctx, "kolektorsdd", ksdd.root))
    ((code, detail),) = reasons(labelled)["kos02/Part1.jpg"]
    assert code == "mask_size_mismatch" and "kos02/Part1_label.bmp is 5x7" in detail


def test_empty_folder_and_unknown_layout_stop_with_one_sentence(ctx, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="empty"):
        ingest(ctx, "kolektorsdd", tmp_path / "empty")
    (tmp_path / "other/images").mkdir(parents=True)
    (tmp_path / "other/images/a.jpg").write_bytes(b"x")
    with pytest.raises(CurateError, match="no kolektorsdd layout found; expected kosNN/PartN.jpg"):
        ingest(ctx, "kolektorsdd", tmp_path / "other")
