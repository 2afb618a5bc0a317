"""DRAEM / RealNet anomaly synthesis: Perlin masks, blending, a procedural anomaly texture.

- :func:`perlin_noise`: 2-D gradient (Perlin) noise with ``res`` lattice cells per axis, the
  fade ``6t^5 − 15t^4 + 10t^3`` and the √2 scale of DRAEM's ``rand_perlin_2d_np``; any image
  size (computed on the next multiple of the lattice and cropped).
- :func:`perlin_mask`: scales ``2^kx``, ``2^ky`` with k drawn per axis from ``min_scale ..
  max_scale − 1`` (RealNet: 0..5), a rotation by U(−90°, 90°) about the centre (zeros come in at
  the corners, as imgaug's Affine does), and the threshold 0.5.
- :func:`blend`: ``A = (1 − M)·I + (1 − δ)·M·I + δ·M·P``.
- :func:`procedural_texture`: a coloured fractal-Perlin texture, the anomaly source when no
  SDAS bank is available (RealNet's other source, DTD textures, is not bundled).
- :func:`anomaly_mask`: RealNet's training mask, a Perlin mask times the foreground mask.

All randomness comes from the ``numpy.random.Generator`` passed in. numpy (and OpenCV for the
rotation) only: `curate sdas blend` (curate.stages.sdas) and the RealNet detector
share this code, and `detectors` never imports `curate`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = [
    "anomaly_mask",
    "blend",
    "list_bank",
    "perlin_mask",
    "perlin_noise",
    "procedural_texture",
    "rotate",
]

_INTER_LINEAR = 1  # cv2.INTER_LINEAR (cv2 is imported where it is used)


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator
                 ) -> np.ndarray:
    """Perlin noise of ``shape`` (H, W) with ``res`` (rows, cols) lattice cells; about [−1, 1]."""
    cells_y, cells_x = res
    height = math.ceil(shape[0] / cells_y) * cells_y
    width = math.ceil(shape[1] / cells_x) * cells_x
    angles = 2 * math.pi * rng.random((cells_y + 1, cells_x + 1))
    grads = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    # Position of each pixel inside its cell (0..1) and the cell it lies in.
    ys = np.arange(height) * cells_y / height
    xs = np.arange(width) * cells_x / width
    iy, ix = ys.astype(int), xs.astype(int)
    fy, fx = (ys % 1)[:, None], (xs % 1)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[iy + dy][:, ix + dx]
        return (fy - dy) * g[..., 0] + (fx - dx) * g[..., 1]

    ty, tx = _fade(fy), _fade(fx)
    top = corner(0, 0) + tx * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + tx * (corner(1, 1) - corner(1, 0))
    noise = math.sqrt(2) * (top + ty * (bottom - top))
    return noise[:shape[0], :shape[1]]


def rotate(image: np.ndarray, angle: float, *, interpolation: int = _INTER_LINEAR
           ) -> np.ndarray:
    """Rotate about the centre by ``angle`` degrees, zeros outside."""
    import cv2

    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    return cv2.warpAffine(image, matrix, (w, h), flags=interpolation,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, *, min_scale: int = 0,
                max_scale: int = 6, threshold: float = 0.5) -> tuple[np.ndarray, dict]:
    """A binary Perlin mask and how it was drawn (``scale_x``, ``scale_y``, ``angle``)."""
    ky, kx = rng.integers(min_scale, max_scale, size=2)
    scale_y, scale_x = 2 ** int(ky), 2 ** int(kx)
    angle = float(rng.uniform(-90.0, 90.0))
    noise = rotate(perlin_noise(shape, (scale_y, scale_x), rng).astype(np.float32), angle)
    return noise > threshold, {"scale_x": scale_x, "scale_y": scale_y, "angle": angle}


def blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, delta: float) -> np.ndarray:
    """``(1 − M)·I + (1 − δ)·M·I + δ·M·P`` on uint8 images of one shape, rounded to uint8."""
    m = mask.astype(np.float32)
    if image.ndim == 3:
        m = m[..., None]
    i, p = image.astype(np.float32), source.astype(np.float32)
    out = (1 - m) * i + (1 - delta) * m * i + delta * m * p
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator, channels: int = 3
                       ) -> np.ndarray:
    """A uint8 texture: three octaves of Perlin noise mapped between two random colours."""
    base = 2 ** int(rng.integers(1, 5))
    noise = sum(perlin_noise(shape, (base * 2 ** o, base * 2 ** o), rng) / 2 ** o
                for o in range(3))
    n = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-6)
    low, high = rng.uniform(0, 255, size=(2, channels))
    texture = np.clip(np.rint(low + n[..., None] * (high - low)), 0, 255).astype(np.uint8)
    return texture if channels > 1 else texture[..., 0]


def anomaly_mask(shape: tuple[int, int], rng: np.random.Generator,
                 foreground: np.ndarray | None = None, *, min_scale: int = 0,
                 max_scale: int = 6, threshold: float = 0.5) -> np.ndarray:
    """RealNet's blending mask: a Perlin mask (:func:`perlin_mask`) times the foreground mask
    (H×W, any non-zero pixel is foreground; None: everything is). May be empty, as in the
    official code (the sample then stays normal)."""
    mask, _ = perlin_mask(shape, rng, min_scale=min_scale, max_scale=max_scale,
                          threshold=threshold)
    if foreground is not None:
        foreground = np.asarray(foreground)
        if foreground.shape != mask.shape:
            raise ValueError(f"foreground mask {foreground.shape} does not match {mask.shape}")
        mask &= foreground > 0
    return mask


#: Image suffixes a bank folder may hold.
BANK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_bank(folder: str | Path) -> list[Path]:
    """The images of an anomaly-source bank folder (e.g. SDAS / SIA images), recursively, sorted.
    An existing folder with no image is an error naming it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"anomaly bank folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in BANK_SUFFIXES
                   and p.is_file())
    if not files:
        raise FileNotFoundError(f"anomaly bank folder {folder} holds no images "
                                f"({', '.join(BANK_SUFFIXES)})")
    return files
