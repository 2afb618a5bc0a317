"""Annotations to binary masks: run-length encoding, boxes and polygons.

One rule for every shape: a pixel belongs to a shape when its *centre* lies inside the shape or
on its border. Coordinates are continuous, in pixels, with (0, 0) at the top-left corner of the
image, so pixel (row i, column j) has its centre at (x, y) = (j + 0.5, i + 0.5). Under this rule
an axis-aligned rectangle gives the same mask as a box and as a polygon, and every conversion is
exact (tests compare each against a per-pixel reference).

Run-length encoding follows the Kaggle/Severstal convention: "start length start length ...",
starts 1-indexed, pixels numbered column-major (down the first column, then the next).

Mask files (:func:`read_mask`) are read by one rule whatever their encoding:

- the values: palette images by their palette *index* (index 0 is background), all others at
  their stored depth, 8- or 16-bit; colour masks by their maximum over the colour channels;
  with an alpha channel, a transparent pixel is background, and where the colour is uniform
  and only the alpha varies, the alpha channel is the mask;
- then :func:`curate.imaging.io.binarize`: a single non-zero value ({0, 1}, {0, 255},
  {0, 65535}) or label ids (no value above half the full scale) -> every non-zero value is
  defect; otherwise an anti-aliased mask, cut at half its full scale (``auto``), or at the
  threshold given.

Anything beyond a plain 8-bit grey mask of 0/1 or 0/255 (possibly anti-aliased) is said in
:attr:`MaskFile.unusual`, so that the sample can be flagged for a look.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from PIL import Image
from shapely.geometry import Polygon

from curate.core.errors import stable_text
from curate.imaging.io import (
    BadImage,
    binarize,
    count_between,
    decode_mask_values,
    mask_levels,
    mask_size,
)


class AnnotationError(ValueError):
    """An annotation that cannot be turned into a mask; ``code`` is the drop-reason code."""

    def __init__(self, message: str, code: str = "bad_annotation"):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- RLE
def rle_decode(counts: str, height: int, width: int) -> np.ndarray:
    """Decode a Severstal RLE string into a boolean H x W mask.

    Raises :class:`AnnotationError` for anything but an even number of positive integers whose
    runs are ascending, do not overlap and stay inside the image. Numbers are plain ASCII digits
    (Python's ``int`` would also take ``1_0``, ``+5`` or Arabic-Indic digits).
    """
    tokens = counts.split()
    if not tokens:
        return np.zeros((height, width), bool)
    bad = next((t for t in tokens if not (t.isascii() and t.isdigit())), None)
    if bad is not None:
        raise AnnotationError(f"RLE has a non-integer token {bad!r} (expected ASCII digits)",
                              "bad_rle")
    total = height * width
    numbers = [int(t) for t in tokens]
    # Checked before numpy sees them: a number past int64 would overflow rather than fail.
    huge = next((v for v in numbers if v > total), None)
    if huge is not None:
        raise AnnotationError(f"RLE value {huge} runs past the image's {total} pixels "
                              f"({height}x{width})", "rle_out_of_bounds")
    values = np.array(numbers, dtype=np.int64)
    if values.size % 2:
        raise AnnotationError(f"RLE has an odd number of values ({values.size}): "
                              "expected start/length pairs", "bad_rle")
    starts, lengths = values[0::2], values[1::2]
    if (starts < 1).any():
        raise AnnotationError(f"RLE start {int(starts[starts < 1][0])} is below 1 "
                              "(starts are 1-indexed)", "bad_rle")
    if (lengths < 1).any():
        raise AnnotationError(f"RLE run length {int(lengths[lengths < 1][0])} is not positive",
                              "bad_rle")
    ends = starts - 1 + lengths  # exclusive, 0-indexed
    if (starts[1:] - 1 < ends[:-1]).any():
        k = int(np.argmax(starts[1:] - 1 < ends[:-1]))
        raise AnnotationError(f"RLE runs overlap or are out of order at run {k + 2} "
                              f"(start {int(starts[k + 1])} after a run ending at {int(ends[k])})",
                              "bad_rle")
    if ends[-1] > total:
        raise AnnotationError(f"RLE runs past the image: pixel {int(ends[-1])} of "
                              f"{total} ({height}x{width})", "rle_out_of_bounds")
    # Mark run boundaries with +1/-1 and integrate: one pass, no Python loop over runs.
    edges = np.zeros(total + 1, np.int32)
    np.add.at(edges, starts - 1, 1)
    np.add.at(edges, ends, -1)
    flat = np.cumsum(edges[:-1]) > 0
    return flat.reshape((width, height)).T.copy()


def rle_encode(mask: np.ndarray) -> str:
    """Encode a boolean H x W mask as a Severstal RLE string (inverse of :func:`rle_decode`)."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    pairs = np.stack([starts + 1, ends - starts], axis=1).reshape(-1)
    return " ".join(str(int(v)) for v in pairs)


# --------------------------------------------------------------------------- boxes
def _centre_range(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Indices k in [0, size) with lo <= k + 0.5 <= hi, as a half-open range."""
    first = max(0, math.ceil(lo - 0.5))
    last = min(size - 1, math.floor(hi - 0.5))
    return first, max(first, last + 1)


def box_mask(x0: float, y0: float, x1: float, y1: float, height: int, width: int
             ) -> np.ndarray:
    """Boolean mask of an axis-aligned box [x0, x1] x [y0, y1] (pixel-centre rule)."""
    mask = np.zeros((height, width), bool)
    c0, c1 = _centre_range(min(x0, x1), max(x0, x1), width)
    r0, r1 = _centre_range(min(y0, y1), max(y0, y1), height)
    mask[r0:r1, c0:c1] = True
    return mask


def check_box_inside(x0: float, y0: float, x1: float, y1: float, height: int, width: int,
                     tolerance: float = 1.0) -> None:
    """Raise :class:`AnnotationError` for a degenerate box or one outside the image.

    ``tolerance`` pixels of overshoot are accepted: annotation tools often round outwards.
    """
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise AnnotationError(f"box ({x0}, {y0}, {x1}, {y1}) has a non-finite coordinate")
    if x1 <= x0 or y1 <= y0:
        raise AnnotationError(f"box ({x0}, {y0}, {x1}, {y1}) is empty or inverted")
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        raise AnnotationError(f"box ({x0}, {y0}, {x1}, {y1}) lies outside the "
                              f"{width}x{height} image", "annotation_out_of_bounds")


# --------------------------------------------------------------------------- polygons
def polygon_mask(points: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Boolean mask of a simple or self-intersecting polygon (pixel-centre rule).

    Self-intersecting rings are repaired with shapely's ``make_valid`` (the even-odd reading of
    a bow-tie becomes its two triangles); only pixel centres inside the polygon's bounding box
    are tested, so the cost follows the polygon's size, not the image's.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
        raise AnnotationError(f"a polygon needs at least 3 (x, y) points, got {pts.shape}")
    if not np.isfinite(pts).all():
        raise AnnotationError("polygon has a non-finite coordinate")
    geom = Polygon(pts)
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    mask = np.zeros((height, width), bool)
    if geom.is_empty:
        return mask
    minx, miny, maxx, maxy = geom.bounds
    c0, c1 = _centre_range(minx, maxx, width)
    r0, r1 = _centre_range(miny, maxy, height)
    if c1 <= c0 or r1 <= r0:
        return mask
    xs, ys = np.meshgrid(np.arange(c0, c1) + 0.5, np.arange(r0, r1) + 0.5)
    shapely.prepare(geom)
    inside = shapely.intersects_xy(geom, xs.ravel(), ys.ravel())
    mask[r0:r1, c0:c1] = inside.reshape(ys.shape)
    return mask


def check_polygon_inside(points: Sequence[Sequence[float]], height: int, width: int,
                         tolerance: float = 1.0) -> None:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
        raise AnnotationError(f"a polygon needs at least 3 (x, y) points, got {pts.shape}")
    if not np.isfinite(pts).all():
        raise AnnotationError("polygon has a non-finite coordinate")
    if (pts[:, 0].min() < -tolerance or pts[:, 1].min() < -tolerance
            or pts[:, 0].max() > width + tolerance or pts[:, 1].max() > height + tolerance):
        raise AnnotationError(f"polygon lies outside the {width}x{height} image",
                              "annotation_out_of_bounds")
    if Polygon(pts).area == 0:
        raise AnnotationError("polygon has zero area")


# --------------------------------------------------------------------------- measuring masks
def pixels_at_train_size(mask: np.ndarray, size: int) -> int:
    """Defect pixels left after resizing to size x size as detectors do (bilinear, > 0.5)."""
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size),
                                                               Image.Resampling.BILINEAR)
    return int(np.count_nonzero(np.asarray(small) > 127))


def count_components(mask: np.ndarray) -> int:
    """Defect regions of a binary mask: its 8-connected components (pixels touching by an
    edge or a corner are one region, as an annotator draws one blob)."""
    if not mask.any():
        return 0
    count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return int(count) - 1  # label 0 is the background


# --------------------------------------------------------------------------- mask files
@dataclass(frozen=True)
class MaskFile:
    """A mask file read by the rule of the module docstring."""

    mask: np.ndarray           # bool H x W
    threshold: int             # foreground is value > threshold, on the 8-bit scale
    grey_pixels: int           # anti-aliased pixels: strictly between 0 and full scale
    unusual: tuple[str, ...]   # what differs from a plain 8-bit grey mask, in words


def read_mask(data: bytes, threshold: int | str = "auto",
              size: tuple[int, int] | None = None) -> MaskFile:
    """Read a mask file (see the module docstring); ``size`` is the (height, width) its image
    has, checked from the header before anything is decoded.

    Raises :class:`AnnotationError` whose message follows the file's name ("<mask> is ..."):
    ``unreadable_mask`` for an empty, unreadable or oversized file (more pixels than
    :data:`curate.imaging.io.MAX_PIXELS`), ``mask_size_mismatch`` for another size.
    """
    expected = f" of {size[1]}x{size[0]}" if size else ""
    try:
        height, width = mask_size(data)
        if size is not None and (height, width) != tuple(size):
            raise AnnotationError(f"is {width}x{height}, expected {size[1]}x{size[0]} like "
                                  "its image", "mask_size_mismatch")
        values, kind = decode_mask_values(data)
    except BadImage as exc:
        raise AnnotationError(f"is unreadable "
                              f"({stable_text(exc)}); expected a PNG, BMP, TIFF or JPEG "
                              f"mask{expected}", "unreadable_mask") from None
    unusual = [f"{kind} mask" + (": read by palette index, 0 as background"
                                 if kind == "palette" else "")] if kind else []
    values = _one_channel(values, unusual)
    mask, used = binarize(values, threshold)
    full = np.iinfo(values.dtype).max
    # Only a mask read with threshold 0 needs its values listed (a few label ids, or one).
    levels = (mask_levels(values) if threshold == "auto" and used == 0
              else np.empty(0, np.int64))
    if len(levels):
        if len(levels) > 1:
            shown = ", ".join(str(v) for v in levels[:8]) + (" ..." if len(levels) > 8 else "")
            unusual.append(f"label values {shown}: every non-zero value read as defect")
        elif levels[0] not in (1, full):
            unusual.append(f"its only non-zero value is {levels[0]}: read as defect")
    grey = count_between(values, 1, full - 1) if used else 0
    return MaskFile(mask, used, grey, tuple(unusual))


def _one_channel(values: np.ndarray, unusual: list[str]) -> np.ndarray:
    """H x W values of a mask with colour and/or alpha channels (see the module docstring)."""
    if values.ndim == 2:
        return values
    colour, alpha = (values[..., :-1], values[..., -1]) if values.shape[2] in (2, 4) else \
        (values, None)
    if colour.shape[2] > 1 and (colour != colour[..., :1]).any():
        unusual.append("colour mask: the maximum over its channels read")
    grey = colour.max(axis=2)
    if alpha is None:
        return grey
    if (grey == grey.flat[0]).all() and (alpha != alpha.flat[0]).any():
        unusual.append("uniform colour: the alpha channel read as the mask")
        return alpha
    if ((alpha == 0) & (grey > 0)).any():
        unusual.append("transparent pixels read as background")
    return np.where(alpha > 0, grey, 0).astype(values.dtype)


# Corners of a unit pixel square, offsets from its top-left corner (x, y).
_PIXEL_CORNERS = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.int32)


def region_aspect_ratios(mask: np.ndarray) -> list[float]:
    """Long side / short side of the minimum-area rectangle around each 8-connected region.

    Pixels count as unit squares, so a region of w x h pixels gives max(w, h) / min(w, h)
    (rectangles around pixel centres would give (w-1)/(h-1), and no rectangle at all for a
    one-pixel-wide scratch). Regions are listed in the order OpenCV labels them (row-major
    by their first pixel).

    >>> mask = np.zeros((20, 30), bool)
    >>> mask[2:6, 3:13] = True       # 10 x 4
    >>> mask[10:19, 20:23] = True    # 3 x 9
    >>> region_aspect_ratios(mask)
    [2.5, 3.0]
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8)
    ratios = []
    for region in range(1, count):
        x, y, w, h = (int(v) for v in stats[region, :4])
        inside = (labels[y:y + h, x:x + w] == region).astype(np.uint8)
        # The hull of a region's pixel squares is the hull of its boundary pixels' corners:
        # the boundary is enough, which keeps large regions cheap.
        contours, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boundary = np.concatenate([c.reshape(-1, 2) for c in contours])
        corners = (boundary[:, None, :] + _PIXEL_CORNERS).reshape(-1, 2).astype(np.float32)
        _, (side_a, side_b), _ = cv2.minAreaRect(corners)
        ratios.append(max(side_a, side_b) / min(side_a, side_b))
    return ratios
