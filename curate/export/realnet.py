"""Sample lists for RealNet's loader, written beside an MVTec export.

    <export>/realnet/train_<Category>.json    the train images of one category
    <export>/realnet/test_<Category>.json     its test images, good and defective
    <export>/realnet/train_uni.json           every category's train images (multi-class runs)
    <export>/realnet/test_uni.json            every category's test images

Each file is JSON Lines, one sample per line (not one JSON document: RealNet calls
``json.loads`` on each line), sorted by file name, keys sorted::

    {"clsname": "bottle", "filename": "bottle/train/good/000.png", "label": 0, "label_name": "good"}
    {"clsname": "bottle", "filename": "bottle/test/broken_large/000.png", "label": 1,
     "label_name": "defective", "maskname": "bottle/ground_truth/broken_large/000_mask.png"}

(the second is one line in the file). Paths are relative to the export root, which is what
RealNet's ``image_reader.kwargs.image_dir`` must name; its ``meta_file`` is then
``<export>/realnet/train_{}.json`` and ``<export>/realnet/test_{}.json`` (``train_realnet.py``
replaces ``{}`` with ``--class_name``). Both files are written for every category, even when
one is empty (everything is exported under ``test/`` while no split is assigned), so that
template always resolves.

What RealNet reads, from github.com/cnulab/RealNet (commit ab75012):

- ``datasets/realnet_dataset.py`` and ``datasets/sdas_dataset.py``: the meta file is read
  line by line with ``json.loads``; ``filename`` (image) and ``label`` (0 good, 1 defective)
  are required; ``maskname`` is optional and, when absent, the mask is all 0 for label 0 and
  all 255 for label 1; ``clsname`` is optional and otherwise taken as ``filename``'s fourth
  part from the end (``<Category>/<split>/<label>/<name>``). ``label_name`` is not read.
- ``datasets/image_reader.py``: ``filename`` and ``maskname`` are joined to ``image_dir``.
- ``experiments/MVTec-AD/realnet.yaml`` (``meta_file: data/MVTec-AD/samples/train_{}.json``,
  ``image_dir: data/MVTec-AD/mvtec/``), ``train_realnet.py`` (the ``{}`` replacement) and
  ``experiments/*/classifier.yaml``, ``diffusion.yaml`` (``train_uni.json``).
- ``data/*/samples/*.json``, the lists RealNet ships: ``label_name`` is always ``"good"`` with
  label 0 and ``"defective"`` with label 1 (never the defect type), ``maskname`` is on every
  defective test sample and on no good one, ``clsname`` is on every sample except in the
  per-category MVTec-AD test lists. We always write ``clsname``.

The same line format is UniAD's ``custom`` dataset (RealNet builds on UniAD), so these lists
should serve it too; not checked against UniAD's own code.

Not confirmed: RealNet's ``--class_name`` only accepts the categories of its four datasets
and its foreground segmentation (``generate_target_foreground_mask``) raises for other
categories, so training on a category of ours needs those two places extended in RealNet.
A defective image without a mask would be read as defective everywhere; curate's MVTec
export never lists one, nor one whose mask is empty (it skips such samples).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from curate.core.errors import CurateError
from curate.export.index import SPLITS, ExportedImage, exported_images, read_report, write_lists
from curate.export.mvtec import MARKER

FOLDER = "realnet"
#: The name RealNet gives the all-category lists, in place of a category.
ALL = "uni"


def _line(image: ExportedImage) -> str:
    sample = {"filename": image.file, "label": 0 if image.good else 1,
              "label_name": "good" if image.good else "defective", "clsname": image.category}
    if image.mask is not None:
        sample["maskname"] = image.mask
    return json.dumps(sample, sort_keys=True) + "\n"


def _lines(images: Iterable[ExportedImage]) -> str:
    return "".join(_line(image) for image in images)


def export_realnet(export_dir: str | os.PathLike, report: dict[str, Any] | None = None
                   ) -> list[Path]:
    """Write RealNet's sample lists for the export at ``export_dir``; returns their paths.
    ``report`` is the export's report where the caller holds it (the build that has just
    written it); without it, it is read from the export's ``curate-export.json``."""
    export_dir = Path(export_dir)
    images = exported_images(read_report(export_dir) if report is None else report, export_dir)
    categories = sorted({image.category for image in images})
    if ALL in categories:
        raise CurateError(f"{export_dir / MARKER}: a category named {ALL!r} would overwrite "
                          f"RealNet's all-category lists {FOLDER}/train_{ALL}.json and "
                          f"test_{ALL}.json: rename it")
    texts = {}
    for split in SPLITS:
        in_split = [image for image in images if image.split == split]
        for category in categories:
            texts[f"{split}_{category}.json"] = _lines(
                image for image in in_split if image.category == category)
        texts[f"{split}_{ALL}.json"] = _lines(in_split)
    return write_lists(export_dir / FOLDER, texts)
