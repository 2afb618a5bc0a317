"""Readers at the edges (issue 16): COCO RLE masks, rejected Severstal lines, two MVTec images
of one stem, strict RLE numbers, refused option values, decompression bombs."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_every_file_accounted_for, by_path, ingest, labels, reasons
from PIL import Image

from curate.app.cli import cli
from curate.core.errors import UsageError
from curate.imaging.masks import AnnotationError, rle_decode
from curate.testing import fixtures
from curate.testing.fixtures import write_casting, write_kolektorsdd, write_mvtec, write_severstal


def png(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), 128, np.uint8)).save(path)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height``: a decompression bomb for Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def codes(manifest) -> dict[str, list[str]]:
    return {path: [code for code, _ in notes] for path, notes in reasons(manifest).items()}


# --------------------------------------------------------------------------- COCO RLE
#: Hand-computed: each mask, its COCO counts down the columns (0s first), and pycocotools'
#: compressed string of them (5-bit groups; from the 4th count on, the difference from the
#: count two before, e.g. 2 - 4 = -2 -> 'N').
BLOCK = np.array([[0, 0, 0, 0, 0],
                  [0, 1, 1, 1, 0],
                  [0, 1, 1, 1, 0],
                  [0, 0, 0, 0, 0]], bool)        # counts [5, 2, 2, 2, 2, 2, 5], "5220003"
SCATTER = np.array([[1, 0, 0, 0],
                    [0, 0, 0, 1],
                    [0, 1, 1, 0]], bool)         # counts [0, 1, 4, 1, 2, 1, 1, 1, 1], "0140N0O00"
HALF = np.zeros((10, 20), bool)
HALF[:, 10:] = True                              # counts [100, 100], "T3T3" (two groups each)


def coco_folder(root: Path, segmentations: dict[str, tuple[tuple[int, int], object]]) -> Path:
    """Images (name -> (height, width)) with one iscrowd annotation each."""
    images, annotations = [], []
    for i, (name, ((h, w), segmentation)) in enumerate(sorted(segmentations.items()), 1):
        png(root / "images" / name, h, w)
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 1,
                            "segmentation": segmentation, "bbox": [0, 0, w, h]})
    (root / "annotations.json").write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": 1, "name": "crack"}]}))
    return root


def test_coco_rle_masks_are_decoded_exactly(ctx, workspace, tmp_path):
    # Before: an RLE segmentation kept only its bbox, a full box over the image.
    root = coco_folder(tmp_path / "coco", {
        "block.png": ((4, 5), {"size": [4, 5], "counts": [5, 2, 2, 2, 2, 2, 5]}),
        "block_str.png": ((4, 5), {"size": [4, 5], "counts": "5220003"}),
        "scatter.png": ((3, 4), {"size": [3, 4], "counts": "0140N0O00"}),
        "scatter_list.png": ((3, 4), {"size": [3, 4], "counts": [0, 1, 4, 1, 2, 1, 1, 1, 1]}),
        "half.png": ((10, 20), {"size": [10, 20], "counts": "T3T3"}),
    })
    m = ingest(ctx, "casting", root, format="coco")
    assert by_path(m)["images/scatter.png"]["annotation"]["rle"] == [
        {"class": "crack", "counts": "1 1 6 1 9 1 11 1"}]
    assert_every_file_accounted_for(m, root)
    rows = by_path(labels(ctx, m))
    expected = {"block": BLOCK, "block_str": BLOCK, "scatter": SCATTER,
                "scatter_list": SCATTER, "half": HALF}
    for stem, mask in expected.items():
        row = rows[f"images/{stem}.png"]
        assert row["status"] == "kept" and row["label"] == "crack", row["reasons"]
        assert np.array_equal(workspace.store.read_mask(row["artifacts"]["mask"]), mask), stem


@pytest.mark.parametrize(("segmentation", "words"), [
    ({"size": [4, 5], "counts": [5, 2, 2]}, "cover 9 pixels"),
    ({"size": [4, 5], "counts": "52 20003"}, "not an RLE character"),
    ({"size": [4, 5], "counts": "5220003Y"}, "end in the middle"),   # 'Y' says more follows
    ({"size": [4, 5], "counts": "52N"}, "negative"),
    ({"size": [4, 5], "counts": [5, -2, 17]}, "non-negative integers"),
    ({"size": [5, 4], "counts": [20]}, "is not the image's 5x4"),
    ({"size": [4], "counts": [20]}, "'size' [height, width]"),
])
def test_bad_coco_rle_drops_its_image(ctx, tmp_path, segmentation, words):
    root = coco_folder(tmp_path / "coco", {"a.png": ((4, 5), segmentation)})
    (detail,) = [d for _, d in reasons(ingest(ctx, "casting", root))["images/a.png"]]
    assert "annotations.json:annotations[0]" in detail and words in detail


# --------------------------------------------------------------------------- Severstal
def test_an_image_with_a_rejected_csv_line_is_dropped_not_good(ctx, tmp_path):
    steel = write_severstal(tmp_path / "steel", seed=3)
    a, b, c = (p.split("/")[1] for p in list(steel.samples)[:3])
    (steel.root / "train.csv").write_text("\n".join([
        "ImageId,ClassId,EncodedPixels",
        f"{a},1,1 3",
        f"{a},7,5 2",            # before: rejected, and a kept as class1 only
        f"{b},1,1 2,extra",      # before: rejected, and b kept as good
        f"{c},2,",               # empty encoding: c is good
    ]) + "\n")
    m = ingest(ctx, "severstal", steel.root)
    dropped = reasons(m)
    (detail,) = [d for code, d in dropped[f"train_images/{a}"] if code == "bad_annotation"]
    assert "train.csv:3" in detail and "ClassId '7'" in detail
    (detail,) = [d for code, d in dropped[f"train_images/{b}"] if code == "bad_annotation"]
    assert "train.csv:4" in detail and "expected 3 fields" in detail
    assert by_path(m)[f"train_images/{c}"]["status"] == "kept"
    assert by_path(m)[f"train_images/{c}"]["label"] == "good"
    assert_every_file_accounted_for(m, steel.root)


# --------------------------------------------------------------------------- MVTec
def test_mvtec_two_images_of_one_stem_share_no_mask(ctx, tmp_path):
    mvtec = write_mvtec(tmp_path / "mvtec", seed=5)
    defect = mvtec.root / "bottle" / "test" / "broken_large"
    Image.open(defect / "000.png").save(defect / "000.bmp")
    m = ingest(ctx, "mvtec", mvtec.root)
    rows = by_path(m)
    # Before: both images became rows with the one mask 000_mask.png.
    assert "bottle/test/broken_large/000.png" not in rows
    assert rows["bottle/test/broken_large/000.bmp"]["annotation"]["mask"] == \
        "bottle/ground_truth/broken_large/000_mask.png"
    (inventory,) = m.header["inventory"].values()
    (unpaired,) = [e for e in inventory["unpaired"] if e["path"].endswith("000.png")
                   and "broken_large" in e["path"]]
    assert "second image with the stem of bottle/test/broken_large/000.bmp" in unpaired["why"]
    assert_every_file_accounted_for(m, mvtec.root)


# --------------------------------------------------------------------------- RLE numbers
@pytest.mark.parametrize("counts", ["1_0 2", "\u0661\u0662 1", "+5 1", "1 ５", "-1 2"])
def test_rle_numbers_are_ascii_digits_only(counts):
    with pytest.raises(AnnotationError, match="non-integer token") as err:
        rle_decode(counts, 4, 5)
    assert err.value.code == "bad_rle"


def test_rle_number_past_int64_is_out_of_bounds_not_an_overflow():
    with pytest.raises(AnnotationError, match="past the image") as err:
        rle_decode("1 " + "9" * 30, 4, 5)
    assert err.value.code == "rle_out_of_bounds"


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(("kind", "option", "shown"), [
    ("casting", "format=bogus", "format='bogus'"),
    ("casting", "unannotated=keep", "unannotated='keep'"),
    ("casting", "annotations=12", "annotations=12"),
    ("casting", "category=7", "category=7"),
    ("kolektorsdd", "release=coarse", "release='coarse'"),
    ("kolektorsdd", "skip_known_faulty=maybe", "skip_known_faulty='maybe'"),
    ("kolektorsdd", "colour=red", "no option(s) colour"),
])
def test_a_bad_reader_option_is_bad_usage(tmp_path, kind, option, shown):
    root = (write_casting if kind == "casting" else write_kolektorsdd)(tmp_path / kind).root
    result = CliRunner().invoke(cli, ["ingest", kind, str(root), "-o", option,
                                      "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output  # before: 1, as if the data were at fault
    assert shown in result.output and "Traceback" not in result.output


def test_option_values_are_checked_before_the_folder_is_read(ctx, tmp_path):
    with pytest.raises(UsageError, match="skip_known_faulty=false.*expected one|true or false"):
        ingest(ctx, "kolektorsdd", tmp_path / "missing", skip_known_faulty="false")
    with pytest.raises(UsageError, match="names a COCO file, but format=voc"):
        ingest(ctx, "casting", tmp_path / "missing", format="voc", annotations="a.json")


# --------------------------------------------------------------------------- bombs
def test_a_decompression_bomb_in_a_yolo_folder_drops_that_sample(ctx, tmp_path):
    root = tmp_path / "yolo"
    png(root / "images" / "ok.png", 8, 8)
    (root / "labels").mkdir()
    (root / "labels" / "ok.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "images" / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    (root / "labels" / "bomb.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    m = ingest(ctx, "casting", root, format="yolo")  # before: DecompressionBombError
    assert "image_too_large" in codes(m)["images/bomb.png"]
    assert by_path(m)["images/ok.png"]["status"] == "kept"
    assert_every_file_accounted_for(m, root)


def test_a_decompression_bomb_under_a_coco_rle_drops_that_sample(ctx, tmp_path):
    root = coco_folder(tmp_path / "coco", {"a.png": ((4, 5), {"size": [4, 5],
                                                              "counts": [20]})})
    (root / "images" / "a.png").write_bytes(png_declaring(100_000, 100_000))
    assert "image_too_large" in codes(ingest(ctx, "casting", root))["images/a.png"]


def test_a_broken_yaml_file_is_one_line(tmp_path):
    """Found by tests/test_invariants.py: YAML's error text spans several lines (with a caret
    drawing), and it was quoted as is in the one-sentence failure."""
    root = tmp_path / "casting"
    fixtures.write_casting(root, seed=0, format="yolo")
    assert (root / "data.yaml").is_file()
    (root / "data.yaml").write_bytes(b"names: [\n")
    result = CliRunner().invoke(cli, ["ingest", "casting", str(root), "-w",
                                      str(tmp_path / "ws")])
    assert result.exit_code == 1
    assert "data.yaml: not valid YAML" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
