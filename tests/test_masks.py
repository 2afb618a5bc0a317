"""RLE, boxes and polygons to masks: exact, checked against per-pixel references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from curate.imaging.masks import (
    AnnotationError,
    box_mask,
    check_box_inside,
    check_polygon_inside,
    polygon_mask,
    rle_decode,
    rle_encode,
)

sizes = st.tuples(st.integers(1, 24), st.integers(1, 24))


@st.composite
def masks(draw):
    h, w = draw(sizes)
    return draw(arrays(bool, (h, w)))


def rle_reference(counts: str, h: int, w: int) -> np.ndarray:
    """Decode pixel by pixel: 1-indexed starts, column-major numbering."""
    mask = np.zeros((h, w), bool)
    values = [int(v) for v in counts.split()]
    for start, length in zip(values[0::2], values[1::2], strict=True):
        for k in range(start - 1, start - 1 + length):
            mask[k % h, k // h] = True
    return mask


@given(masks())
def test_rle_round_trip(mask):
    h, w = mask.shape
    counts = rle_encode(mask)
    assert np.array_equal(rle_decode(counts, h, w), mask)
    assert np.array_equal(rle_reference(counts, h, w), mask)


@given(masks())
def test_rle_encoding_is_canonical(mask):
    """Runs are maximal, ascending and separated by at least one background pixel."""
    values = [int(v) for v in rle_encode(mask).split()]
    starts, lengths = values[0::2], values[1::2]
    assert sum(lengths) == int(mask.sum())
    for (s0, l0), s1 in zip(zip(starts, lengths, strict=True), starts[1:], strict=False):
        assert s1 > s0 + l0


def test_rle_is_column_major_and_one_indexed():
    # "1 2" on a 3x2 image: pixels 1 and 2 go down the first column.
    mask = rle_decode("1 2 6 1", 3, 2)
    assert mask.tolist() == [[True, False], [True, False], [False, True]]


def test_rle_empty_string_is_empty_mask():
    assert not rle_decode("", 4, 5).any()


@pytest.mark.parametrize("counts, code, words", [
    ("1 2 3", "bad_rle", "odd number"),
    ("1 x", "bad_rle", "non-integer"),
    ("0 3", "bad_rle", "below 1"),
    ("1 0", "bad_rle", "not positive"),
    ("5 3 6 2", "bad_rle", "overlap"),
    ("9 1 1 1", "bad_rle", "out of order"),
    ("11 3", "rle_out_of_bounds", "past the image"),
])
def test_malformed_rle_is_refused(counts, code, words):
    with pytest.raises(AnnotationError, match=words) as info:
        rle_decode(counts, 3, 4)
    assert info.value.code == code


coords = st.floats(-5, 30, allow_nan=False)


@given(coords, coords, coords, coords, sizes)
def test_box_mask_matches_pixel_centre_rule(x0, y0, x1, y1, size):
    h, w = size
    mask = box_mask(x0, y0, x1, y1, h, w)
    lx, hx, ly, hy = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
    ref = np.array([[lx <= j + 0.5 <= hx and ly <= i + 0.5 <= hy for j in range(w)]
                    for i in range(h)])
    assert np.array_equal(mask, ref.reshape(h, w))


@given(st.integers(-3, 20), st.integers(-3, 20), st.integers(1, 15), st.integers(1, 15), sizes)
def test_rectangle_polygon_equals_box(x, y, bw, bh, size):
    h, w = size
    pts = [(x, y), (x + bw, y), (x + bw, y + bh), (x, y + bh)]
    assert np.array_equal(polygon_mask(pts, h, w), box_mask(x, y, x + bw, y + bh, h, w))


def _convex_hull(points):
    """Andrew's monotone chain, counter-clockwise in image coordinates; exact for integers."""
    pts = sorted(set(points))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=3, max_size=8),
       sizes)
def test_convex_polygon_matches_exact_half_plane_reference(points, size):
    hull = _convex_hull(points)
    if len(hull) < 3:
        return  # collinear points: no polygon
    h, w = size
    mask = polygon_mask(hull, h, w)
    # Independent reference in exact integer arithmetic (coordinates doubled so that pixel
    # centres j + 0.5 become odd integers): inside or on every edge of the CCW hull.
    ref = np.zeros((h, w), bool)
    doubled = [(2 * x, 2 * y) for x, y in hull]
    for i in range(h):
        for j in range(w):
            px, py = 2 * j + 1, 2 * i + 1
            ref[i, j] = all(
                (b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0]) >= 0
                for a, b in zip(doubled, doubled[1:] + doubled[:1], strict=True)
            )
    assert np.array_equal(mask, ref)


def test_concave_polygon_and_self_intersecting_ring():
    # An L shape: the notch stays empty.
    ell = [(0, 0), (4, 0), (4, 2), (2, 2), (2, 4), (0, 4)]
    mask = polygon_mask(ell, 4, 4)
    assert mask[:2, :].all() and mask[2:, :2].all() and not mask[2:, 2:].any()
    # A bow-tie is read as its two triangles, not rejected.
    bowtie = polygon_mask([(0, 0), (8, 8), (8, 0), (0, 8)], 8, 8)
    assert bowtie[4, 0] and bowtie[4, 7] and not bowtie[0, 4]


def test_polygon_area_close_to_geometric_area():
    rng = np.random.default_rng(0)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 40))
    radius = rng.uniform(20, 40, 40)
    pts = np.stack([100 + radius * np.cos(angles), 100 + radius * np.sin(angles)], 1)
    from shapely.geometry import Polygon

    poly = Polygon(pts)
    mask = polygon_mask(pts.tolist(), 200, 200)
    assert abs(mask.sum() - poly.area) < poly.length  # differences only along the border


@pytest.mark.parametrize("box, words", [
    ((5, 5, 5, 9), "empty or inverted"),
    ((9, 5, 2, 9), "empty or inverted"),
    ((-3, 0, 5, 5), "outside"),
    ((0, 0, 5, 13), "outside"),
    ((0, float("nan"), 5, 5), "non-finite"),
])
def test_bad_boxes_are_refused(box, words):
    with pytest.raises(AnnotationError, match=words):
        check_box_inside(*box, 10, 10)


def test_box_overshoot_within_tolerance_is_accepted():
    check_box_inside(-0.5, 0, 10.8, 10, 10, 10, tolerance=1.0)


def test_bad_polygons_are_refused():
    with pytest.raises(AnnotationError, match="at least 3"):
        check_polygon_inside([(0, 0), (1, 1)], 10, 10)
    with pytest.raises(AnnotationError, match="zero area"):
        check_polygon_inside([(0, 0), (1, 1), (2, 2)], 10, 10)
    with pytest.raises(AnnotationError, match="outside") as info:
        check_polygon_inside([(0, 0), (30, 0), (0, 5)], 10, 10)
    assert info.value.code == "annotation_out_of_bounds"
