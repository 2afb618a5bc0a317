"""Box annotation formats (Pascal VOC XML, YOLO TXT, COCO JSON) -> shapes in pixel coordinates.

Each ``read_*`` function pairs annotation files with the images under a root and returns, per
image path, the :class:`Shapes` its annotation gives or why it is :class:`Unusable`; images
it returns nothing for have no annotation. Shapes use the manifest's coordinates: continuous
pixels, (0, 0) the top-left corner of the image; a COCO RLE mask (``iscrowd``) becomes the
manifest's Kaggle RLE string, exactly. Where an image's size is needed (YOLO's normalised
coordinates, a COCO RLE's size) only its header is read; a header declaring a decompression
bomb makes the image :class:`Unusable` (``image_too_large``). Annotation files used go to the
inventory's ``annotation_files``; those without an image are listed as unpaired. Whatever
else is under the root is the caller's to account for.
"""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

from curate.core.errors import CurateError, UnsafePathError, stable_text
from curate.core.files import check_relative
from curate.sources.base import Inventory, stem_and_ext

FORMATS = ("voc", "yolo", "coco")
YOLO_CLASS_LISTS = ("classes.txt",)
YOLO_DATASET_FILES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")


@dataclass
class Shapes:
    """What an annotation file says about one image."""

    file: str
    classes: set[str] = field(default_factory=set)
    boxes: list[dict[str, Any]] = field(default_factory=list)
    polygons: list[dict[str, Any]] = field(default_factory=list)
    rle: list[dict[str, str]] = field(default_factory=list)

    def add_box(self, cls: str, x0: float, y0: float, x1: float, y1: float) -> None:
        self.classes.add(cls)
        self.boxes.append({"class": cls, "x0": x0, "y0": y0, "x1": x1, "y1": y1})

    def add_polygon(self, cls: str, points: list[list[float]]) -> None:
        self.classes.add(cls)
        self.polygons.append({"class": cls, "points": points})

    def add_rle(self, cls: str, counts: str) -> None:
        """A pixel mask as a Kaggle RLE string (``curate.imaging.masks.rle_decode``)."""
        self.classes.add(cls)
        self.rle.append({"class": cls, "counts": counts})

    def annotation(self) -> dict[str, Any]:
        """The row's ``annotation`` object (empty lists left out)."""
        ann: dict[str, Any] = {"file": self.file}
        if self.boxes:
            ann["boxes"] = self.boxes
        if self.polygons:
            ann["polygons"] = self.polygons
        if self.rle:
            ann["rle"] = self.rle
        return ann


@dataclass(frozen=True)
class Unusable:
    """An image whose annotation cannot be used: the drop code, a detail naming the file."""

    code: str
    detail: str
    file: str | None = None


class _BadAnnotation(ValueError):
    """Raised while parsing one annotation file; the message names the file (and line)."""


class _ImageTooLarge(ValueError):
    """An image whose header declares more pixels than Pillow will open (a decompression
    bomb, or a corrupt header); the message names the image."""


Found = dict[str, Shapes | Unusable]


def _finite_numbers(values: Any, count: int | None = None) -> list[float] | None:
    """``values`` as floats if it is a list of finite JSON numbers (of ``count`` items)."""
    if not isinstance(values, list) or (count is not None and len(values) != count):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in values):
        return None
    return [float(v) for v in values]


# --------------------------------------------------------------------------- Pascal VOC
def _by_stem(paths: list[str], what: str) -> dict[str, str]:
    """File name stem -> path; VOC pairs by stem alone, so a stem must name one file."""
    out: dict[str, str] = {}
    for rel in paths:
        stem = PurePosixPath(rel).stem
        if stem in out:
            raise CurateError(f"{out[stem]} and {rel}: two {what} with the stem {stem!r}; VOC "
                              "annotations pair with images by stem, so stems must be unique")
        out[stem] = rel
    return out


def _parse_voc(path: Path, rel: str) -> Shapes:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise _BadAnnotation(f"{rel}: malformed XML ({stable_text(exc)})") from exc
    if root.tag != "annotation":
        raise _BadAnnotation(f"{rel}: root element <{root.tag}>, expected a Pascal VOC "
                             "<annotation>")
    shapes = Shapes(rel)
    # <polygon> inside an <object> is a non-standard extension of some tools: not read.
    for i, obj in enumerate(root.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise _BadAnnotation(f"{rel}: <object> {i} has no <name>")
        box = obj.find("bndbox")
        try:
            if box is None:
                raise ValueError("no <bndbox>")
            xmin, ymin, xmax, ymax = (float(box.findtext(t) or "")
                                      for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise _BadAnnotation(f"{rel}: <object> {i} ({name}) needs a <bndbox> with numeric "
                                 "xmin, ymin, xmax, ymax") from None
        if not all(map(math.isfinite, (xmin, ymin, xmax, ymax))):
            raise _BadAnnotation(f"{rel}: <object> {i} ({name}) has a non-finite coordinate")
        # The VOC devkit counts pixels from 1, both ends inclusive: pixel k spans [k-1, k].
        shapes.add_box(name, xmin - 1, ymin - 1, xmax, ymax)
    return shapes


def read_voc(root: Path, files: list[str], images: list[str], inv: Inventory) -> Found:
    """One ``<stem>.xml`` per image, anywhere under the root (``Annotations/`` or beside it)."""
    xml_by_stem = _by_stem([f for f in files if stem_and_ext(f)[1] == ".xml"], "XML files")
    image_by_stem = _by_stem(images, "images")
    found: Found = {}
    for stem, xml in sorted(xml_by_stem.items()):
        image = image_by_stem.get(stem)
        if image is None:
            inv.unpair(xml, "VOC annotation without an image of the same stem")
            continue
        inv.annotation_files.append(xml)
        try:
            found[image] = _parse_voc(root / xml, xml)
        except _BadAnnotation as exc:
            found[image] = Unusable("bad_annotation", str(exc), xml)
    return found


# --------------------------------------------------------------------------- YOLO
def _label_candidates(image: str) -> list[str]:
    """Stems (path without extension) where an image's YOLO label file may be, best first:
    the ``labels/`` tree mirroring ``images/`` (the last ``images`` folder, as Ultralytics
    does), then beside the image."""
    path = PurePosixPath(image)
    folders = list(path.parent.parts)
    candidates = []
    if "images" in folders:
        last = len(folders) - 1 - folders[::-1].index("images")
        folders[last] = "labels"
        candidates.append(str(PurePosixPath(*folders, path.stem)))
    candidates.append(str(path.with_suffix("")))
    return candidates


def _is_yolo_names_file(rel: str) -> bool:
    name = PurePosixPath(rel).name.lower()
    return name in YOLO_CLASS_LISTS or name in YOLO_DATASET_FILES


def yolo_label_files(files: list[str], images: list[str]) -> dict[str, str]:
    """Image path -> its YOLO label file, for the images that have one."""
    txt_by_stem: dict[str, str] = {}
    for rel in files:
        stem, ext = stem_and_ext(rel)
        if ext == ".txt" and not _is_yolo_names_file(rel):
            txt_by_stem.setdefault(stem, rel)
    pairs = {}
    for image in images:
        txt = next((txt_by_stem[c] for c in _label_candidates(image) if c in txt_by_stem), None)
        if txt is not None:
            pairs[image] = txt
    return pairs


def yolo_files(files: list[str], images: list[str]) -> list[str]:
    """The YOLO annotation files under a root: label files of images, and class lists."""
    return sorted({*yolo_label_files(files, images).values(),
                   *(f for f in files if _is_yolo_names_file(f))})


def _read_names_file(path: Path) -> dict[int, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CurateError(f"{path}: not UTF-8 text "
                          f"({stable_text(exc)}); expected YOLO class names") from exc
    if path.name.lower() in YOLO_CLASS_LISTS:
        return dict(enumerate(line.strip() for line in text.splitlines() if line.strip()))
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CurateError(f"{path}: not valid YAML ({stable_text(exc)}); expected a YOLO dataset "
                          "file") from exc
    names = doc.get("names") if isinstance(doc, dict) else None
    if isinstance(names, list):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        return {k: str(v) for k, v in names.items()}
    raise CurateError(f"{path}: expected 'names:' as a list of class names or a mapping "
                      "from class id to name")


def yolo_class_names(root: Path, files: list[str]) -> tuple[dict[int, str] | None, list[str]]:
    """Class id -> name from classes.txt / data.yaml (None if there is none), and the files
    read. Several files (one per labels folder, as LabelImg writes) must agree."""
    sources = [f for f in files if _is_yolo_names_file(f)]
    names = None
    for rel in sources:
        these = _read_names_file(root / rel)
        if names is not None and these != names:
            raise CurateError(f"{root / rel}: its YOLO class names differ from those of "
                              f"{sources[0]}; keep one class list, or make them agree")
        names = these
    return names, sources


def _parse_yolo(path: Path, rel: str, names: dict[int, str] | None,
                size: tuple[int, int] | None) -> Shapes:
    """``size`` (width, height) converts normalised values to pixels; without it only the
    classes are read (the image is unreadable and ingest will drop it)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise _BadAnnotation(f"{rel}: not UTF-8 text ({stable_text(exc)})") from exc
    shapes = Shapes(rel)
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{rel} line {number}"
        if len(tokens) != 5 and (len(tokens) < 7 or len(tokens) % 2 == 0):
            raise _BadAnnotation(f"{where}: {len(tokens)} values; expected 'class cx cy w h' "
                                 "or a polygon 'class x1 y1 ... xn yn' with n >= 3")
        if not (tokens[0].isascii() and tokens[0].isdigit()):
            raise _BadAnnotation(f"{where}: class {tokens[0]!r} is not a class id")
        class_id = int(tokens[0])
        if names is None:
            cls = str(class_id)
        elif class_id in names:
            cls = names[class_id]
        else:
            raise _BadAnnotation(f"{where}: class id {tokens[0]} has no name in the class list")
        try:
            values = [float(t) for t in tokens[1:]]
        except ValueError:
            raise _BadAnnotation(f"{where}: a value is not a number") from None
        outside = [t for t, v in zip(tokens[1:], values, strict=True) if not 0 <= v <= 1]
        if outside:
            raise _BadAnnotation(f"{where}: value {outside[0]} is outside [0, 1] (YOLO "
                                 "coordinates are fractions of the image size)")
        if size is None:
            shapes.classes.add(cls)
        elif len(values) == 4:
            (w, h), (cx, cy, bw, bh) = size, values
            shapes.add_box(cls, (cx - bw / 2) * w, (cy - bh / 2) * h,
                           (cx + bw / 2) * w, (cy + bh / 2) * h)
        else:
            w, h = size
            shapes.add_polygon(cls, [[x * w, y * h] for x, y in zip(values[0::2], values[1::2],
                                                                     strict=True)])
    return shapes


def _image_size(path: Path, rel: str) -> tuple[int, int] | None:
    """(width, height) from the image header alone; None if it is not a readable image (the
    ingest stage drops it). Raises :class:`_ImageTooLarge` for a decompression bomb."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: still only the header
            with Image.open(path) as im:
                return im.size
    except Image.DecompressionBombError as exc:
        raise _ImageTooLarge(f"{rel}: the image header declares too many pixels to be read "
                             f"safely ({stable_text(exc)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def read_yolo(root: Path, files: list[str], images: list[str], inv: Inventory) -> Found:
    """``labels/…/<stem>.txt`` mirroring ``images/…/<stem>.jpg``, or ``<stem>.txt`` beside it.

    A box needs the image size to leave normalised coordinates, so this reads each annotated
    image's header (never its pixels).
    """
    names, name_files = yolo_class_names(root, files)
    inv.annotation_files.extend(name_files)
    pairs = yolo_label_files(files, images)
    paired = set(pairs.values())
    for rel in files:
        if stem_and_ext(rel)[1] == ".txt" and rel not in paired and not _is_yolo_names_file(rel):
            inv.unpair(rel, "YOLO label file without an image of the same stem (beside it or "
                            "in the images/ folder its labels/ folder mirrors)")
    found: Found = {}
    for image, txt in sorted(pairs.items()):
        inv.annotation_files.append(txt)
        try:
            found[image] = _parse_yolo(root / txt, txt, names, _image_size(root / image, image))
        except _BadAnnotation as exc:
            found[image] = Unusable("bad_annotation", str(exc), txt)
        except _ImageTooLarge as exc:
            found[image] = Unusable("image_too_large", str(exc), txt)
    return found


# --------------------------------------------------------------------------- COCO
def _load_coco(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CurateError(f"{path}: not valid JSON "
                          f"({stable_text(exc)}); expected a COCO annotation "
                          "file") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations", []), list) \
            or not isinstance(doc.get("categories", []), list):
        raise CurateError(f"{path}: expected a COCO object with an 'images' list (and "
                          "'annotations' and 'categories' lists)")
    return doc


def _coco_images(doc: dict[str, Any], json_rel: str, images: list[str],
                 inv: Inventory) -> dict[Any, str]:
    """COCO image id -> image path under the root; records that cannot be used are rejected.

    ``file_name`` is looked up relative to the JSON's folder, then its ``images/`` folder,
    then the root, and only among the files found under the root: nothing outside is read.
    """
    base = PurePosixPath(json_rel).parent
    on_disk = {stem_and_ext(rel): rel for rel in images}
    by_id: dict[Any, str] = {}
    listed: dict[str, int] = {}
    for i, record in enumerate(doc["images"]):
        where = f"{json_rel}:images[{i}]"
        name = record.get("file_name") if isinstance(record, dict) else None
        image_id = record.get("id") if isinstance(record, dict) else None
        if not isinstance(name, str) or not isinstance(image_id, (int, str)):
            inv.reject(where, "expected an image record with an 'id' and a 'file_name'")
            continue
        try:
            check_relative(name, "file_name")
        except UnsafePathError as exc:
            inv.reject(where, str(exc))
            continue
        candidates = [str(base / name), str(base / "images" / name), name]
        image = next((on_disk[stem_and_ext(c)] for c in candidates
                      if stem_and_ext(c) in on_disk), None)
        if image is None:
            inv.reject(where, f"file_name {name!r}: no image at {', '.join(dict.fromkeys(candidates))}")
        elif image_id in by_id:
            inv.reject(where, f"image id {image_id!r} is used by an earlier record")
        elif image in listed:
            inv.reject(where, f"{image} is already listed by images[{listed[image]}]")
        else:
            by_id[image_id] = image
            listed[image] = i
    return by_id


def _coco_counts_from_string(text: str, where: str) -> list[int]:
    """The run lengths of pycocotools' compressed RLE string (its ``rleFrString``).

    Each count is written in groups of 5 bits, lowest first, as characters ``'0' + group``
    (48-111); bit 0x20 of a group says another follows, and bit 0x10 of the last one is the
    sign. From the fourth count on, each is stored as its difference from the count two
    before it.
    """
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos == len(text):
                raise _BadAnnotation(f"{where}: compressed RLE counts end in the middle of a "
                                     "number")
            group = ord(text[pos]) - 48
            if not 0 <= group < 64:
                raise _BadAnnotation(f"{where}: compressed RLE counts hold {text[pos]!r}, "
                                     "which is not an RLE character ('0' to 'o')")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            raise _BadAnnotation(f"{where}: compressed RLE count {len(counts)} is negative")
        counts.append(value)
    return counts


def _coco_rle(segmentation: dict[str, Any], where: str) -> tuple[str, int, int]:
    """A COCO RLE segmentation (``iscrowd`` masks, as pycocotools and CVAT write them:
    ``counts`` a list or its compressed string, ``size`` [height, width]) as a Kaggle RLE
    string, and its height and width.

    COCO counts alternate runs of 0s and 1s, starting with 0s, down each column in turn (the
    column-major order of the Kaggle RLE the rest of curate uses), so converting is exact.
    """
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise _BadAnnotation(f"{where}: RLE segmentation needs 'size' [height, width] of "
                             "positive integers")
    height, width = size
    if isinstance(counts, str):
        runs = _coco_counts_from_string(counts, where)
    elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                          and v >= 0 for v in counts):
        runs = counts
    else:
        raise _BadAnnotation(f"{where}: RLE 'counts' must be a list of non-negative integers "
                             "or pycocotools' compressed string")
    if sum(runs) != height * width:
        raise _BadAnnotation(f"{where}: RLE counts cover {sum(runs)} pixels, but its size "
                             f"{height}x{width} has {height * width}")
    pairs, start = [], 0
    for k, run in enumerate(runs):
        if k % 2 and run:
            pairs += [start + 1, run]
        start += run
    return " ".join(map(str, pairs)), height, width


def _add_coco_shape(shapes: Shapes, ann: dict[str, Any], cls: str, where: str,
                    image_size: Callable[[], tuple[int, int] | None]) -> None:
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        # An RLE mask: decoded exactly. Its size must be the image's, or the columns shift.
        counts, height, width = _coco_rle(segmentation, where)
        size = image_size()
        if size is not None and size != (width, height):
            raise _BadAnnotation(f"{where}: RLE size {width}x{height} (width x height) is not "
                                 f"the image's {size[0]}x{size[1]}")
        shapes.add_rle(cls, counts)
        return
    if isinstance(segmentation, list) and segmentation:
        # Polygons are the finer outline; the bbox around them would only blur the mask.
        for k, flat in enumerate(segmentation):
            values = _finite_numbers(flat)
            if values is None or len(values) < 6 or len(values) % 2:
                raise _BadAnnotation(f"{where}: segmentation[{k}] is not a flat list of at "
                                     "least 3 (x, y) pairs")
            shapes.add_polygon(cls, [list(p) for p in zip(values[0::2], values[1::2],
                                                          strict=True)])
        return
    bbox = _finite_numbers(ann.get("bbox"), 4)
    if bbox is None:
        raise _BadAnnotation(f"{where}: expected a 'bbox' [x, y, width, height] of numbers")
    x, y, w, h = bbox
    shapes.add_box(cls, x, y, x + w, y + h)


def read_coco(root: Path, json_rel: str, images: list[str], inv: Inventory) -> Found:
    """One COCO JSON for the whole root; images on disk it does not list are
    ``not_in_annotations``. bbox [x, y, w, h] is already in continuous pixel coordinates."""
    inv.annotation_files.append(json_rel)
    doc = _load_coco(root / json_rel)
    names = {c["id"]: str(c["name"]) for c in doc.get("categories", [])
             if isinstance(c, dict) and isinstance(c.get("id"), (int, str)) and "name" in c}
    by_id = _coco_images(doc, json_rel, images, inv)
    found: Found = {image: Shapes(json_rel) for image in by_id.values()}
    for j, ann in enumerate(doc.get("annotations", [])):
        where = f"{json_rel}:annotations[{j}]"
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(image_id, (int, str)) or image_id not in by_id:
            inv.reject(where, f"image_id {image_id!r} names no usable image record")
            continue
        image = by_id[image_id]
        shapes = found[image]
        if isinstance(shapes, Unusable):
            continue  # the image is dropped already, for an earlier annotation
        category = ann.get("category_id")
        try:
            if not isinstance(category, (int, str)) or ("categories" in doc
                                                        and category not in names):
                raise _BadAnnotation(f"{where}: category_id {category!r} is not in categories")
            _add_coco_shape(shapes, ann, names.get(category, str(category)), where,
                            partial(_image_size, root / image, image))
        except _BadAnnotation as exc:
            found[image] = Unusable("bad_annotation", str(exc), json_rel)
        except _ImageTooLarge as exc:
            found[image] = Unusable("image_too_large", str(exc), json_rel)
    for image in images:
        if image not in found:
            found[image] = Unusable("not_in_annotations",
                                    f"{image}: not listed in the images of {json_rel}")
    return found
