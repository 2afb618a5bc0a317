"""label_filter: the HSS-IAD "zero-image check" and label refinement, one reason code per rule.

Run after ``labels``: it judges the masks the labels stage stored by their facts
(:mod:`curate.engine.mask_facts`: recorded by ``labels``, else decoded once here). Each rule
records what it measured in its detail, and drops the sample or flags it for review (kept) as
``actions`` says:

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

from curate.core.manifest import GOOD, Manifest
from curate.core.measures import LABEL_FILTER_MASK_PIXELS, LABEL_FILTER_TRAIN_PIXELS
from curate.engine.facts import Extractor
from curate.engine.mask_facts import MaskAtSize, MaskStats, look_masks
from curate.engine.runner import Context, Stage, kept_rows
from curate.stages.quality import robust_z

#: The row columns the rules read (besides the mask's facts).
COLUMNS = ("path", "label", "category", "height", "width", "artifacts")
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


def inspect(row: dict[str, Any], stats: dict[str, Any] | None, at_size: int | None,
            p: LabelFilterParams) -> dict[str, Any]:
    """Findings for one sample: a list of (rule, detail) and the measures, from the facts of
    its mask (``stats``: :class:`MaskStats`, None when it has no mask; ``at_size``: defect
    pixels left at ``train_size``)."""
    is_defect = row["label"] != GOOD
    if stats is None:
        if is_defect:
            return {"findings": [("defect_without_mask",
                                  f"{row['path']}: labelled {row['label']!r} but has no mask")]}
        return {}
    pixels = stats["pixels"]
    measures: dict[str, Any] = {LABEL_FILTER_MASK_PIXELS: pixels}
    findings = []
    if (stats["height"], stats["width"]) != (row["height"], row["width"]):
        findings.append(("mask_size_mismatch",
                         f"{row['path']}: mask is {stats['width']}x{stats['height']}, image "
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
    measures[LABEL_FILTER_TRAIN_PIXELS] = at_size
    if at_size == 0:
        findings.append(("mask_vanishes", f"{row['path']}: its {pixels}-pixel mask leaves no "
                                          f"pixel at {p.train_size}x{p.train_size}"))
    if pixels < p.min_pixels:
        findings.append(("mask_too_small", f"{row['path']}: {pixels} defect pixels (limit "
                                           f"{p.min_pixels})"))
    fraction = pixels / (stats["height"] * stats["width"])
    limit = p.max_fraction_by_category.get(row["category"], p.max_fraction)
    if fraction > limit:
        findings.append(("mask_oversize", f"{row['path']}: mask covers {fraction:.1%} of the "
                                          f"image (limit {limit:.0%} for {row['category']})"))
    return {"findings": findings, "measures": measures, "fraction": fraction}


class LabelFilter(Stage[LabelFilterParams]):
    name = "label_filter"
    version = "1"
    Params = LabelFilterParams

    def facts(self, params: LabelFilterParams) -> list[Extractor]:
        return [MaskStats(), MaskAtSize(params.train_size)]

    def run(self, inputs: list[Manifest], params: LabelFilterParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        kept, rows = kept_rows(manifest, COLUMNS)
        stats, at_size = wanted = [MaskStats(), MaskAtSize(params.train_size)]
        keys = [row["artifacts"].get("mask") for row in rows]
        looked = look_masks(ctx, self.name, [k for k in keys if k is not None], wanted,
                            desc="label filter")
        # Each mask's facts once (identical masks share a key), then each row judged by them.
        known = [k for k in dict.fromkeys(keys) if k is not None and k not in looked.failed]
        facts: dict[str, tuple[dict[str, Any], int]] = {
            key: (record, left) for key, record, left in zip(
                known, looked[stats].take(known).to_pylist(),
                looked[at_size].column(known, "pixels"), strict=True)}
        results: list[dict[str, Any]] = []
        for row, key in zip(rows, keys, strict=True):
            if key is None:
                results.append(inspect(row, None, None, params))
            elif key in looked.failed:  # the mask could not be read
                results.append({"drop": looked.drop(key, row["path"])})
            else:
                results.append(inspect(row, *facts[key], params))
        self._robust_oversize(rows, results, params)
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
    def _robust_oversize(rows, results, params: LabelFilterParams) -> None:
        """Add mask_oversize for masks whose log area is a robust outlier in their category
        (``results``: the findings of ``rows``, the kept rows)."""
        by_category: dict[str, list[int]] = {}
        for k, res in enumerate(results):
            if "fraction" in res:
                by_category.setdefault(rows[k]["category"], []).append(k)
        for category, members in by_category.items():
            if len(members) < params.min_category:
                continue
            zs = robust_z(np.log10([results[k]["fraction"] for k in members]))
            for k, z in zip(members, zs, strict=True):
                findings = results[k]["findings"]
                if z > params.oversize_z and not any(r == "mask_oversize" for r, _ in findings):
                    findings.append(("mask_oversize", (
                        f"{rows[k]['path']}: mask covers {results[k]['fraction']:.1%} of "
                        f"the image, {z:.1f} robust deviations above the median of {category} "
                        f"(limit {params.oversize_z:g})")))
