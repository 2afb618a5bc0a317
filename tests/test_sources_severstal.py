"""The Severstal reader on generated copies of its layout, in both train.csv layouts."""

from __future__ import annotations

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
from curate.testing.fixtures import write_severstal


@pytest.fixture
def steel(tmp_path):
    return write_severstal(tmp_path / "severstal", seed=3)


def ids(fixture) -> list[str]:
    """The train ImageIds in the order the generator wrote them (see SEVERSTAL_TRAIN)."""
    return [p.split("/")[1] for p in fixture.samples]


def rewrite_csv(fixture, *lines: str, header: str = "ImageId,ClassId,EncodedPixels") -> None:
    (fixture.root / "train.csv").write_text("\n".join([header, *lines]) + "\n")


@pytest.mark.parametrize("layout", ["long", "wide"])
def test_ingests_every_class_of_every_image(ctx, workspace, tmp_path, layout):
    steel = write_severstal(tmp_path / layout, seed=3, csv_layout=layout)
    before = tree_digest(steel.root)
    m = ingest(ctx, "severstal", steel.root)
    assert kept_counts(m) == steel.counts() == {
        ("train", "good"): 2, ("train", "class1"): 1, ("train", "class3"): 1,
        ("train", "class4"): 1, ("train", "combined"): 1}
    assert_every_file_accounted_for(m, steel.root)
    combined = by_path(m)[f"train_images/{ids(steel)[5]}"]
    assert combined["defect_classes"] == ["class1", "class3"]
    assert combined["annotation"]["file"] == "train.csv"
    assert [e["class"] for e in combined["annotation"]["rle"]] == ["class1", "class3"]
    assert (combined["format"], combined["channels"]) == ("jpeg", 3)
    test_rows = {p: r for p, r in reasons(m).items() if p.startswith("test_images/")}
    assert len(test_rows) == 2
    assert all(code == "no_labels" and p in detail
               for p, ((code, detail),) in test_rows.items())
    ignored = m.header["inventory"]["severstal"]["ignored"]
    assert [e["path"] for e in ignored] == ["sample_submission.csv"]
    labelled = labels(ctx, m)
    assert_masks_match(workspace, labelled, steel)  # includes mask:class1 and mask:class3
    assert tree_digest(steel.root) == before


def test_rle_is_kept_verbatim(ctx, steel):
    image = ids(steel)[2]
    rewrite_csv(steel, f"{image},2,1 3  10 2")
    row = by_path(ingest(ctx, "severstal", steel.root))[f"train_images/{image}"]
    assert row["annotation"] == {"file": "train.csv", "rle": [{"class": "class2", "counts": "1 3  10 2"}]}
    assert (row["label"], row["defect_classes"]) == ("class2", ["class2"])


def test_images_the_csv_does_not_mention_are_good(ctx, steel):
    rewrite_csv(steel)
    m = ingest(ctx, "severstal", steel.root)
    assert kept_counts(m) == {("train", "good"): 6}


def test_unknown_header_stops_naming_the_file_and_both_layouts(ctx, steel):
    rewrite_csv(steel, "x.jpg,1,1 1", header="Image,Class,Pixels")
    with pytest.raises(CurateError) as exc:
        ingest(ctx, "severstal", steel.root)
    message = str(exc.value)
    assert "train.csv: header 'Image,Class,Pixels'" in message
    assert "'ImageId,ClassId,EncodedPixels' (long layout)" in message
    assert "'ImageId_ClassId,EncodedPixels' (legacy wide layout)" in message


def test_unusable_csv_lines_are_rejected_with_their_line_number(ctx, steel):
    a, b = ids(steel)[:2]
    rewrite_csv(steel,
                f"{a},5,1 2",  # line 2: no class 5
                "0000000ff.jpg,1,1 2",  # line 3: no such image
                f"{a},1,1 2",  # line 4: fine
                f"{a},1,9 2",  # line 5: the same image and class again
                f"../{b},1,1 2",  # line 6: a path, not an image id
                f"{b},2")  # line 7: a field missing
    m = ingest(ctx, "severstal", steel.root)
    rejected = {e["path"]: e["why"] for e in m.header["inventory"]["severstal"]["rejected"]}
    assert set(rejected) == {f"train.csv:{n}" for n in (2, 3, 5, 6, 7)}
    assert "ClassId '5'" in rejected["train.csv:2"]
    assert rejected["train.csv:3"] == "no image train_images/0000000ff.jpg"
    assert "first is line 4" in rejected["train.csv:5"]
    assert "escapes its root" in rejected["train.csv:6"]
    assert "expected 3 fields" in rejected["train.csv:7"]
    row = by_path(m)[f"train_images/{a}"]
    assert row["annotation"]["rle"] == [{"class": "class1", "counts": "1 2"}]


def test_wide_layout_line_without_class_suffix_is_rejected(ctx, steel):
    a = ids(steel)[0]
    rewrite_csv(steel, f"{a}_1,", f"{a},1 2", header="ImageId_ClassId,EncodedPixels")
    m = ingest(ctx, "severstal", steel.root)
    (rejected,) = m.header["inventory"]["severstal"]["rejected"]
    assert rejected["path"] == "train.csv:3" and "<ImageId>_<ClassId>" in rejected["why"]


@pytest.mark.parametrize(("counts", "code"), [
    ("1 2 3", "bad_rle"),  # an odd number of values
    ("1 x", "bad_rle"),
    ("25590 20", "rle_out_of_bounds"),  # past pixel 64 x 400 = 25600
])
def test_bad_rle_is_dropped_by_labels_naming_the_csv(ctx, steel, counts, code):
    image = ids(steel)[0]
    rewrite_csv(steel, f"{image},1,{counts}")
    labelled = labels(ctx, ingest(ctx, "severstal", steel.root))
    ((got, detail),) = reasons(labelled)[f"train_images/{image}"]
    assert got == code and detail.startswith("train.csv: RLE")


def test_image_extension_case_does_not_matter(ctx, steel):
    image = ids(steel)[3]
    stem = image.removesuffix(".jpg")
    (steel.root / "train_images" / image).rename(steel.root / "train_images" / f"{stem}.JPG")
    row = by_path(ingest(ctx, "severstal", steel.root))[f"train_images/{stem}.JPG"]
    assert (row["status"], row["label"]) == ("kept", "class3")


def test_truncated_jpeg_is_unreadable(ctx, steel):
    image = f"train_images/{ids(steel)[4]}"
    truncate(steel.root / image)
    ((code, detail),) = reasons(ingest(ctx, "severstal", steel.root))[image]
    assert code == "unreadable_image" and detail.startswith(f"{image}: truncated JPEG")


def test_missing_csv_or_images_folder_stop_with_one_sentence(ctx, steel, tmp_path):
    (steel.root / "train.csv").unlink()
    with pytest.raises(CurateError, match=r"train.csv: not found; a Severstal folder needs both"):
        ingest(ctx, "severstal", steel.root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="the folder is empty"):
        ingest(ctx, "severstal", tmp_path / "empty")
    (tmp_path / "other/images").mkdir(parents=True)
    (tmp_path / "other/images/a.jpg").write_bytes(b"")
    with pytest.raises(CurateError, match="no severstal layout found; expected train_images/"):
        ingest(ctx, "severstal", tmp_path / "other")
