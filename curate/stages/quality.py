"""quality: drop images too small, blurred, over- or under-exposed, or without contrast.

Decisions over per-image facts (:mod:`curate.engine.facts`: the grey image's statistics, from the
decode every stage shares). Every check records its measured value (``measures``: ``quality.sharpness``, ``quality.blur_z``,
``quality.dark_fraction``, ``quality.bright_fraction``, ``quality.contrast``) and, when it fails,
a reason code whose detail gives the value and the limit:

- ``too_small``: the shorter side is below ``min_side`` pixels;
- ``blurry``: sharpness (variance of the Laplacian) is an outlier *within the sample's category*:
  robust z-score of its log10, (x − median) / (1.4826 · MAD), below ``blur_z``. Sharpness
  depends on content and scale, so a global threshold would flag whole smooth categories; the
  category's own distribution does not. Categories with fewer than ``min_category`` (30)
  samples are not judged: a median and a MAD of fewer images are no distribution to speak of,
  and a small category mixing kinds of scene (Casting before reclassification) would lose
  its smoothest kind;
- ``underexposed`` / ``overexposed``: more than ``max_clipped`` of the pixels at or below
  grey level 5 / at or above 250;
- ``low_contrast``: the 1st-to-99th percentile range of grey levels is below ``min_contrast``.

Defaults, measured on the real MTD (1,344 images; ``tests/test_quality.py`` checks them): the
lowest blur z-score of an original is −2.8, while copies blurred with a Gaussian of σ = 2 score
−5.0 or lower and σ = 1 mostly below −3.5: ``blur_z = −3`` flags no original and nearly every
blurred copy. The most clipped original has 27% of its pixels at 250 or above (bright glare on
a tile): ``max_clipped = 0.4``. The lowest contrast range is 46 grey levels:
``min_contrast = 16``. The smallest side is 103 px: ``min_side = 64``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from curate.core.manifest import Manifest
from curate.core.measures import (
    QUALITY_BLUR_Z,
    QUALITY_BRIGHT_FRACTION,
    QUALITY_CONTRAST,
    QUALITY_DARK_FRACTION,
    QUALITY_SHARPNESS,
)
from curate.engine.facts import LOOK_COLUMNS, Extractor, Look, look
from curate.engine.runner import Context, Stage, kept_rows
from curate.imaging.stats import exposure


@dataclass(frozen=True)
class QualityParams:
    min_side: int = field(default=64, metadata={
        "min": 1, "help": "Smallest acceptable shorter side, in pixels."})
    blur_z: float = field(default=-3.0, metadata={
        "help": "Drop when sharpness is this many robust deviations below the category's "
                "median."})
    min_category: int = 30
    max_clipped: float = field(default=0.4, metadata={
        "min": 0, "max": 1, "min_open": True,
        "help": "Largest fraction of pixels at <= 5 or >= 250."})
    min_contrast: float = field(default=16.0, metadata={
        "help": "Smallest 1st-to-99th percentile range of grey levels."})

    def __post_init__(self):
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if not 0 < self.max_clipped <= 1:
            raise ValueError(f"max_clipped must be in (0, 1], got {self.max_clipped}")
        if self.min_category < 3:
            raise ValueError(f"min_category must be >= 3, got {self.min_category}")


@dataclass(frozen=True)
class QualityFacts(Extractor):
    """Sharpness, exposure and contrast of the grey image, and its size as decoded."""

    name = "quality.stats"
    version = "1"
    fields = (("sharpness", pa.float64()), ("dark_fraction", pa.float64()),
              ("bright_fraction", pa.float64()), ("contrast", pa.float64()),
              ("height", pa.int64()), ("width", pa.int64()))

    def compute(self, look: Look) -> dict[str, Any]:
        grey = look.grey
        exp = exposure(grey)
        return {"sharpness": look.sharpness, "dark_fraction": exp.dark_fraction,
                "bright_fraction": exp.bright_fraction, "contrast": exp.contrast,
                "height": grey.shape[0], "width": grey.shape[1]}


def judge(path: str, facts: dict[str, Any], p: QualityParams) -> dict[str, Any]:
    """One sample's measures and the checks that need no other sample."""
    measures = {QUALITY_SHARPNESS: facts["sharpness"],
                QUALITY_DARK_FRACTION: facts["dark_fraction"],
                QUALITY_BRIGHT_FRACTION: facts["bright_fraction"],
                QUALITY_CONTRAST: facts["contrast"]}
    drops = []
    side = min(facts["height"], facts["width"])
    if side < p.min_side:
        drops.append(("too_small", f"{path}: shorter side {side} px (limit {p.min_side} px)"))
    if facts["dark_fraction"] > p.max_clipped:
        drops.append(("underexposed", f"{path}: {facts['dark_fraction']:.1%} of pixels at "
                      f"grey level <= 5 (limit {p.max_clipped:.0%})"))
    if facts["bright_fraction"] > p.max_clipped:
        drops.append(("overexposed", f"{path}: {facts['bright_fraction']:.1%} of pixels at "
                      f"grey level >= 250 (limit {p.max_clipped:.0%})"))
    if facts["contrast"] < p.min_contrast:
        drops.append(("low_contrast", f"{path}: grey levels span {facts['contrast']:.0f} "
                      f"from 1st to 99th percentile (limit {p.min_contrast:g})"))
    update: dict[str, Any] = {"measures": measures}
    if drops:
        update["drop"] = drops
    return update


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x − median) / (1.4826 · MAD). When more than half the values are equal the MAD is 0;
    then the mean absolute deviation (x 1.2533, its consistency constant) stands in, as in
    Iglewicz and Hoaglin's modified z-score; zeros when that is 0 too (no spread at all)."""
    values = np.asarray(values, dtype=np.float64)
    med = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - med))
    if spread == 0:
        spread = 1.2533 * float(np.mean(np.abs(values - med)))
    return np.zeros_like(values) if spread == 0 else (values - med) / spread


class Quality(Stage[QualityParams]):
    name = "quality"
    version = "1"
    Params = QualityParams

    def facts(self, params: QualityParams) -> list[Extractor]:
        return [QualityFacts()]

    def run(self, inputs: list[Manifest], params: QualityParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        positions, rows = kept_rows(manifest, LOOK_COLUMNS)
        stats = QualityFacts()
        looked = look(ctx, self.name, rows, manifest.roots, [stats], desc="quality")
        measured = [k for k in range(len(rows)) if k not in looked.failed]
        records = looked[stats].take([rows[k]["sha256"] for k in measured]).to_pylist()
        updates = {k: judge(rows[k]["path"], facts, params)
                   for k, facts in zip(measured, records, strict=True)}
        updates.update(looked.failed)
        # Blur is judged against the category's own distribution of sharpness.
        by_category: dict[str, list[int]] = {}
        for k in measured:
            by_category.setdefault(rows[k]["category"], []).append(k)
        for members in by_category.values():
            if len(members) < params.min_category:
                continue
            logs = np.log10([max(updates[k]["measures"][QUALITY_SHARPNESS], 1e-6)
                             for k in members])
            for k, z in zip(members, robust_z(logs), strict=True):
                update = updates[k]
                update["measures"][QUALITY_BLUR_Z] = float(z)
                if z < params.blur_z:
                    value = update["measures"][QUALITY_SHARPNESS]
                    update.setdefault("drop", []).append(("blurry", (
                        f"{rows[k]['path']}: sharpness {value:.3g} is {abs(z):.1f} robust "
                        f"deviations below its category's median (limit {params.blur_z:g})")))
        return self.output_updates(manifest, [(positions[k], updates[k])
                                              for k in range(len(rows))], params, ctx)
