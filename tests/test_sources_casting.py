"""The casting reader on generated copies in Pascal VOC, YOLO and COCO form."""

from __future__ import annotations

import builtins
import io
import json

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
from curate.testing.fixtures import write_casting

EXPECTED = {(None, "good"): 5, (None, "pit"): 2, (None, "scratch"): 1, (None, "combined"): 1}


@pytest.fixture
def voc(tmp_path):
    return write_casting(tmp_path / "voc", seed=4, format="voc")


@pytest.fixture
def yolo(tmp_path):
    return write_casting(tmp_path / "yolo", seed=4, format="yolo")


@pytest.fixture
def coco(tmp_path):
    return write_casting(tmp_path / "coco", seed=4, format="coco")


def reject_paths(manifest) -> dict[str, str]:
    return {e["path"]: e["why"] for e in manifest.header["inventory"]["casting"]["rejected"]}


def coco_edit(fixture, edit) -> None:
    """Apply ``edit`` to the fixture's COCO document and write it back."""
    path = fixture.root / "annotations.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# --------------------------------------------------------------------------- every format
@pytest.mark.parametrize("fmt", ["voc", "yolo", "coco"])
def test_each_format_is_found_and_drawn_exactly(ctx, workspace, tmp_path, fmt):
    casting = write_casting(tmp_path / fmt, seed=4, format=fmt)
    before = tree_digest(casting.root)
    m = ingest(ctx, "casting", casting.root)  # format="auto"
    assert kept_counts(m) == casting.counts() == EXPECTED
    assert_every_file_accounted_for(m, casting.root)
    combined = next(r for r in m.rows() if r["label"] == "combined")
    assert combined["defect_classes"] == ["pit", "scratch"]
    assert combined["category"] == "Casting" and combined["channels"] == 3
    assert ("polygons" in combined["annotation"]) == (fmt != "voc")
    assert_masks_match(workspace, labels(ctx, m), casting)
    assert tree_digest(casting.root) == before


def test_format_can_be_named_and_auto_refuses_a_mix(ctx, voc, yolo):
    assert kept_counts(ingest(ctx, "casting", voc.root, format="voc")) == EXPECTED
    (voc.root / "extra.json").write_text("{}")
    with pytest.raises(CurateError, match=r"several formats found \(VOC: .*COCO: extra.json\); "
                                          "pass format="):
        ingest(ctx, "casting", voc.root)
    for txt in (yolo.root / "labels/train").iterdir():
        txt.unlink()
    (yolo.root / "data.yaml").unlink()
    with pytest.raises(CurateError, match="no annotation files found"):
        ingest(ctx, "casting", yolo.root)


def test_bad_options_are_refused(ctx, voc):
    with pytest.raises(CurateError, match="format='labelme'"):
        ingest(ctx, "casting", voc.root, format="labelme")
    with pytest.raises(CurateError, match="unannotated='keep'"):
        ingest(ctx, "casting", voc.root, unannotated="keep")


def test_unannotated_images_are_good_or_dropped(ctx, voc):
    image = "JPEGImages/cast_0001.jpg"  # the one image the generator gives no XML
    assert by_path(ingest(ctx, "casting", voc.root))[image]["label"] == "good"
    m = ingest(ctx, "casting", voc.root, unannotated="drop")
    assert reasons(m) == {image: [("unannotated",
                                   f"{image}: no VOC annotation file for this image")]}


def test_images_with_an_upper_case_extension_are_read(ctx, voc):
    (voc.root / "JPEGImages/cast_0002.jpg").rename(voc.root / "JPEGImages/cast_0002.JPG")
    row = by_path(ingest(ctx, "casting", voc.root))["JPEGImages/cast_0002.JPG"]
    assert (row["status"], row["label"]) == ("kept", "pit")


def test_truncated_and_fake_jpegs_are_unreadable(ctx, yolo):
    truncate(yolo.root / "images/train/cast_0002.jpg")
    (yolo.root / "images/train/cast_0003.jpg").write_text("not a picture")
    dropped = reasons(ingest(ctx, "casting", yolo.root))
    for image in ("images/train/cast_0002.jpg", "images/train/cast_0003.jpg"):
        ((code, detail),) = dropped[image]
        assert code == "unreadable_image" and detail.startswith(f"{image}:")


def test_empty_folder_and_folder_without_images_stop(ctx, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="the folder is empty"):
        ingest(ctx, "casting", tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/a.xml").write_text("<annotation/>")
    with pytest.raises(CurateError, match="no casting layout found"):
        ingest(ctx, "casting", tmp_path / "notes")


# --------------------------------------------------------------------------- VOC
def test_voc_malformed_xml_drops_its_image(ctx, voc):
    (voc.root / "Annotations/cast_0003.xml").write_text("<annotation><object>")
    row = by_path(ingest(ctx, "casting", voc.root))["JPEGImages/cast_0003.jpg"]
    ((code, detail),) = [(n["code"], n["detail"]) for n in row["reasons"]]
    assert code == "bad_annotation"
    assert detail.startswith("Annotations/cast_0003.xml: malformed XML")
    assert row["annotation"] == {"file": "Annotations/cast_0003.xml"}


def test_voc_box_without_numbers_drops_its_image(ctx, voc):
    xml = voc.root / "Annotations/cast_0002.xml"
    xml.write_text(xml.read_text().replace("<xmin>", "<xmin>left"))
    ((code, detail),) = reasons(ingest(ctx, "casting", voc.root))["JPEGImages/cast_0002.jpg"]
    assert code == "bad_annotation" and detail.startswith("Annotations/cast_0002.xml: <object> 1")


def test_voc_boxes_are_one_based_and_inclusive(ctx, voc):
    xml = voc.root / "Annotations/cast_0002.xml"
    text = xml.read_text()
    start, end = text.index("<bndbox>"), text.index("</bndbox>") + len("</bndbox>")
    xml.write_text(text[:start] + "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax>"
                   "<ymax>20</ymax></bndbox>" + text[end:])
    row = by_path(ingest(ctx, "casting", voc.root))["JPEGImages/cast_0002.jpg"]
    assert row["annotation"]["boxes"] == [{"class": "pit", "x0": 0, "y0": 1, "x1": 10, "y1": 20}]


def test_voc_orphan_xml_is_unpaired_and_same_stem_images_stop(ctx, voc):
    (voc.root / "Annotations/cast_0099.xml").write_text("<annotation/>")
    m = ingest(ctx, "casting", voc.root)
    assert m.header["inventory"]["casting"]["unpaired"] == [
        {"path": "Annotations/cast_0099.xml",
         "why": "VOC annotation without an image of the same stem"}]
    (voc.root / "more").mkdir()
    (voc.root / "more/cast_0002.png").write_bytes(b"")
    with pytest.raises(CurateError, match="JPEGImages/cast_0002.jpg and more/cast_0002.png: "
                                          "two images with the stem 'cast_0002'"):
        ingest(ctx, "casting", voc.root)


# --------------------------------------------------------------------------- YOLO
@pytest.mark.parametrize(("line", "why"), [
    ("0 0.5 0.5 1.2 0.1", "value 1.2 is outside [0, 1]"),
    ("0 0.5 -0.1 0.2 0.1", "value -0.1 is outside [0, 1]"),
    ("0 0.5 0.5 0.2", "4 values; expected 'class cx cy w h'"),
    ("0 0.5 0.5 0.2 0.1 0.3", "6 values"),
    ("0 0.5 half 0.2 0.1", "a value is not a number"),
    ("pit 0.5 0.5 0.2 0.1", "class 'pit' is not a class id"),
    ("7 0.5 0.5 0.2 0.1", "class id 7 has no name"),
])
def test_yolo_bad_line_drops_its_image_naming_file_and_line(ctx, yolo, line, why):
    txt = yolo.root / "labels/train/cast_0002.txt"
    txt.write_text(txt.read_text() + line + "\n")
    ((code, detail),) = reasons(ingest(ctx, "casting", yolo.root))["images/train/cast_0002.jpg"]
    assert code == "bad_annotation"
    assert detail.startswith("labels/train/cast_0002.txt line 2: ") and why in detail


def test_yolo_labels_beside_images_and_class_names_from_classes_txt(ctx, workspace, yolo):
    for txt in (yolo.root / "labels/train").iterdir():
        txt.rename(yolo.root / "images/train" / txt.name)
    (yolo.root / "data.yaml").unlink()
    (yolo.root / "images/train/classes.txt").write_text("pit\nscratch\n")
    m = ingest(ctx, "casting", yolo.root)
    assert kept_counts(m) == EXPECTED
    assert "images/train/classes.txt" in m.header["inventory"]["casting"]["annotation_files"]
    assert_masks_match(workspace, labels(ctx, m), yolo)


def test_yolo_without_class_names_uses_the_ids(ctx, yolo):
    (yolo.root / "data.yaml").unlink()
    m = ingest(ctx, "casting", yolo.root)
    assert kept_counts(m) == {(None, "good"): 5, (None, "0"): 2, (None, "1"): 1,
                              (None, "combined"): 1}


def test_yolo_class_lists_that_disagree_stop(ctx, yolo):
    (yolo.root / "labels/train/classes.txt").write_text("scratch\npit\n")
    with pytest.raises(CurateError, match="class names differ"):
        ingest(ctx, "casting", yolo.root)


def test_yolo_empty_label_file_means_good_and_orphans_are_unpaired(ctx, yolo):
    (yolo.root / "labels/train/cast_0004.txt").write_text("")
    (yolo.root / "labels/train/cast_0099.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    m = ingest(ctx, "casting", yolo.root)
    assert by_path(m)["images/train/cast_0004.jpg"]["label"] == "good"
    unpaired = m.header["inventory"]["casting"]["unpaired"]
    assert [e["path"] for e in unpaired] == ["labels/train/cast_0099.txt"]
    assert_every_file_accounted_for(m, yolo.root)


# --------------------------------------------------------------------------- COCO
def test_coco_unsafe_file_names_are_rejected_and_nothing_outside_is_read(
        ctx, coco, tmp_path, monkeypatch):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((coco.root / "images/cast_0002.jpg").read_bytes())

    def edit(doc):
        doc["images"][2]["file_name"] = "../secret.jpg"
        doc["images"][3]["file_name"] = str(secret)
    coco_edit(coco, edit)
    opened: list[str] = []

    def recording(real_open):
        def open_and_record(file, *args, **kwargs):
            opened.append(str(file))
            return real_open(file, *args, **kwargs)
        return open_and_record

    for module in (builtins, io):  # pathlib opens through io.open, Pillow through open
        monkeypatch.setattr(module, "open", recording(module.open))
    m = ingest(ctx, "casting", coco.root)
    monkeypatch.undo()
    assert str(coco.root / "annotations.json") in opened and str(secret) not in opened
    rejected = reject_paths(m)
    assert "escapes its root" in rejected["annotations.json:images[2]"]
    assert "is not a relative path" in rejected["annotations.json:images[3]"]
    dropped = reasons(m)
    for image in ("images/cast_0002.jpg", "images/cast_0003.jpg"):  # now listed by no record
        assert dropped[image] == [("not_in_annotations",
                                   f"{image}: not listed in the images of annotations.json")]
    assert all("secret" not in r["path"] for r in m.rows())


def test_coco_records_for_missing_files_and_unknown_images_are_rejected(ctx, coco):
    def edit(doc):
        doc["images"].append({"id": 99, "file_name": "gone.jpg"})
        doc["annotations"].append({"id": 99, "image_id": 123, "category_id": 1,
                                   "bbox": [1, 1, 2, 2]})
    coco_edit(coco, edit)
    rejected = reject_paths(ingest(ctx, "casting", coco.root))
    assert rejected == {
        "annotations.json:images[9]": "file_name 'gone.jpg': no image at gone.jpg, "
                                      "images/gone.jpg",
        "annotations.json:annotations[6]": "image_id 123 names no usable image record"}


def test_coco_bad_bbox_drops_its_image(ctx, coco):
    def edit(doc):
        doc["annotations"][0]["bbox"] = [1, 2, "wide", 3]
    coco_edit(coco, edit)
    m = ingest(ctx, "casting", coco.root)
    image = next(p for p, r in by_path(m).items() if r["status"] == "dropped")
    ((code, detail),) = reasons(m)[image]
    assert code == "bad_annotation"
    assert detail.startswith("annotations.json:annotations[0]: expected a 'bbox'")


def test_coco_image_on_disk_but_not_listed_is_dropped(ctx, coco):
    (coco.root / "images/cast_0100.jpg").write_bytes(
        (coco.root / "images/cast_0000.jpg").read_bytes())
    ((code, detail),) = reasons(ingest(ctx, "casting", coco.root))["images/cast_0100.jpg"]
    assert code == "not_in_annotations" and "annotations.json" in detail


def test_coco_file_is_chosen_by_option_when_there_are_several(ctx, coco):
    (coco.root / "other.json").write_text("[]")
    with pytest.raises(CurateError, match="expected exactly one COCO .json annotation file, "
                                          "found annotations.json, other.json"):
        ingest(ctx, "casting", coco.root)
    m = ingest(ctx, "casting", coco.root, annotations="annotations.json")
    assert kept_counts(m) == EXPECTED
    assert m.header["inventory"]["casting"]["ignored"] == [
        {"path": "other.json", "why": "neither an image nor a COCO annotation file"}]


def test_coco_file_that_is_not_coco_stops(ctx, coco):
    (coco.root / "annotations.json").write_text('{"images": 3}')
    with pytest.raises(CurateError, match="annotations.json: expected a COCO object"):
        ingest(ctx, "casting", coco.root)
