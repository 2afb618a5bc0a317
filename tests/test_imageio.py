"""Header probes, truncation checks, and the fast PNG writer's exactness."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from curate.imaging.io import BadImage, binarize, decode, encode_png, probe


def jpeg(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", pixels)[1].tobytes()


@settings(max_examples=60)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([None, 2, 3, 4]),
       st.data())
def test_png_round_trips_through_opencv_and_pillow(h, w, c, data):
    shape = (h, w) if c is None else (h, w, c)
    pixels = data.draw(arrays(np.uint8, shape))
    png = encode_png(pixels)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)
    if c != 2:  # OpenCV has no grey+alpha
        back = decode(png)
        assert np.array_equal(back, pixels)


def test_png_of_a_photograph_is_compressed():
    yy, xx = np.mgrid[0:200, 0:300]
    smooth = ((np.sin(xx / 17) + np.cos(yy / 23)) * 60 + 128).astype(np.uint8)
    assert len(encode_png(smooth)) < smooth.nbytes / 3


def test_probe_reads_headers():
    grey = np.full((30, 50), 90, np.uint8)
    info = probe(jpeg(grey))
    assert (info.format, info.width, info.height, info.channels) == ("jpeg", 50, 30, 1)
    info = probe(encode_png(np.zeros((7, 9, 3), np.uint8)))
    assert (info.format, info.width, info.height, info.channels) == ("png", 9, 7, 3)
    bmp = cv2.imencode(".bmp", grey)[1].tobytes()
    assert probe(bmp).format == "bmp"


@pytest.mark.parametrize("make, words", [
    (lambda: jpeg(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))[:-400],
     "truncated JPEG"),
    (lambda: encode_png(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))[:-30],
     "not a readable image"),
    (lambda: cv2.imencode(".bmp", np.zeros((20, 20), np.uint8))[1].tobytes()[:-50],
     "truncated BMP"),
    (lambda: b"this is a text file, not an image\n", "not a readable image"),
    (lambda: b"", "empty file"),
])
def test_probe_refuses_truncated_and_non_images(make, words):
    with pytest.raises(BadImage, match=words):
        probe(make())


def test_decode_gives_rgb_order():
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    png = cv2.imencode(".png", bgr)[1].tobytes()
    assert decode(png)[0, 0].tolist() == [0, 0, 255]


def test_binarize_auto_threshold():
    aa = np.array([[0, 100, 128, 255]], np.uint8)
    mask, t = binarize(aa)
    assert t == 127 and mask.tolist() == [[False, False, True, True]]
    zero_one = np.array([[0, 1, 1, 0]], np.uint8)
    mask, t = binarize(zero_one)
    assert t == 0 and mask.tolist() == [[False, True, True, False]]
    mask, t = binarize(aa, 99)
    assert mask.tolist() == [[False, True, True, True]]
    with pytest.raises(ValueError):
        binarize(aa, 300)
