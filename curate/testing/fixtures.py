"""Tiny datasets in each source's original layout, drawn from a seed (tests and ``curate demo``).

Nothing is downloaded: each ``write_*`` function draws small textured images with visible
synthetic defects and writes them, with their masks or annotation files, exactly as the
source distributes them (folder names, file names, formats, channels, aspect ratio; images
are only much smaller). It returns a :class:`Fixture` that says what it drew, so a test can
compare what curate reads with the truth. The same seed writes the same files.

The defect shapes are chosen so that every annotation format renders them exactly under
``curate.imaging.masks``'s pixel-centre rule: boxes have integer edges, and polygons are diamonds whose
half-width is odd and half-height even, so no pixel centre lies on their border.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from curate.imaging.io import encode_png
from curate.imaging.masks import rle_encode
from curate.sources import CATALOG


@dataclass
class Drawn:
    """One sample as written: the label curate should give it, and its defect pixels."""

    label: str
    split: str | None = None
    #: Defect pixels (bool, H x W) as drawn; None for a good image.
    mask: np.ndarray | None = None
    #: Defect pixels per annotation class, for images with several classes (the labels
    #: stage stores these as ``mask:<class>``).
    class_masks: dict[str, np.ndarray] = field(default_factory=dict)
    #: Castings only: the HSS-IAD class the scene was drawn as (C1, C2 or C3).
    casting_class: str | None = None


@dataclass
class Fixture:
    kind: str
    root: Path
    #: Image path relative to ``root`` -> what was drawn there.
    samples: dict[str, Drawn]

    def counts(self) -> Counter[tuple[str | None, str]]:
        """Number of samples by (source split, label)."""
        return Counter((s.split, s.label) for s in self.samples.values())


# --------------------------------------------------------------------------- drawing
def _texture(rng: np.random.Generator, height: int, width: int, channels: int = 1
             ) -> np.ndarray:
    """A smooth grey or colour surface with grain: a gradient plus blurred noise."""
    ramp = np.linspace(0, 40, width, dtype=np.float32)[None, :] + \
        np.linspace(0, 30, height, dtype=np.float32)[:, None]
    shape = (height, width) if channels == 1 else (height, width, channels)
    noise = cv2.GaussianBlur(rng.normal(0, 25, shape).astype(np.float32), (0, 0), 1.2)
    base = rng.uniform(90, 140, channels if channels > 1 else 1).astype(np.float32)
    pixels = base + noise + (ramp if channels == 1 else ramp[:, :, None])
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _darken(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with a clearly visible defect (darker by 70 grey levels) where ``mask``."""
    out = pixels.astype(np.int16)
    out[mask] -= 70
    return np.clip(out, 0, 255).astype(np.uint8)


def _rect(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """A random box (x0, y0, x1, y1) with integer edges, a few pixels inside the image."""
    w = int(rng.integers(3, max(4, width // 3)))
    h = int(rng.integers(3, max(4, height // 3)))
    x0 = int(rng.integers(1, width - w - 1))
    y0 = int(rng.integers(1, height - h - 1))
    return x0, y0, x0 + w, y0 + h


def _rect_mask(box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _blob(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random filled ellipse, elongated like a crack or round like a blowhole."""
    canvas = np.zeros((height, width), np.uint8)
    centre = (int(rng.integers(width // 4, 3 * width // 4)),
              int(rng.integers(height // 4, 3 * height // 4)))
    axes = (int(rng.integers(2, max(3, width // 4))), int(rng.integers(1, max(2, height // 5))))
    cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return canvas > 0


def _diamond(rng: np.random.Generator, height: int, width: int
             ) -> tuple[list[list[int]], np.ndarray]:
    """A diamond's vertices and its mask under the pixel-centre rule.

    Half-width ``a`` odd and half-height ``b`` even: in units of half a pixel, a centre at
    horizontal distance ``dx`` and vertical ``dy`` is inside when ``b*dx + a*dy <= 2ab``; the
    left side is then odd and the right even, so no centre is ever on the border and the mask
    does not depend on rounding (YOLO stores the vertices as fractions of the image size).
    """
    a = 2 * int(rng.integers(1, max(2, width // 8))) + 1
    b = 2 * int(rng.integers(1, max(2, height // 8)))
    cx = int(rng.integers(a + 1, width - a - 1))
    cy = int(rng.integers(b + 1, height - b - 1))
    cols = np.abs(2 * np.arange(width) + 1 - 2 * cx)[None, :]
    rows = np.abs(2 * np.arange(height) + 1 - 2 * cy)[:, None]
    mask = b * cols + a * rows <= 2 * a * b
    return [[cx, cy - b], [cx + a, cy], [cx, cy + b], [cx - a, cy]], mask


def _anti_aliased(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8-bit mask with soft edges like MTD's: grey values in (127, 255) on the inner rim
    and in (0, 127] on the outer rim, so thresholding at 127 gives back ``mask`` exactly."""
    kernel = np.ones((3, 3), np.uint8)
    m8 = mask.astype(np.uint8)
    inner = mask & ~cv2.erode(m8, kernel).astype(bool)
    outer = cv2.dilate(m8, kernel).astype(bool) & ~mask
    out = np.where(mask, 255, 0).astype(np.uint8)
    out[inner] = rng.integers(128, 255, int(inner.sum()))
    out[outer] = rng.integers(1, 128, int(outer.sum()))
    return out


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    """JPEG bytes of grey or RGB pixels."""
    bgr = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes()


def _encode_bmp(pixels: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".bmp", pixels)
    if not ok:
        raise RuntimeError("OpenCV could not encode a BMP")
    return buf.tobytes()


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


def _mask_png(mask: np.ndarray) -> bytes:
    return encode_png(np.where(mask, 255, 0).astype(np.uint8))


# --------------------------------------------------------------------------- KolektorSDD
def write_kolektorsdd(root: str | Path, *, seed: int = 0, folders: int = 3, parts: int = 4,
                      release: str = "fine") -> Fixture:
    """``kosNN/PartN.jpg`` (grey JPEG, 64 px wide and 160-161 tall: KSDD's 500 x ~1250 aspect)
    with ``PartN_label.bmp`` masks; one defective part per folder. ``release="boxes"`` fills
    the defect's bounding rectangle, as the boxes release does."""
    if release not in ("fine", "boxes"):
        raise ValueError(f"release must be 'fine' or 'boxes', got {release!r}")
    root, rng = Path(root), np.random.default_rng(seed)
    samples = {}
    for k in range(1, folders + 1):
        defective = int(rng.integers(parts))
        for n in range(parts):
            height, width = int(rng.integers(160, 162)), 64
            mask = np.zeros((height, width), bool)
            if n == defective:
                mask = _blob(rng, height, width)
                if release == "boxes":
                    ys, xs = np.nonzero(mask)
                    mask = _rect_mask((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1),
                                      height, width)
            image = f"kos{k:02d}/Part{n}.jpg"
            _write(root / image, _encode_jpeg(_darken(_texture(rng, height, width), mask)))
            _write(root / f"kos{k:02d}/Part{n}_label.bmp",
                   _encode_bmp(np.where(mask, 255, 0).astype(np.uint8)))
            samples[image] = Drawn("defect", mask=mask) if mask.any() else Drawn("good")
    return Fixture("kolektorsdd", root, samples)


# --------------------------------------------------------------------------- KolektorSDD2
def write_kolektorsdd2(root: str | Path, *, seed: int = 0, train: int = 4, test: int = 3
                       ) -> Fixture:
    """``train|test/<id>.png`` (colour PNG, 64 x 176: KSDD2's ~230 x 630 aspect) with
    ``<id>_GT.png`` masks; every other image is defective."""
    root, rng = Path(root), np.random.default_rng(seed)
    samples = {}
    ids = iter(range(10000, 10000 + train + test))
    for split, count in (("train", train), ("test", test)):
        for n in range(count):
            height, width = 176, 64
            mask = _blob(rng, height, width) if n % 2 else np.zeros((height, width), bool)
            image = f"{split}/{next(ids)}.png"
            _write(root / image, encode_png(_darken(_texture(rng, height, width, 3), mask)))
            _write(root / image.replace(".png", "_GT.png"), _mask_png(mask))
            samples[image] = (Drawn("defect", split, mask) if mask.any()
                              else Drawn("good", split))
    return Fixture("kolektorsdd2", root, samples)


# --------------------------------------------------------------------------- MTD
MTD_CLASSES = ("Blowhole", "Crack", "Free")


def write_mtd(root: str | Path, *, seed: int = 0, per_class: int = 3) -> Fixture:
    """``MT_<class>/Imgs/<stem>.jpg`` (grey JPEG, 64-96 px a side, not square) with
    anti-aliased ``<stem>.png`` masks; ``MT_Free`` holds the good images (empty masks)."""
    root, rng = Path(root), np.random.default_rng(seed)
    samples = {}
    for cls in MTD_CLASSES:
        for n in range(per_class):
            height, width = int(rng.integers(64, 97)), int(rng.integers(64, 97))
            mask = np.zeros((height, width), bool) if cls == "Free" else _blob(rng, height, width)
            stem = f"MT_{cls}/Imgs/exp{n % 3}_num_{1009 * n + 17}"
            _write(root / f"{stem}.jpg", _encode_jpeg(_darken(_texture(rng, height, width), mask)))
            _write(root / f"{stem}.png", encode_png(_anti_aliased(mask, rng)))
            samples[f"{stem}.jpg"] = Drawn("good") if cls == "Free" else Drawn(cls, mask=mask)
    return Fixture("mtd", root, samples)


# --------------------------------------------------------------------------- Severstal
#: Defect classes of each train image written, in order: two good, three single-class and
#: one with two classes.
SEVERSTAL_TRAIN = ((), (), ("1",), ("3",), ("4",), ("1", "3"))
SEVERSTAL_SIZE = (64, 400)  # height, width: the real 256 x 1600 divided by 4


def _image_ids(rng: np.random.Generator, count: int) -> Iterator[str]:
    """Distinct Kaggle-style ImageIds: nine hex digits and ``.jpg``."""
    ids: dict[str, None] = {}
    while len(ids) < count:
        ids[f"{int(rng.integers(16 ** 9)):09x}.jpg"] = None
    return iter(ids)


def write_severstal(root: str | Path, *, seed: int = 0, csv_layout: str = "long",
                    test: int = 2) -> Fixture:
    """``train_images/<ImageId>.jpg`` (3-channel JPEG of grey steel), ``test_images/``,
    ``train.csv`` in the ``long`` (``ImageId,ClassId,EncodedPixels``) or legacy ``wide``
    (``ImageId_ClassId,EncodedPixels``) layout, and ``sample_submission.csv``."""
    if csv_layout not in ("long", "wide"):
        raise ValueError(f"csv_layout must be 'long' or 'wide', got {csv_layout!r}")
    root, rng = Path(root), np.random.default_rng(seed)
    height, width = SEVERSTAL_SIZE
    samples = {}
    lines = []
    ids = _image_ids(rng, len(SEVERSTAL_TRAIN) + test)
    for classes in SEVERSTAL_TRAIN:
        image_id = next(ids)
        pixels = _texture(rng, height, width)
        class_masks: dict[str, np.ndarray] = {}
        for k, cls in enumerate(classes):
            # Side by side, so the classes of one image do not overlap (as in the real data).
            mask = _blob(rng, height, width // 2)
            class_masks[cls] = np.pad(mask, ((0, 0), (k * width // 2, (1 - k) * width // 2)))
            pixels = _darken(pixels, class_masks[cls])
        _write(root / "train_images" / image_id, _encode_jpeg(np.dstack([pixels] * 3)))
        for cls in ("1", "2", "3", "4"):
            counts = rle_encode(class_masks[cls]) if cls in class_masks else ""
            if csv_layout == "wide":
                lines.append(f"{image_id}_{cls},{counts}")
            elif counts:
                lines.append(f"{image_id},{cls},{counts}")
        label = ("good" if not classes else f"class{classes[0]}" if len(classes) == 1
                 else "combined")
        union = np.any(list(class_masks.values()), axis=0) if class_masks else None
        named = {f"class{k}": m for k, m in class_masks.items()}  # as the reader names them
        samples[f"train_images/{image_id}"] = Drawn(
            label, "train", union, named if len(named) > 1 else {})
    header = "ImageId_ClassId,EncodedPixels" if csv_layout == "wide" else \
        "ImageId,ClassId,EncodedPixels"
    _write(root / "train.csv", "\n".join([header, *lines]) + "\n")
    submission = ["ImageId,EncodedPixels,ClassId"]
    for image_id in ids:
        _write(root / "test_images" / image_id,
               _encode_jpeg(np.dstack([_texture(rng, height, width)] * 3)))
        submission.append(f"{image_id},1 1,0")
    _write(root / "sample_submission.csv", "\n".join(submission) + "\n")
    return Fixture("severstal", root, samples)


# --------------------------------------------------------------------------- casting
CASTING_SIZE = (144, 192)  # height, width
CASTING_CLASSES = ("C1", "C2", "C3")


def casting_scene(rng: np.random.Generator, cls: str, height: int, width: int) -> np.ndarray:
    """A grey casting scene of HSS-IAD class ``cls`` (paper, III-A), drawn to be recognisable:

    - C1: rough cast surface with one large, simple machined (bright, smooth, finely striped)
      face, no threaded holes;
    - C2: a machined face with several threaded holes (dark discs with thread rings);
    - C3: cast surface cluttered with interference (oil stains, residues, marks), a small
      machined patch at most, no more than one hole.
    """
    cast = cv2.GaussianBlur(rng.normal(95, 28, (height, width)).astype(np.float32), (0, 0), 0.8)
    scene = cast.copy()

    def machined(x0: int, y0: int, x1: int, y1: int) -> None:
        stripes = 4 * np.sin(np.arange(x1 - x0, dtype=np.float32) / 1.3)[None, :]
        scene[y0:y1, x0:x1] = 205 + stripes + rng.normal(0, 1.5, (y1 - y0, x1 - x0))

    def hole(cx: int, cy: int, r: int) -> None:
        canvas = np.zeros((height, width), np.uint8)
        cv2.circle(canvas, (cx, cy), r, 255, -1)
        scene[canvas > 0] = 35
        for ring in range(r // 3, r, 3):  # the thread
            cv2.circle(scene, (cx, cy), ring, 60, 1)

    side = min(height, width)
    if cls == "C1":
        machined(width // 5, height // 5, 4 * width // 5, 4 * height // 5)
    elif cls == "C2":
        machined(width // 8, height // 8, 7 * width // 8, 7 * height // 8)
        r = max(4, side // 12)
        for k in range(4):
            hole(width // 4 + (k % 2) * width // 2, height // 3 + (k // 2) * height // 3, r)
    elif cls == "C3":
        machined(width // 10, height // 10, width // 10 + width // 5, height // 10 + height // 6)
        for _ in range(25):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1, y1 = x0 + int(rng.integers(-side // 3, side // 3)), y0 + int(rng.integers(-side // 3, side // 3))
            cv2.line(scene, (x0, y0), (x1, y1), float(rng.uniform(30, 230)), int(rng.integers(1, 3)))
        for _ in range(8):
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (int(rng.integers(3, side // 6)), int(rng.integers(3, side // 8)))
            cv2.ellipse(scene, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                        float(rng.uniform(20, 240)), -1)
    else:
        raise ValueError(f"casting class must be one of {', '.join(CASTING_CLASSES)}")
    return np.clip(scene, 0, 255).astype(np.uint8)


def _voc_xml(name: str, height: int, width: int,
             boxes: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    objects = "".join(
        f"  <object>\n    <name>{cls}</name>\n    <difficult>0</difficult>\n"
        # The VOC devkit counts pixels from 1, both ends inclusive.
        f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox>\n  </object>\n"
        for cls, (x0, y0, x1, y1) in boxes)
    return (f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{name}</filename>\n"
            f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n"
            f"{objects}</annotation>\n")


def write_casting(root: str | Path, *, seed: int = 0, format: str = "voc") -> Fixture:
    """Colour JPEG castings with box annotations in Pascal VOC, YOLO or COCO form.

    Nine images: one good with an empty annotation, one good with none at all, one with a
    ``pit`` box, one with two ``pit`` boxes, one ``scratch``, one ``combined`` (a ``pit`` box
    and a ``scratch``), and three more good ones. The scenes are drawn as HSS-IAD classes C1,
    C2, C3, C1, … in turn (:func:`casting_scene`; ``Drawn.casting_class``), so that each class
    has good and defective images. Scratches are diamond polygons in YOLO and COCO and their
    bounding boxes in VOC, which has no polygons.

    - voc: ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml``, ``ImageSets/Main/trainval.txt``;
    - yolo: ``images/train/<id>.jpg``, ``labels/train/<id>.txt``, ``data.yaml``;
    - coco: ``images/<id>.jpg`` and ``annotations.json`` at the root.
    """
    if format not in ("voc", "yolo", "coco"):
        raise ValueError(f"format must be 'voc', 'yolo' or 'coco', got {format!r}")
    root, rng = Path(root), np.random.default_rng(seed)
    height, width = CASTING_SIZE
    names = ["pit", "scratch"]
    plan: list[tuple[str, ...] | None] = [(), None, ("pit",), ("pit", "pit"), ("scratch",),
                                          ("pit", "scratch"), (), (), ()]
    image_dir = {"voc": "JPEGImages", "yolo": "images/train", "coco": "images"}[format]
    samples = {}
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    for n, shapes in enumerate(plan):
        stem = f"cast_{n:04d}"
        scene_class = CASTING_CLASSES[n % len(CASTING_CLASSES)]
        pixels = np.dstack([casting_scene(rng, scene_class, height, width)] * 3)
        union = np.zeros((height, width), bool)
        class_masks: dict[str, np.ndarray] = {}
        boxes: list[tuple[str, tuple[int, int, int, int]]] = []
        polygons: list[tuple[str, list[list[int]]]] = []
        for cls in shapes or ():
            if cls == "scratch" and format != "voc":
                points, mask = _diamond(rng, height, width)
                polygons.append((cls, points))
            else:
                box = _rect(rng, height, width)
                mask = _rect_mask(box, height, width)
                boxes.append((cls, box))
            union |= mask
            class_masks[cls] = class_masks.get(cls, np.zeros_like(mask)) | mask
        image = f"{image_dir}/{stem}.jpg"
        _write(root / image, _encode_jpeg(_darken(pixels, union)))
        classes = sorted(class_masks)
        label = "good" if not classes else classes[0] if len(classes) == 1 else "combined"
        samples[image] = Drawn(label, mask=union if classes else None,
                               class_masks=class_masks if len(classes) > 1 else {},
                               casting_class=scene_class)
        if format == "coco":
            coco["images"].append({"id": n + 1, "file_name": f"{stem}.jpg", "width": width,
                                   "height": height})
            for cls, (x0, y0, x1, y1) in boxes:
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": n + 1, "iscrowd": 0,
                    "category_id": names.index(cls) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0)})
            for cls, points in polygons:
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": n + 1, "iscrowd": 0,
                    "category_id": names.index(cls) + 1,
                    "segmentation": [[v for p in points for v in p]],
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
        elif shapes is None:
            continue  # the image without any annotation file
        elif format == "voc":
            _write(root / f"Annotations/{stem}.xml", _voc_xml(f"{stem}.jpg", height, width, boxes))
        else:
            lines = [f"{names.index(cls)} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
                     f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"
                     for cls, (x0, y0, x1, y1) in boxes]
            lines += [f"{names.index(cls)} " + " ".join(f"{x / width:.6f} {y / height:.6f}"
                                                       for x, y in points)
                      for cls, points in polygons]
            _write(root / f"labels/train/{stem}.txt", "".join(f"{line}\n" for line in lines))
    if format == "voc":
        _write(root / "ImageSets/Main/trainval.txt",
               "".join(f"cast_{n:04d}\n" for n in range(len(plan))))
    elif format == "yolo":
        _write(root / "data.yaml", f"path: .\ntrain: images/train\nnames: {json.dumps(names)}\n")
    else:
        _write(root / "annotations.json", json.dumps(coco, indent=1))
    return Fixture("casting", root, samples)


# --------------------------------------------------------------------------- MVTec AD
MVTEC_CATEGORIES = {"bottle": (3, ("broken_large", "contamination")), "grid": (1, ("bent",))}


def write_mvtec(root: str | Path, *, seed: int = 0, train: int = 3, test_good: int = 2,
                per_defect: int = 2) -> Fixture:
    """``<category>/train/good``, ``test/good``, ``test/<defect>`` PNGs (32 x 32; ``bottle`` in
    colour, ``grid`` grey) with ``ground_truth/<defect>/<name>_mask.png``, and MVTec's
    ``license.txt`` and ``readme.txt`` at the root."""
    root, rng = Path(root), np.random.default_rng(seed)
    samples = {}
    for category, (channels, defects) in MVTEC_CATEGORIES.items():
        folders = [("train", "good", train), ("test", "good", test_good)]
        folders += [("test", d, per_defect) for d in defects]
        for split, label, count in folders:
            for n in range(count):
                mask = np.zeros((32, 32), bool) if label == "good" else _blob(rng, 32, 32)
                image = f"{category}/{split}/{label}/{n:03d}.png"
                _write(root / image, encode_png(_darken(_texture(rng, 32, 32, channels), mask)))
                if label != "good":
                    _write(root / f"{category}/ground_truth/{label}/{n:03d}_mask.png",
                           _mask_png(mask))
                samples[image] = Drawn(label, split, mask if label != "good" else None)
    _write(root / "license.txt", "Synthetic stand-in for the MVTec AD licence file.\n")
    _write(root / "readme.txt", "Synthetic images in the MVTec AD layout, written by curate.\n")
    return Fixture("mvtec", root, samples)


# --------------------------------------------------------------------------- all of them
#: Source kind -> the folder name the source is distributed under.
def write_all(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """One small dataset per source kind under ``root/<distributed folder name>`` (the first
    of the catalog's folder names; casting in VOC form); returns kind -> folder."""
    root = Path(root)
    writers: dict[str, Callable[..., Fixture]] = {"kolektorsdd": write_kolektorsdd, "kolektorsdd2": write_kolektorsdd2,
               "mtd": write_mtd, "severstal": write_severstal, "casting": write_casting,
               "mvtec": write_mvtec}
    return {kind: write(root / CATALOG[kind].folder_names[0], seed=seed).root for kind, write in writers.items()}
