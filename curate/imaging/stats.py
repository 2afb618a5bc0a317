"""Per-image statistics for curation: sharpness, exposure and contrast of a grey image.

All take a 2-d uint8 array. Exposure and contrast come from one 256-bin histogram, which is far
cheaper than percentiles over the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def variance(values: np.ndarray) -> float:
    return float(cv2.meanStdDev(values)[1][0, 0]) ** 2  # much faster than ndarray.var()


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian: high for crisp edges and texture, low for blurred images
    (Pech-Pacheco et al. 2000). Only comparable between images of similar content and scale,
    hence robust z-scores within a category (see curate.stages.quality)."""
    return variance(cv2.Laplacian(grey, cv2.CV_32F))


def relative_sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian over the variance of the image (+1 against flat images).

    Unchanged by a change of contrast or brightness, so it ranks copies of one image by how
    much fine detail survived (blur and lossy re-encoding lower it), not by how strongly they
    were contrast-stretched."""
    return sharpness(grey) / (variance(grey) + 1.0)


@dataclass(frozen=True)
class Exposure:
    dark_fraction: float    # pixels at or below the dark level
    bright_fraction: float  # pixels at or above the bright level
    contrast: float         # 99th minus 1st percentile of grey levels


def exposure(grey: np.ndarray, dark_level: int = 5, bright_level: int = 250) -> Exposure:
    if grey.size < 2 ** 24:  # OpenCV's histogram counts in float32: exact below 2^24
        # The same counts as np.bincount, four times faster.
        hist = cv2.calcHist([np.ascontiguousarray(grey)], [0], None, [256], [0, 256]
                            ).ravel().astype(np.float64)
    else:
        hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return Exposure(0.0, 0.0, 0.0)
    cdf = np.cumsum(hist) / total
    p1 = int(np.searchsorted(cdf, 0.01))
    p99 = int(np.searchsorted(cdf, 0.99))
    return Exposure(
        dark_fraction=float(hist[: dark_level + 1].sum() / total),
        bright_fraction=float(hist[bright_level:].sum() / total),
        contrast=float(p99 - p1),
    )
