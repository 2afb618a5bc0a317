"""The KolektorSDD2 reader on generated copies of its layout."""

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
from curate.testing.fixtures import write_kolektorsdd2


@pytest.fixture
def ksdd2(tmp_path):
    return write_kolektorsdd2(tmp_path / "KolektorSDD2", seed=2)


def test_ingests_both_splits_with_labels_from_the_masks(ctx, workspace, ksdd2):
    before = tree_digest(ksdd2.root)
    m = ingest(ctx, "kolektorsdd2", ksdd2.root)
    assert kept_counts(m) == ksdd2.counts() == {
        ("train", "good"): 2, ("train", "defect"): 2, ("test", "good"): 2, ("test", "defect"): 1}
    assert_every_file_accounted_for(m, ksdd2.root)
    row = by_path(m)["train/10001.png"]
    assert row["annotation"]["mask"] == "train/10001_GT.png"
    assert (row["category"], row["format"], row["channels"]) == ("KolektorSDD2", "png", 3)
    assert_masks_match(workspace, labels(ctx, m), ksdd2)
    assert tree_digest(ksdd2.root) == before


def test_image_without_mask_is_dropped_and_orphan_mask_listed(ctx, ksdd2):
    (ksdd2.root / "test/10005_GT.png").unlink()
    (ksdd2.root / "train/10000.png").unlink()
    m = ingest(ctx, "kolektorsdd2", ksdd2.root)
    assert reasons(m) == {"test/10005.png": [
        ("missing_mask", "test/10005.png: no mask test/10005_GT.png beside the image")]}
    unpaired = m.header["inventory"]["kolektorsdd2"]["unpaired"]
    assert unpaired == [{"path": "train/10000_GT.png",
                         "why": "mask without an image of the same stem"}]
    assert_every_file_accounted_for(m, ksdd2.root)


def test_extensions_match_whatever_their_case(ctx, ksdd2):
    (ksdd2.root / "train/10001.png").rename(ksdd2.root / "train/10001.Png")
    (ksdd2.root / "train/10001_GT.png").rename(ksdd2.root / "train/10001_GT.PNG")
    row = by_path(ingest(ctx, "kolektorsdd2", ksdd2.root))["train/10001.Png"]
    assert (row["status"], row["label"]) == ("kept", "defect")
    assert row["annotation"]["mask"] == "train/10001_GT.PNG"


def test_truncated_png_is_unreadable(ctx, ksdd2):
    truncate(ksdd2.root / "test/10004.png")
    ((code, detail),) = reasons(ingest(ctx, "kolektorsdd2", ksdd2.root))["test/10004.png"]
    assert code == "unreadable_image" and detail.startswith("test/10004.png:")


def test_mask_of_another_size_is_dropped_by_labels(ctx, ksdd2):
    (ksdd2.root / "train/10003_GT.png").write_bytes(encode_png(np.zeros((10, 10), np.uint8)))
    labelled = labels(ctx, ingest(ctx, "kolektorsdd2", ksdd2.root))
    ((code, detail),) = reasons(labelled)["train/10003.png"]
    assert code == "mask_size_mismatch" and "mask train/10003_GT.png is 10x10" in detail


def test_files_outside_the_split_folders_are_listed_as_ignored(ctx, ksdd2):
    (ksdd2.root / "README.txt").write_text("KolektorSDD2")
    (ksdd2.root / "train/extra").mkdir()
    (ksdd2.root / "train/extra/10099.png").write_bytes(b"")
    m = ingest(ctx, "kolektorsdd2", ksdd2.root)
    ignored = {e["path"] for e in m.header["inventory"]["kolektorsdd2"]["ignored"]}
    assert ignored == {"README.txt", "train/extra/10099.png"}
    assert_every_file_accounted_for(m, ksdd2.root)


def test_empty_folder_and_unknown_layout_stop_with_one_sentence(ctx, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="the folder is empty"):
        ingest(ctx, "kolektorsdd2", tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat/10000.png").write_bytes(b"")
    with pytest.raises(CurateError, match=r"flat: no kolektorsdd2 layout found; expected train/"):
        ingest(ctx, "kolektorsdd2", tmp_path / "flat")
