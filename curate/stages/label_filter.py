"""label_filter: the HSS-IAD "zero-image check" and label refinement, one reason code per rule.

Run after ``labels`` (it reads the masks the labels stage stored). Each rule records what it
measured in its detail, and drops the sample or flags it for review (kept) as ``actions`` says:

- ``defect_without_mask``: a defective image (label other than ``good``) with an empty mask, or
  with no mask at all. (On the real MTD: exactly the four ``MT_Uneven`` images whose masks are
  empty.)
- ``mask_vanishes``: a defect mask that is not empty but is at the training resolution: resized
  to ``train_size`` x ``train_size`` the way detectors resize masks (Pillow bilinear, which
  averages on reduction, then > 0.5), no pixel is left. (On MTD: the one-pixel mask of
  ``exp3_num_24829``.)
- ``mask_too_small``: fewer than ``min_pixels`` defect pixels at full resolution: too few to
  be a trustworthy annotation.
- ``good_with_mask``: a ``good`` image whose mask is not empty.
- ``mask_oversize``: the mask covers more than ``max_fraction`` of the image (per-category limits
  in ``max_fraction_by_category``), or its log area is a robust outlier above its category's
  (z > ``oversize_z`` against median and MAD, categories of at least ``min_category`` defect
  samples). Annotations far larger than the visible defect are STEEL's known fault. (On MTD:
  the 18 masks above 40%, among them the 48% ones, are flagged.)
- ``mask_size_mismatch``: the stored mask's size is not the image's.

Measured per defect sample: ``label_filter.mask_pixels`` and ``label_filter.train_pixels``
(defect pixels left at the training resolution).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from curate.core.manifest import GOOD, Manifest
from curate.core.measures import LABEL_FILTER_MASK_PIXELS, LABEL_FILTER_TRAIN_PIXELS
from curate.engine.runner import Context, SampleEnv, Stage, map_kept
from curate.stages.quality import robust_z

RULES = ("defect_without_mask", "mask_vanishes", "mask_too_small", "good_with_mask",
         "mask_oversize", "mask_size_mismatch")
DEFAULT_ACTIONS = {"defect_without_mask": "drop", "mask_vanishes": "drop",
                   "mask_too_small": "drop", "good_with_mask": "drop", "mask_oversize": "flag",
                   "mask_size_mismatch": "drop"}


@dataclass(frozen=True)
class LabelFilterParams:
    train_size: int = 256
    min_pixels: int = 4
    max_fraction: float = 0.4
    max_fraction_by_category: dict[str, float] = field(default_factory=dict)
    oversize_z: float = 3.5
    min_category: int = 30
    #: rule -> "drop" or "flag"; rules not named keep their default (see DEFAULT_ACTIONS).
    actions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.actions) - set(RULES)
        if unknown:
            raise ValueError(f"unknown rules in actions: {sorted(unknown)}; rules are "
                             f"{', '.join(RULES)}")
        bad = {k: v for k, v in self.actions.items() if v not in ("drop", "flag")}
        if bad:
            raise ValueError(f"actions must be 'drop' or 'flag', got {bad}")
        if self.train_size < 1 or self.min_pixels < 0:
            raise ValueError("train_size must be >= 1 and min_pixels >= 0")

    def action(self, rule: str) -> str:
        return self.actions.get(rule, DEFAULT_ACTIONS[rule])


def pixels_at_train_size(mask: np.ndarray, size: int) -> int:
    """Defect pixels left after resizing to size x size as detectors do (bilinear, > 0.5)."""
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size),
                                                               Image.Resampling.BILINEAR)
    return int(np.count_nonzero(np.asarray(small) > 127))


def inspect_sample(row: dict[str, Any], env: SampleEnv) -> dict[str, Any]:
    """Findings for one sample: a list of (rule, detail) and the measures."""
    p: LabelFilterParams = env.params
    key = row["artifacts"].get("mask")
    is_defect = row["label"] != GOOD
    if key is None:
        if is_defect:
            return {"findings": [("defect_without_mask",
                                  f"{row['path']}: labelled {row['label']!r} but has no mask")]}
        return {}
    mask = env.store.read_mask(key)
    pixels = int(np.count_nonzero(mask))
    measures: dict[str, Any] = {LABEL_FILTER_MASK_PIXELS: pixels}
    findings = []
    if mask.shape != (row["height"], row["width"]):
        findings.append(("mask_size_mismatch",
                         f"{row['path']}: mask is {mask.shape[1]}x{mask.shape[0]}, image "
                         f"{row['width']}x{row['height']}"))
        return {"findings": findings, "measures": measures}
    if not is_defect:
        if pixels:
            findings.append(("good_with_mask", f"{row['path']}: labelled good but its mask has "
                                               f"{pixels} defect pixels"))
        return {"findings": findings, "measures": measures}
    if pixels == 0:
        findings.append(("defect_without_mask",
                         f"{row['path']}: labelled {row['label']!r} but its mask is empty"))
        return {"findings": findings, "measures": measures}
    left = pixels_at_train_size(mask, p.train_size)
    measures[LABEL_FILTER_TRAIN_PIXELS] = left
    if left == 0:
        findings.append(("mask_vanishes", f"{row['path']}: its {pixels}-pixel mask leaves no "
                                          f"pixel at {p.train_size}x{p.train_size}"))
    if pixels < p.min_pixels:
        findings.append(("mask_too_small", f"{row['path']}: {pixels} defect pixels (limit "
                                           f"{p.min_pixels})"))
    fraction = pixels / mask.size
    limit = p.max_fraction_by_category.get(row["category"], p.max_fraction)
    if fraction > limit:
        findings.append(("mask_oversize", f"{row['path']}: mask covers {fraction:.1%} of the "
                                          f"image (limit {limit:.0%} for {row['category']})"))
    return {"findings": findings, "measures": measures, "fraction": fraction}


class LabelFilter(Stage[LabelFilterParams]):
    name = "label_filter"
    version = "1"
    Params = LabelFilterParams

    def run(self, inputs: list[Manifest], params: LabelFilterParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        rows, kept, results = map_kept(self, manifest, params, ctx, inspect_sample, desc="label filter")
        self._robust_oversize(rows, kept, results, params)
        changes = []
        for i, res in zip(kept, results, strict=True):
            update: dict[str, Any] = {"measures": res.get("measures", {})}
            for rule, detail in res.get("findings", []):
                key = "drop" if params.action(rule) == "drop" else "flags"
                update.setdefault(key, []).append((rule, detail))
            if "drop" in res:  # the sample's mask could not be read
                update.setdefault("drop", []).extend(res["drop"])
            changes.append((i, update))
        return self.output_updates(manifest, changes, params, ctx)

    @staticmethod
    def _robust_oversize(rows, kept, results, params: LabelFilterParams) -> None:
        """Add mask_oversize for masks whose log area is a robust outlier in their category."""
        by_category: dict[str, list[int]] = {}
        for k, res in enumerate(results):
            if "fraction" in res:
                by_category.setdefault(rows[kept[k]]["category"], []).append(k)
        for category, members in by_category.items():
            if len(members) < params.min_category:
                continue
            zs = robust_z(np.log10([results[k]["fraction"] for k in members]))
            for k, z in zip(members, zs, strict=True):
                findings = results[k]["findings"]
                if z > params.oversize_z and not any(r == "mask_oversize" for r, _ in findings):
                    findings.append(("mask_oversize", (
                        f"{rows[kept[k]]['path']}: mask covers {results[k]['fraction']:.1%} of "
                        f"the image, {z:.1f} robust deviations above the median of {category} "
                        f"(limit {params.oversize_z:g})")))
