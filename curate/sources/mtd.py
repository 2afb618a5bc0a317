"""Magnetic-tile defect dataset (MTD; Huang, Qiu & Yuan, The Visual Computer 2020).

Layout as distributed (github.com/abin24/Magnetic-tile-defect-datasets.)::

    MT_<class>/Imgs/<stem>.jpg   image (grayscale JPEG)
    MT_<class>/Imgs/<stem>.png   its mask, same stem (anti-aliased: binarised by `labels`)

``MT_Free`` holds the defect-free images; every other class name is the defect label.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from curate.core.manifest import GOOD, drop, new_row
from curate.sources.base import Reader, Scan, has_match, is_image, stem_and_ext
from curate.sources.catalog import SourceInfo

_IN_IMGS = re.compile(r"^MT_([^/]+)/Imgs/([^/]+)$")
FREE = "Free"


class MTDReader(Reader):
    kind = "mtd"
    info = SourceInfo(
        kind, "Magnetic-tile defect (MTD)",
        "https://github.com/abin24/Magnetic-tile-defect-datasets.",
        "none published; the authors ask for citation (research use)",
        "Y. Huang, C. Qiu, K. Yuan, \"Surface defect saliency of magnetic tile\", The Visual "
        "Computer 36(1):85-96, 2020.",
        ("Magnetic-tile-defect-datasets.", "Magnetic-tile-defect-datasets",
         "Magnetic-tile-defect", "MTD", "magnetic-tile"))

    @staticmethod
    def looks_like(path: Path) -> bool:
        return has_match(path, "MT_*/Imgs")

    category = "Magnetic-tile-defect"
    layout = "MT_<class>/Imgs/<stem>.jpg images with <stem>.png masks beside them"

    def scan(self, root: Path, source: str, options: dict[str, Any]) -> Scan:
        files, inv = self.walk(root)
        groups: dict[tuple[str, str], dict[str, list[str]]] = {}
        for rel in files:
            m = _IN_IMGS.match(rel)
            if not m or not is_image(rel):
                inv.ignore(rel, "not an image under MT_<class>/Imgs/")
                continue
            stem, ext = stem_and_ext(rel)
            kind = "mask" if ext == ".png" else "image"
            groups.setdefault((m.group(1), stem), {"image": [], "mask": []})[kind].append(rel)
        if not groups:
            raise self.unrecognised(root)

        rows = []
        for (cls, _stem), g in sorted(groups.items()):
            if not g["image"]:
                for rel in g["mask"]:
                    inv.unpair(rel, "mask without an image of the same stem")
                continue
            for extra in g["image"][1:]:
                inv.unpair(extra, f"second image with the stem of {g['image'][0]}")
            image = g["image"][0]
            classes = [] if cls == FREE else [cls]
            row = new_row(source=source, path=image, category=options["category"],
                          label=GOOD if cls == FREE else cls, defect_classes=classes)
            if g["mask"]:
                row["annotation"] = {"mask": g["mask"][0]}
            else:
                drop(row, "ingest", "missing_mask",
                     f"{image}: no mask {stem_and_ext(image)[0]}.png beside the image")
            rows.append(row)
        return Scan(rows, inv)
