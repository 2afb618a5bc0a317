"""Planted duplicates and degraded copies of real images, to test and benchmark curation.

``write_planted_mtd`` copies chosen images of an MTD folder (with their masks) into a new
folder in the same layout and adds, for each, altered copies of the kinds asked for. It returns
the list of (original, copy, kind) so that a test or a benchmark can score what a stage found.
Geometric changes (resize, crop, flips) are applied to the mask as well, so a copy stays a
well-formed sample. Copies are named ``<stem>__<kind>`` beside their original.

Kinds:
- duplicates a dedup stage should find: ``copy`` (the same bytes), ``png`` (the same decoded
  pixels, re-encoded losslessly), ``jpeg`` (re-encoded at quality 60), ``resize`` (80%),
  ``brightness`` (+25 grey levels), ``contrast`` (x1.25 about the mean), ``crop`` (1% off each
  side: pHash is crop-sensitive, 3% a side already moves some MTD images 12 bits), ``hflip``,
  ``vflip`` (found only with flip-aware matching), ``rot90`` (only with dihedral matching);
- degradations a quality stage should find: ``blur`` (Gaussian, sigma 2), ``overexposed``
  (+200), ``underexposed`` (x0.02), ``flat`` (contrast squashed to 6 grey levels),
  ``tiny`` (shorter side 40 px).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from curate.imaging.io import decode_file, encode_png

Op = Callable[[np.ndarray, bool], np.ndarray]  # (pixels, is_mask) -> pixels


def _resize(scale: float) -> Op:
    def op(px: np.ndarray, is_mask: bool) -> np.ndarray:
        h, w = px.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return cv2.resize(px, size, interpolation=cv2.INTER_NEAREST if is_mask
                          else cv2.INTER_AREA)
    return op


def _to_side(side: int) -> Op:
    def op(px: np.ndarray, is_mask: bool) -> np.ndarray:
        return _resize(side / min(px.shape[:2]))(px, is_mask)
    return op


def _crop(px: np.ndarray, is_mask: bool) -> np.ndarray:
    h, w = px.shape[:2]
    dy, dx = max(1, round(h * 0.01)), max(1, round(w * 0.01))
    return px[dy:h - dy, dx:w - dx]


def _tone(fn: Callable[[np.ndarray], np.ndarray]) -> Op:
    """A change of grey levels only: masks pass unchanged."""
    def op(px: np.ndarray, is_mask: bool) -> np.ndarray:
        return px if is_mask else np.clip(fn(px.astype(np.float64)), 0, 255).astype(np.uint8)
    return op


def _blur(px: np.ndarray, is_mask: bool) -> np.ndarray:
    return px if is_mask else cv2.GaussianBlur(px, (0, 0), 2.0)


GEOMETRY: dict[str, Op] = {
    "resize": _resize(0.8),
    "crop": _crop,
    "hflip": lambda px, m: px[:, ::-1],
    "vflip": lambda px, m: px[::-1, :],
    "rot90": lambda px, m: np.rot90(px),
    "tiny": _to_side(40),
}
TONE: dict[str, Op] = {
    "brightness": _tone(lambda p: p + 25),
    "contrast": _tone(lambda p: (p - p.mean()) * 1.25 + p.mean()),
    "overexposed": _tone(lambda p: p + 200),
    "underexposed": _tone(lambda p: p * 0.02),
    "flat": _tone(lambda p: (p - p.mean()) * (6 / max(1.0, np.ptp(p))) + 128),
    "blur": _blur,
}
DUPLICATE_KINDS = ("copy", "png", "jpeg", "resize", "brightness", "contrast", "crop", "hflip",
                   "vflip", "rot90")
DEGRADATION_KINDS = ("blur", "overexposed", "underexposed", "flat", "tiny")


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def write_planted_mtd(mtd_root: str | Path, out_root: str | Path, originals: Iterable[str],
                      kinds: Iterable[str]) -> list[tuple[str, str, str]]:
    """Copy ``originals`` (paths relative to ``mtd_root``, e.g. ``MT_Free/Imgs/x.jpg``) and
    their masks into ``out_root``, plus one altered copy per kind. Returns (original, copy,
    kind) for every copy, paths relative to ``out_root``."""
    mtd_root, out_root = Path(mtd_root), Path(out_root)
    kinds = list(kinds)
    unknown = set(kinds) - set(DUPLICATE_KINDS) - set(DEGRADATION_KINDS)
    if unknown:
        raise ValueError(f"unknown kinds: {sorted(unknown)}")
    planted = []
    for rel in originals:
        src, mask_src = mtd_root / rel, (mtd_root / rel).with_suffix(".png")
        dst = out_root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        shutil.copyfile(mask_src, dst.with_suffix(".png"))
        pixels, mask = decode_file(src), decode_file(mask_src)
        stem = PurePosixPath(rel).with_suffix("")
        for kind in kinds:
            copy_rel = f"{stem}__{kind}.jpg"
            target = out_root / copy_rel
            op = GEOMETRY.get(kind) or TONE.get(kind)
            new_mask = op(mask, True) if op else mask
            if kind == "copy":
                shutil.copyfile(src, target)
            elif kind == "png":
                # Same pixels in another container: the MTD reader wants .jpg names, and the
                # probe reads the format from the bytes, not the name.
                target.write_bytes(encode_png(pixels))
            elif kind == "jpeg":
                target.write_bytes(_jpeg(pixels, 60))
            else:
                assert op is not None, f"{kind}: every other kind alters the pixels"
                target.write_bytes(_jpeg(np.ascontiguousarray(op(pixels, False)), 95))
            target.with_suffix(".png").write_bytes(encode_png(np.ascontiguousarray(new_mask)))
            planted.append((rel, copy_rel, kind))
    return planted
