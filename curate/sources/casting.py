"""Casting surface defects (Wang et al., IEEE Sensors Journal 2024): engine castings with boxes.

The public distribution could not be located, so its annotation format is not known; this
reader takes the three a user will have (see ``curate.sources.boxformats``), chosen by the
``format`` option:

- ``voc``: one Pascal VOC XML per image, paired by stem (``JPEGImages/<id>.jpg`` with
  ``Annotations/<id>.xml``, or the XML beside the image);
- ``yolo``: ``labels/…/<stem>.txt`` mirroring ``images/…/<stem>.jpg``, or the TXT beside the
  image; class names from ``classes.txt`` or ``data.yaml`` when present;
- ``coco``: one JSON file (the ``annotations`` option, or the only ``*.json`` under the root);
  boxes, polygons and RLE masks (``iscrowd``, plain or compressed counts);
- ``auto`` (default): the one format whose annotation files are present.

Images may be anywhere under the root. A VOC or YOLO image without an annotation file is
``good`` (``unannotated="good"``) or dropped (``unannotated="drop"``); an image a COCO file does
not list is dropped, since a COCO file lists every image it annotates, defective or not.
The label is the defect class, ``combined`` for several, ``good`` for none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curate.core.errors import CurateError, UsageError
from curate.core.files import check_relative
from curate.core.manifest import GOOD, drop, new_row
from curate.sources.base import (
    Reader,
    Scan,
    has_match,
    ignore_rest,
    is_image,
    label_for,
    stem_and_ext,
)
from curate.sources.boxformats import (
    FORMATS,
    Shapes,
    Unusable,
    read_coco,
    read_voc,
    read_yolo,
    yolo_files,
)
from curate.sources.catalog import SourceInfo

UNANNOTATED = ("good", "drop")


def _with_ext(files: list[str], ext: str) -> list[str]:
    return [f for f in files if stem_and_ext(f)[1] == ext]


class CastingReader(Reader):
    kind = "casting"
    info = SourceInfo(
        kind, "Casting surface defects",
        "no public distribution located; ask the authors",
        "unknown",
        "Q. Wang, S. Gao, L. Xiong, A. Liang, K. Jiang, W. Zhang, \"A casting surface dataset "
        "and benchmark for subtle and confusable defect detection in complex contexts\", IEEE "
        "Sensors Journal, 2024.",
        ("casting", "Casting", "casting-surface", "casting_dataset"))

    @staticmethod
    def looks_like(path: Path) -> bool:
        return ((has_match(path, "**/*.xml") or has_match(path, "**/*.json")
                 or has_match(path, "labels/**/*.txt"))
                and (has_match(path, "**/*.jpg") or has_match(path, "**/*.png")))

    category = "Casting"
    layout = ("images anywhere under the folder with Pascal VOC XML, YOLO TXT or COCO JSON "
              "box annotations")
    options = {"format": "auto", "unannotated": "good", "annotations": None}
    option_values = {"format": ("auto", *FORMATS), "unannotated": UNANNOTATED,
                     "annotations": str}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        filled = super().check_options(options)
        if filled["annotations"] is not None and filled["format"] not in ("auto", "coco"):
            raise UsageError(f"casting option annotations={filled['annotations']} names a COCO "
                             f"file, but format={filled['format']}")
        return filled

    def scan(self, root: Path, source: str, options: dict[str, Any]) -> Scan:
        fmt, unannotated, coco_file = (options["format"], options["unannotated"],
                                       options["annotations"])
        files, inv = self.walk(root)
        images = [f for f in files if is_image(f)]
        if not images:
            raise self.unrecognised(root)
        if fmt == "auto":
            fmt = "coco" if coco_file is not None else self._detect_format(root, files, images)
        if fmt == "voc":
            found = read_voc(root, files, images, inv)
        elif fmt == "yolo":
            found = read_yolo(root, files, images, inv)
        else:
            found = read_coco(root, self._coco_file(root, files, coco_file), images, inv)

        rows = []
        for image in images:
            row = new_row(source=source, path=image, category=options["category"])
            result = found.get(image)
            if isinstance(result, Shapes):
                classes = sorted(result.classes)
                row.update(label=label_for(classes), defect_classes=classes,
                           annotation=result.annotation())
            elif isinstance(result, Unusable):
                if result.file is not None:
                    row["annotation"] = {"file": result.file}
                drop(row, "ingest", result.code, result.detail)
            elif unannotated == "drop":
                drop(row, "ingest", "unannotated",
                     f"{image}: no {fmt.upper()} annotation file for this image")
            else:
                row["label"] = GOOD
            rows.append(row)
        accounted = {*images, *inv.annotation_files, *(u["path"] for u in inv.unpaired)}
        ignore_rest(inv, files, accounted, f"neither an image nor a {fmt.upper()} annotation file")
        return Scan(rows, inv)

    def _detect_format(self, root: Path, files: list[str], images: list[str]) -> str:
        """The single format whose annotation files are under ``root``, for format=auto."""
        present = {
            "voc": _with_ext(files, ".xml"),
            "yolo": yolo_files(files, images),
            "coco": _with_ext(files, ".json"),
        }
        present = {fmt: paths for fmt, paths in present.items() if paths}
        if len(present) == 1:
            return next(iter(present))
        if not present:
            raise CurateError(f"{root}: no annotation files found (VOC .xml, YOLO .txt, COCO "
                              ".json); pass format=voc, yolo or coco to read the images as "
                              "unannotated")
        seen = "; ".join(f"{fmt.upper()}: {', '.join(paths[:2])}"
                         f"{' …' if len(paths) > 2 else ''}" for fmt, paths in present.items())
        raise CurateError(f"{root}: annotation files of several formats found ({seen}); pass "
                          "format=voc, yolo or coco")

    def _coco_file(self, root: Path, files: list[str], chosen: str | None) -> str:
        if chosen is not None:
            check_relative(chosen, "annotations option")
            if chosen not in files:
                raise CurateError(f"{root / chosen}: not found; the annotations option names "
                                  "the COCO JSON file, relative to the source folder")
            return chosen
        candidates = _with_ext(files, ".json")
        if len(candidates) != 1:
            listed = ", ".join(candidates) if candidates else "none"
            raise CurateError(f"{root}: expected exactly one COCO .json annotation file, found "
                              f"{listed}; pass annotations=<path relative to the folder>")
        return candidates[0]
