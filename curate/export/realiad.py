"""Per-category JSON files in Real-IAD's format (``realiad_jsons``), written beside an MVTec
export.

    <export>/realiad/<Category>.json

one per category, holding that category's train and test images (every exported image is
in exactly one file)::

    {
     "meta": {"normal_class": "OK", "prefix": "bottle"},
     "test": [
      {"anomaly_class": "broken_large", "category": "bottle",
       "image_path": "test/broken_large/000.png",
       "mask_path": "ground_truth/broken_large/000_mask.png"},
      {"anomaly_class": "OK", "category": "bottle", "image_path": "test/good/000.png",
       "mask_path": null}
     ],
     "train": [
      {"anomaly_class": "OK", "category": "bottle", "image_path": "train/good/000.png",
       "mask_path": null}
     ]
    }

written with ``indent=1`` and sorted keys, each list sorted by ``image_path``. Good images
have ``anomaly_class`` ``"OK"`` (Real-IAD's ``normal_class``) and ``mask_path`` null; a
defective image has its defect label (our folder name, where Real-IAD has codes such as
``"AK"``) and its mask. ``image_path`` and ``mask_path`` are relative to the category folder
and ``meta.prefix`` is that folder's name, so ``prefix/image_path`` is relative to the export
root: the loader's ``image_reader.kwargs.image_dir`` names the export root and its
``meta_file`` lists ``<export>/realiad/<Category>.json``.

What the loaders read:

- github.com/Tencent/AnomalyDetection_Real-IAD (commit 98c28ff),
  ``datasets/explicit_dataset.py`` (``ExplicitDataset.load_explicit``): the file is one JSON
  object with ``meta``, ``train`` and ``test``; every sample must have exactly the keys
  ``category``, ``anomaly_class``, ``image_path``, ``mask_path`` (an assert, so we add none);
  ``meta.prefix`` is joined before both paths and ``meta.normal_class`` names the good class.
  Train samples are all taken as good (label 0, masks unused); a test sample is good when
  ``mask_path`` is null or ``anomaly_class`` equals ``normal_class``. Paths are then joined
  to ``image_dir`` by ``datasets/image_reader.py``. ``experiments/RealIAD-C1/config.yaml``
  (``image_dir: data/Real-IAD/realiad_1024``, ``meta_file`` one per category under
  ``data/Real-IAD/realiad_jsons_sv/``) and ``README.md`` (``realiad_jsons`` beside
  ``realiad_1024``, one ``<category>.json`` each) give the layout.
- github.com/zhangzjn/ADer, ``data/ad_dataset.py`` (class ``RealIAD``): ignores ``meta`` and
  reads ``<root>/<category>.json`` with images at ``<root>/<category>/<image_path>``, masks at
  ``<root>/<category>/<mask_path>``, good meaning ``anomaly_class == "OK"``. Hence our
  ``prefix`` is the category folder and ``normal_class`` is ``"OK"``: the same file serves
  both. ADer wants the JSON files in the image root itself, so copy or link
  ``realiad/*.json`` into the export root (and name the categories: ADer otherwise takes
  every name in that root as one).

Because the official loader takes a test sample without a mask as good, and one labelled
``"OK"`` likewise, a defective image with either is refused rather than silently counted
good (curate's MVTec export lists neither).

Not confirmed: the ``prefix`` value in the released ``realiad_jsons`` (no copy found; ADer's
use implies the category folder name, as here) and whether the noisy-training
``realiad_jsons_fuiad_*`` lists keep defective train samples' own ``anomaly_class`` and
``mask_path`` (we do). Real-IAD's sample-level metric groups the five views of one object by
file name (``--sample_key_pat`` in ``README.md``); our names do not follow that pattern, so
only image- and pixel-level metrics apply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from curate.core.errors import CurateError
from curate.export.index import SPLITS, ExportedImage, exported_images, read_report, write_lists
from curate.export.mvtec import MARKER

FOLDER = "realiad"
NORMAL_CLASS = "OK"


def _sample(image: ExportedImage) -> dict[str, str | None]:
    def in_category(rel: str) -> str:
        return str(PurePosixPath(rel).relative_to(image.category))

    return {"category": image.category,
            "anomaly_class": NORMAL_CLASS if image.good else image.label,
            "image_path": in_category(image.file),
            "mask_path": None if image.mask is None else in_category(image.mask)}


def export_realiad(export_dir: str | os.PathLike, report: dict[str, Any] | None = None
                   ) -> list[Path]:
    """Write one Real-IAD JSON per category of the export at ``export_dir``; returns their
    paths. ``report`` is the export's report where the caller holds it (the build that has
    just written it); without it, it is read from the export's ``curate-export.json``."""
    export_dir = Path(export_dir)
    images = exported_images(read_report(export_dir) if report is None else report, export_dir)
    for image in images:
        if not image.good and (image.mask is None or image.label == NORMAL_CLASS):
            why = "no mask" if image.mask is None else f"the label {NORMAL_CLASS!r}"
            raise CurateError(f"{export_dir / MARKER}: {image.file} is defective but has {why}: "
                              "Real-IAD's loader would read it as good")
    texts = {}
    for category in sorted({image.category for image in images}):
        doc: dict = {"meta": {"prefix": category, "normal_class": NORMAL_CLASS}}
        for split in SPLITS:
            # exported_images sorts by file, so each list comes out sorted by image_path.
            doc[split] = [_sample(i) for i in images
                          if i.category == category and i.split == split]
        texts[f"{category}.json"] = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    return write_lists(export_dir / FOLDER, texts)
