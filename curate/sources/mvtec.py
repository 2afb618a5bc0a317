"""The MVTec AD layout (Bergmann et al., CVPR 2019), which many anomaly datasets reuse.

Layout as distributed, per category::

    <Category>/train/good/<name>.png
    <Category>/test/good/<name>.png
    <Category>/test/<defect>/<name>.png
    <Category>/ground_truth/<defect>/<name>_mask.png    mask of test/<defect>/<name>.png

The root is either a folder of categories or one category folder (it has ``train/`` or
``test/`` itself); the category is the folder's name, or the ``category`` option for a single
category folder. The label is the folder an image sits in: ``good`` or the defect name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curate.core.errors import CurateError
from curate.core.manifest import GOOD, drop, new_row
from curate.sources.base import Reader, Scan, has_match, is_image, stem_and_ext
from curate.sources.catalog import SourceInfo

SPLITS = ("train", "test")
GROUND_TRUTH = "ground_truth"
MASK_SUFFIX = "_mask"


def category_folders(root: Path, files: list[str], category: str) -> dict[str, str]:
    """Path prefix of each category folder ('' for a single category folder) -> its name."""
    if any(f.split("/", 1)[0] in SPLITS for f in files if "/" in f):
        return {"": category or root.name}
    if category:
        raise CurateError(f"{root}: the category option names the category of a single "
                          "category folder, but this folder holds several categories")
    return {f"{parts[0]}/": parts[0] for parts in (f.split("/") for f in files)
            if len(parts) > 2 and parts[1] in SPLITS}


class MVTecReader(Reader):
    kind = "mvtec"
    info = SourceInfo(
        kind, "MVTec-AD layout", "https://www.mvtec.com/company/research/datasets/mvtec-ad",
        "as the folder's own dataset says (MVTec AD itself: CC BY-NC-SA 4.0)",
        "P. Bergmann, M. Fauser, D. Sattlegger, C. Steger, \"MVTec AD - a comprehensive "
        "real-world dataset for unsupervised anomaly detection\", CVPR 2019.",
        ("mvtec", "mvtec_anomaly_detection", "mvtec-ad"))

    @staticmethod
    def looks_like(path: Path) -> bool:
        return has_match(path, "*/train/good") or (path / "train" / "good").is_dir()

    #: Empty: the category is the folder's name (see the module docstring).
    category = ""
    layout = ("<Category>/train/good/*.png and <Category>/test/<defect>/*.png images with "
              "<Category>/ground_truth/<defect>/<name>_mask.png masks, or one such category "
              "folder")

    def scan(self, root: Path, source: str, options: dict[str, Any]) -> Scan:
        files, inv = self.walk(root)
        categories = category_folders(root, files, options["category"])
        # (prefix, split, label, stem) -> image: one image per name, as one mask per image
        images: dict[tuple[str, str, str, str], str] = {}
        masks: dict[tuple[str, str, str], str] = {}  # (prefix, defect, image stem) -> mask
        for rel in files:
            prefix = "" if "" in categories else rel.split("/", 1)[0] + "/"
            parts = rel.removeprefix(prefix).split("/")
            stem = stem_and_ext(parts[-1])[0]
            if prefix not in categories or len(parts) != 3 or not is_image(rel):
                inv.ignore(rel, "not an image at <category>/<split>/<label>/<name> or "
                                "<category>/ground_truth/<defect>/<name>_mask.png")
            elif parts[0] in SPLITS:
                key = (prefix, parts[0], parts[1], stem)
                if key in images:
                    inv.unpair(rel, f"a second image with the stem of {images[key]} (one image "
                                    "per name: a mask names the image it belongs to by stem)")
                else:
                    images[key] = rel
            elif parts[0] == GROUND_TRUTH and stem.endswith(MASK_SUFFIX):
                mask_key = (prefix, parts[1], stem.removesuffix(MASK_SUFFIX))
                if mask_key in masks:
                    inv.unpair(rel, f"a second mask for the same image as {masks[mask_key]}")
                else:
                    masks[mask_key] = rel
            else:
                inv.ignore(rel, "an image in a category folder, but neither in train/ or "
                                "test/ nor a ground_truth/<defect>/<name>_mask.png")
        if not images:
            raise self.unrecognised(root)

        used: set[str] = set()
        rows = []
        for (prefix, split, label, stem), rel in images.items():
            row = new_row(source=source, path=rel, category=categories[prefix],
                          source_split=split, label=label,
                          defect_classes=[] if label == GOOD else [label])
            if label != GOOD:
                mask = masks.get((prefix, label, stem))
                if mask is None:
                    drop(row, "ingest", "missing_mask", f"{rel}: no mask {prefix}{GROUND_TRUTH}"
                                                        f"/{label}/{stem}{MASK_SUFFIX}.png")
                else:
                    row["annotation"] = {"mask": mask}
                    used.add(mask)
            rows.append(row)
        for mask in masks.values():
            if mask not in used:
                inv.unpair(mask, "mask without a defect image of the same name")
        return Scan(rows, inv)
