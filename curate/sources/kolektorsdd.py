"""KolektorSDD (KSDD; Tabernik et al., J. Intelligent Manufacturing 2020): electrical commutators.

Layout as distributed (both official releases, "fine" masks and "boxes" masks, share it)::

    kosNN/PartN.jpg          image (grayscale JPEG, 500 px wide, about 1250 px tall)
    kosNN/PartN_label.bmp    its mask, same stem plus ``_label``

The folder says nothing about the label: a sample is defective when its mask has any
foreground pixel, so rows leave ``label`` empty and the ingest stage decides it from the mask.
The ``release`` option does not change how files are read; it records, in the manifest's
source options, which of the two mask releases was ingested.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from curate.core.manifest import drop, new_row
from curate.sources.base import Reader, Scan, pair_masks_beside
from curate.sources.catalog import SourceInfo

_IN_KOS = re.compile(r"^kos\d+/[^/]+$")
MASK_SUFFIX = "_label"
RELEASES = ("fine", "boxes")
#: Samples the authors' own loader skips; the option ``skip_known_faulty`` follows it.
KNOWN_FAULTY = {"kos21/Part7": "the KolektorSDD authors' own loader skips it as a faulty sample"}


class KolektorSDDReader(Reader):
    kind = "kolektorsdd"
    info = SourceInfo(
        kind, "KolektorSDD", "https://www.vicos.si/resources/kolektorsdd/",
        "CC BY-NC-SA 4.0",
        "D. Tabernik, S. Šela, J. Skvarč, D. Skočaj, \"Segmentation-based deep-learning "
        "approach for surface-defect detection\", J. Intelligent Manufacturing 31(3):759-776, "
        "2020.",
        ("KolektorSDD", "KSDD", "KolektorSDD-boxes", "kolektor-sdd"))

    @staticmethod
    def looks_like(path: Path) -> bool:
        return any(d.is_dir() and re.fullmatch(r"kos\d+", d.name) for d in path.iterdir())

    category = "KolektorSDD"
    layout = "kosNN/PartN.jpg images with PartN_label.bmp masks beside them"
    options = {"release": "fine", "skip_known_faulty": True}
    option_values = {"release": RELEASES, "skip_known_faulty": bool}

    def scan(self, root: Path, source: str, options: dict[str, Any]) -> Scan:
        files, inv = self.walk(root)
        pairs = pair_masks_beside(files, inv, folder=_IN_KOS, mask_suffix=MASK_SUFFIX,
                                  elsewhere="not an image directly inside a kosNN folder")
        if not pairs:
            raise self.unrecognised(root)
        rows = []
        for stem, image, mask in pairs:
            row = new_row(source=source, path=image, category=options["category"])
            if mask is None:
                drop(row, "ingest", "missing_mask",
                     f"{image}: no mask {stem}{MASK_SUFFIX}.bmp beside the image")
            else:
                row["annotation"] = {"mask": mask}
            if options["skip_known_faulty"] and stem in KNOWN_FAULTY:
                drop(row, "ingest", "known_faulty",
                     f"{image}: {KNOWN_FAULTY[stem]} (pass skip_known_faulty=false to keep it)")
            rows.append(row)
        return Scan(rows, inv)
