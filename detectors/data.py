"""Reading an MVTec-AD-layout dataset (what `curate export mvtec` writes) without curate.

    <root>/<Category>/train/good/*.png
    <root>/<Category>/test/<good|defect>/*.png
    <root>/<Category>/ground_truth/<defect>/<name>_mask.png

Any image extension is accepted (an export made with ``--images keep`` keeps the sources'
formats). A test image of a defect folder without its mask is an error naming both files: pixel
metrics computed with a silently missing mask would be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


class DatasetError(ValueError):
    """The folder is not a readable MVTec-layout dataset; the message names the file."""


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image as H×W×3 uint8 RGB (grey images are repeated over the channels)."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise DatasetError(f"{path}: not a decodable image")
    return np.ascontiguousarray(image[:, :, ::-1])


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask as H×W bool (any non-zero pixel is anomalous)."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if mask is None:
        raise DatasetError(f"{path}: not a decodable mask image")
    return mask > 0


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class CategorySplit:
    """One category: its normal training images and its labelled test images."""

    name: str
    train: list[Path] = field(default_factory=list)
    test: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # 1 = anomalous
    masks: list[Path | None] = field(default_factory=list)  # None for good images
    defects: list[str] = field(default_factory=list)

    def read_mask(self, index: int, shape: tuple[int, int]) -> np.ndarray:
        """The test image's mask (all False for a good image), checked against its size."""
        path = self.masks[index]
        if path is None:
            return np.zeros(shape, dtype=bool)
        mask = read_mask(path)
        if mask.shape != tuple(shape):
            raise DatasetError(f"{path}: mask is {mask.shape[1]}×{mask.shape[0]} but its image "
                               f"{self.test[index]} is {shape[1]}×{shape[0]}")
        return mask


def _mask_for(root: Path, defect: str, image: Path) -> Path:
    folder = root / "ground_truth" / defect
    for suffix in (".png", image.suffix):
        candidate = folder / f"{image.stem}_mask{suffix}"
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{image}: anomalous test image without a mask; expected "
                       f"{folder / (image.stem + '_mask.png')}")


def read_category(root: str | Path) -> CategorySplit:
    root = Path(root)
    split = CategorySplit(root.name, train=_images(root / "train" / GOOD))
    test = root / "test"
    for folder in sorted(p for p in test.iterdir() if p.is_dir()) if test.is_dir() else []:
        for image in _images(folder):
            good = folder.name == GOOD
            split.test.append(image)
            split.labels.append(0 if good else 1)
            split.defects.append(folder.name)
            split.masks.append(None if good else _mask_for(root, folder.name, image))
    return split


def read_mvtec(root: str | Path, categories: list[str] | None = None) -> dict[str, CategorySplit]:
    """Every category folder of an MVTec-layout dataset (those with train/ or test/)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    found = {p.name: p for p in sorted(root.iterdir())
             if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir())}
    if not found:
        raise DatasetError(f"{root}: no category folders with train/ or test/ (MVTec AD layout "
                           "expected: <root>/<Category>/train/good, test/<defect>, ground_truth/)")
    if categories:
        missing = [c for c in categories if c not in found]
        if missing:
            raise DatasetError(f"{root}: no category {', '.join(missing)} (has "
                               f"{', '.join(found)})")
        found = {c: found[c] for c in categories}
    return {name: read_category(path) for name, path in found.items()}
