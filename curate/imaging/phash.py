"""Perceptual hashes (pHash, dHash, wHash) as 64-bit integers, with flips and rotations.

pHash and dHash follow imagehash's recipes step for step — Pillow's grey conversion and
Lanczos resize, then the DCT's low 8x8 frequencies against their median (pHash) or the signs of
horizontal gradients on a 9x8 thumbnail (dHash) — but compute the DCT as two small matrix
products instead of two FFTs, which is faster for one 32x32 thumbnail and lets every flipped or
rotated variant reuse it. The tests compare with imagehash on the real MTD: the same hashes,
except where a DCT coefficient ties with the median to within float rounding (a bit or two, on
a handful of images). wHash calls imagehash itself (Haar wavelets via PyWavelets).

Bits are packed as imagehash prints them: the first element of the 8x8 bit array is the most
significant bit, so ``f"{h:016x}" == str(imagehash.phash(image))``.

Transforms: ``flips`` adds the horizontal, vertical and both-ways flips (the latter is the 180°
rotation); ``dihedral`` adds the transpose and the 90° and 270° rotations too (all 8 symmetries
of a square). For pHash they are applied to the 32x32 thumbnail (for flips this is the same as
hashing the flipped image, because Lanczos resampling is symmetric; for 90° turns of a
non-square image it is within a bit or two); for dHash and wHash the grey image itself is turned.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

METHODS = ("phash", "dhash", "whash")
TRANSFORM_SETS = ("none", "flips", "dihedral")

#: name -> function on a 2-d array; the order is fixed: index 0 is always the identity.
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1, :],
    "rot180": lambda a: a[::-1, ::-1],
    "transpose": lambda a: a.T,
    "rot90": lambda a: np.rot90(a, 1),
    "rot270": lambda a: np.rot90(a, 3),
    "antitranspose": lambda a: a[::-1, ::-1].T,
}
_PIL_TRANSPOSE = {
    "hflip": Image.Transpose.FLIP_LEFT_RIGHT,
    "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
    "rot180": Image.Transpose.ROTATE_180,
    "transpose": Image.Transpose.TRANSPOSE,
    "rot90": Image.Transpose.ROTATE_90,
    "rot270": Image.Transpose.ROTATE_270,
    "antitranspose": Image.Transpose.TRANSVERSE,
}


def transform_names(transforms: str) -> list[str]:
    """The transforms a set stands for, identity first."""
    names = list(TRANSFORMS)
    if transforms == "none":
        return names[:1]
    if transforms == "flips":
        return names[:4]
    if transforms == "dihedral":
        return names
    raise ValueError(f"transforms must be one of {', '.join(TRANSFORM_SETS)}, "
                     f"got {transforms!r}")


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of scipy's unnormalised DCT-II matrix of size ``n``."""
    rows = np.arange(k)[:, None]
    cols = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * rows * (2 * cols + 1) / (2 * n))


_D8 = _dct_rows(32, 8)
_BIT_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64))


def pack_bits(bits: np.ndarray) -> int:
    """64 booleans (row-major 8x8) -> an integer, first bit most significant."""
    flat = np.asarray(bits, bool).reshape(-1)
    if flat.size != 64:
        raise ValueError(f"expected 64 bits, got {flat.size}")
    return int(np.sum(_BIT_WEIGHTS[flat], dtype=np.uint64))


def _phash_of_thumbnail(thumb: np.ndarray) -> int:
    low = _D8 @ thumb @ _D8.T
    return pack_bits(low > np.median(low))


def _dhash(grey: Image.Image) -> int:
    pixels = np.asarray(grey.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    return pack_bits(pixels[:, 1:] > pixels[:, :-1])


def _whash(grey: Image.Image) -> int:
    import imagehash  # only this method needs it (and PyWavelets)

    return int(str(imagehash.whash(grey)), 16)


def thumbnail(grey: Image.Image) -> np.ndarray:
    """The 32x32 Lanczos thumbnail pHash is computed from (float, as imagehash has it)."""
    if grey.mode != "L":
        grey = grey.convert("L")
    return np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)


def hashes(grey: Image.Image, method: str = "phash", transforms: str = "none",
           thumb: np.ndarray | None = None) -> list[int]:
    """The 64-bit hash of a grey (mode "L") image under each transform of the set, identity
    first (see :func:`transform_names`). ``thumb``: its :func:`thumbnail`, if already made."""
    if grey.mode != "L":
        grey = grey.convert("L")
    names = transform_names(transforms)
    if method == "phash":
        thumb = thumbnail(grey) if thumb is None else thumb
        return [_phash_of_thumbnail(np.ascontiguousarray(TRANSFORMS[n](thumb))) for n in names]
    if method in ("dhash", "whash"):
        fn = _dhash if method == "dhash" else _whash
        return [fn(grey if n == "identity" else grey.transpose(_PIL_TRANSPOSE[n]))
                for n in names]
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def to_hex(h: int) -> str:
    return f"{h:016x}"


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
