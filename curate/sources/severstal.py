"""Severstal: Steel Defect Detection (Kaggle, 2019), the STEEL category of HSS-IAD.

Layout as distributed::

    train_images/<ImageId>.jpg   1600x256, 3-channel JPEG of grey steel
    test_images/<ImageId>.jpg    no public labels
    train.csv                    run-length encoded defects, defect classes 1-4

``train.csv`` exists in two public layouts, both accepted:

- long: ``ImageId,ClassId,EncodedPixels``, one line per (image, class) with a defect;
- legacy wide: ``ImageId_ClassId,EncodedPixels``, four lines per image (``<ImageId>_1`` …
  ``_4``), ``EncodedPixels`` empty where the class is absent.

An image may carry several classes: each keeps its own RLE entry (a well-known public loader
keeps only the last one per image). RLE strings are kept verbatim; the labels stage decodes
and checks them against the image size. Train images the CSV gives no encoding are good. A
line that cannot be used is listed as rejected; when it names a train image, that image is
dropped too (``bad_annotation``): with one of its lines unusable, its label is unknown.

Defect classes are named ``class1`` … ``class4`` everywhere (labels, RLE entries and the
per-class masks ``mask:class1`` …); the label is ``combined`` when an image has several.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.core.errors import CurateError, UnsafePathError, stable_text
from curate.core.files import check_relative
from curate.core.manifest import drop, new_row
from curate.sources.base import Inventory, Reader, Scan, is_image, label_for, stem_and_ext
from curate.sources.catalog import SourceInfo

CSV = "train.csv"
TRAIN, TEST = "train_images", "test_images"
LONG_HEADER = ["ImageId", "ClassId", "EncodedPixels"]
WIDE_HEADER = ["ImageId_ClassId", "EncodedPixels"]
CLASS_IDS = ("1", "2", "3", "4")
IGNORED = {"sample_submission.csv": "Kaggle's submission template: it holds no labels"}


def _long_fields(fields: list[str]) -> tuple[str, str, str]:
    if len(fields) != 3:
        raise ValueError(f"expected 3 fields ({','.join(LONG_HEADER)}), got {len(fields)}")
    return fields[0], fields[1], fields[2]


def _wide_fields(fields: list[str]) -> tuple[str, str, str]:
    if len(fields) != 2:
        raise ValueError(f"expected 2 fields ({','.join(WIDE_HEADER)}), got {len(fields)}")
    image_id, sep, class_id = fields[0].rpartition("_")
    if not sep:
        raise ValueError(f"{fields[0]!r} is not <ImageId>_<ClassId>")
    return image_id, class_id, fields[1]


def _layout(header: list[str], path: Path) -> Callable[[list[str]], tuple[str, str, str]]:
    names = [h.strip() for h in header]
    if names == LONG_HEADER:
        return _long_fields
    if names == WIDE_HEADER:
        return _wide_fields
    raise CurateError(f"{path}: header {','.join(header)!r} is not a Severstal train.csv "
                      f"header; expected {','.join(LONG_HEADER)!r} (long layout) or "
                      f"{','.join(WIDE_HEADER)!r} (legacy wide layout)")


def _image_named(fields: list[str], train_images: dict[tuple[str, str], str]) -> str | None:
    """The train image a CSV line names in its first field, in either layout, if any."""
    first = fields[0].strip() if fields else ""
    for image_id in (first, first.rpartition("_")[0]):
        image = train_images.get(stem_and_ext(image_id)) if image_id else None
        if image is not None:
            return image
    return None


@dataclass
class TrainLabels:
    """What train.csv says: RLE strings by train image path then class id, and the lines
    that could not be used, by the train image they name."""

    rle: dict[str, dict[str, str]] = field(default_factory=dict)
    rejected: dict[str, list[str]] = field(default_factory=dict)


def read_train_csv(path: Path, train_images: dict[tuple[str, str], str],
                   inv: Inventory) -> TrainLabels:
    """RLE strings by train image; unusable lines go to ``inv`` (and, when they name a train
    image, to ``rejected`` under it).

    ``train_images`` maps (stem, lower-case extension) to the image's path, so that an
    ImageId ``x.jpg`` finds ``train_images/x.JPG``. Lines whose encoding is empty are kept
    track of (a duplicate of one is still a duplicate) but add no RLE entry.
    """
    labels = TrainLabels()
    found = labels.rle
    first_line: dict[tuple[str, str], int] = {}

    def reject(where: str, why: str, fields: list[str]) -> None:
        inv.reject(where, why)
        image = _image_named(fields, train_images)
        if image is not None:
            labels.rejected.setdefault(image, []).append(f"{where}: {why}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            fields_of = _layout(next(reader, []), path)
            for fields in reader:
                if not any(f.strip() for f in fields):
                    continue
                where = f"{CSV}:{reader.line_num}"
                try:
                    image_id, class_id, counts = fields_of(fields)
                except ValueError as exc:
                    reject(where, str(exc), fields)
                    continue
                image_id, class_id = image_id.strip(), class_id.strip()
                if class_id not in CLASS_IDS:
                    reject(where, f"ClassId {class_id!r} is not one of {', '.join(CLASS_IDS)}",
                           fields)
                    continue
                try:
                    check_relative(image_id, "ImageId")
                except UnsafePathError as exc:
                    reject(where, str(exc), fields)
                    continue
                image = train_images.get(stem_and_ext(image_id))
                if image is None:
                    reject(where, f"no image {TRAIN}/{image_id}", fields)
                    continue
                key = (image, class_id)
                if key in first_line:
                    reject(where, f"a second line for {image_id} class {class_id} (the first "
                                  f"is line {first_line[key]})", fields)
                    continue
                first_line[key] = reader.line_num
                if counts.strip():
                    found.setdefault(image, {})[class_id] = counts
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CurateError(f"{path}: not a readable CSV file "
                          f"({stable_text(exc)}); expected Severstal's "
                          "train.csv") from exc
    return labels


class SeverstalReader(Reader):
    kind = "severstal"
    info = SourceInfo(
        kind, "Severstal: Steel Defect Detection (STEEL)",
        "https://www.kaggle.com/c/severstal-steel-defect-detection",
        "Kaggle competition rules (accept them on Kaggle to download)",
        "A. Grishin, BorisV, iBardintsev, inversion, Oleg, \"Severstal: Steel Defect "
        "Detection\", Kaggle, 2019.",
        ("severstal-steel-defect-detection", "severstal", "STEEL", "steel-defect-detection"))

    @staticmethod
    def looks_like(path: Path) -> bool:
        return (path / "train_images").is_dir() and any(
            f.name.lower() == "train.csv" for f in path.iterdir())

    category = "STEEL"
    layout = (f"{TRAIN}/<ImageId>.jpg images, {TEST}/ and a {CSV} of run-length encoded "
              "defects")

    def scan(self, root: Path, source: str, options: dict[str, Any]) -> Scan:
        files, inv = self.walk(root)
        # Only what the walk listed counts: a train.csv linking outside the folder is not read.
        has_csv = CSV in files
        has_train = (root / TRAIN).is_dir()
        if not has_csv and not has_train:
            raise self.unrecognised(root)
        if not has_csv or not has_train:
            missing = root / (CSV if not has_csv else TRAIN)
            raise CurateError(f"{missing}: not found; a Severstal folder needs both "
                              f"{TRAIN}/ and {CSV} (the labels of the train images)")
        inv.annotation_files.append(CSV)
        train: dict[tuple[str, str], str] = {}
        test: list[str] = []
        for rel in files:
            folder, _, name = rel.rpartition("/")
            if rel == CSV:
                continue
            if folder == TRAIN and is_image(name):
                key = stem_and_ext(name)
                if key in train:
                    inv.unpair(rel, f"a second image named like {train[key]}")
                else:
                    train[key] = rel
            elif folder == TEST and is_image(name):
                test.append(rel)
            else:
                inv.ignore(rel, IGNORED.get(rel, f"not an image in {TRAIN}/ or {TEST}/, "
                                                 f"nor {CSV}"))
        csv_labels = read_train_csv(root / CSV, train, inv)

        category = options["category"]
        rows = []
        for image in sorted(train.values()):
            by_class = csv_labels.rle.get(image, {})
            annotation: dict[str, Any] = {"file": CSV}
            if by_class:
                annotation["rle"] = [{"class": f"class{k}", "counts": v}
                                     for k, v in sorted(by_class.items())]
            classes = [f"class{k}" for k in sorted(by_class)]
            row = new_row(source=source, path=image, category=category, source_split="train",
                          label=label_for(classes), defect_classes=classes,
                          annotation=annotation)
            rejected = csv_labels.rejected.get(image)
            if rejected:
                drop(row, "ingest", "bad_annotation",
                     f"{image}: {len(rejected)} line(s) of {CSV} naming it cannot be used, so "
                     f"its label is unknown ({'; '.join(rejected)})")
            rows.append(row)
        for image in test:
            row = new_row(source=source, path=image, category=category, source_split="test")
            rows.append(drop(row, "ingest", "no_labels",
                             f"{image}: Severstal publishes no labels for its test images"))
        return Scan(rows, inv)
