"""KolektorSDD2 (KSDD2; Božič et al., Computers in Industry 2021).

Layout as distributed::

    train/<id>.png       image (colour PNG, about 230x630 px); <id> is a 5-digit number
    train/<id>_GT.png    its mask, same stem plus ``_GT``
    test/<id>.png, test/<id>_GT.png

Image and mask are both PNG: the mask is the file whose stem ends with ``_GT``. As for
KolektorSDD, a sample is defective when its mask has any foreground pixel, so rows leave
``label`` empty and the ingest stage decides it from the mask.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from curate.core.manifest import drop, new_row
from curate.sources.base import Reader, Scan, has_match, pair_masks_beside
from curate.sources.catalog import SourceInfo

_IN_SPLIT = re.compile(r"^(train|test)/[^/]+$")
MASK_SUFFIX = "_GT"


class KolektorSDD2Reader(Reader):
    kind = "kolektorsdd2"
    info = SourceInfo(
        kind, "KolektorSDD2", "https://www.vicos.si/resources/kolektorsdd2/",
        "CC BY-NC-SA 4.0",
        "J. Božič, D. Tabernik, D. Skočaj, \"Mixed supervision for surface-defect detection: "
        "from weakly to fully supervised learning\", Computers in Industry 129:103459, 2021.",
        ("KolektorSDD2", "KSDD2", "kolektor-sdd2"))

    @staticmethod
    def looks_like(path: Path) -> bool:
        return (path / "train").is_dir() and has_match(path / "train", "*_GT.png")

    category = "KolektorSDD2"
    layout = "train/<id>.png and test/<id>.png images with <id>_GT.png masks beside them"

    def scan(self, root: Path, source: str, options: dict[str, Any]) -> Scan:
        files, inv = self.walk(root)
        pairs = pair_masks_beside(files, inv, folder=_IN_SPLIT, mask_suffix=MASK_SUFFIX,
                                  elsewhere="not an image directly inside train/ or test/")
        if not pairs:
            raise self.unrecognised(root)
        rows = []
        for stem, image, mask in pairs:
            row = new_row(source=source, path=image, category=options["category"],
                          source_split=image.split("/", 1)[0])
            if mask is None:
                drop(row, "ingest", "missing_mask",
                     f"{image}: no mask {stem}{MASK_SUFFIX}.png beside the image")
            else:
                row["annotation"] = {"mask": mask}
            rows.append(row)
        return Scan(rows, inv)
