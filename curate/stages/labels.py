"""labels: every annotation as the source gave it -> one binary pixel mask per sample.

Mask files (anti-aliased or not) are binarised with a recorded threshold; Severstal RLE strings,
boxes (VOC / YOLO / COCO, already in pixel coordinates in the row) and polygons are rasterised
with the pixel-centre rule of ``curate.imaging.masks``. The union goes to the store as artifact
``mask``; where a sample has several defect classes, each class also gets ``mask:<class>``.

Mask files are read by the rule of ``curate.imaging.masks`` (8- or 16-bit, palette, grey + alpha,
colour; binary, label-id or anti-aliased values); a mask file that is anything but a plain
8-bit grey mask is flagged ``unusual_mask`` with what was unusual.

Measured per sample (``measures``): ``labels.mask_fraction`` (defect pixels / all pixels) and,
for mask files, ``labels.threshold`` and ``labels.grey_pixels`` (pixels neither 0 nor full
value: > 0 means the mask was anti-aliased). An unreadable mask file (empty, not an image,
declaring more than ``curate.imaging.io.MAX_PIXELS`` pixels), a mask whose size differs from its
image's (checked from its header, before decoding), a malformed RLE, an RLE running past the
image, and a box or polygon outside the image each drop the sample with their own reason code,
whose detail names the file.

The stage holds each mask it stores, so it records the mask's facts by store key right there
(:mod:`curate.engine.mask_facts`: ``MaskStats``, and the mask facts later stages asked for
through ``ctx.prefetch``): ``label_filter`` and the export then decode no mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curate.core.manifest import GOOD, Manifest
from curate.core.measures import LABELS_GREY_PIXELS, LABELS_MASK_FRACTION, LABELS_THRESHOLD
from curate.engine.mask_facts import (
    MaskExtractor,
    MaskStats,
    add_mask_facts,
    compute_mask_facts,
    mask_facts,
)
from curate.engine.runner import Context, SampleEnv, Stage, Update, map_updates
from curate.imaging.masks import (
    AnnotationError,
    box_mask,
    check_box_inside,
    check_polygon_inside,
    polygon_mask,
    read_mask,
    rle_decode,
)


@dataclass(frozen=True)
class LabelsParams:
    #: "auto" (see ``curate.imaging.io.binarize``: 0 for binary and label-id masks, 127 for
    #: anti-aliased ones) or an integer on the 8-bit scale: foreground is value > threshold.
    threshold: str | int = field(default="auto", metadata={
        "choices": ("auto",),
        "help": "Mask binarisation: 'auto' (127, or 0 for 0/1 masks) or 0..254."})
    #: Overshooting more, a box or polygon counts as outside the image.
    tolerance: float = field(default=1.0, metadata={
        "help": "Pixels a box or polygon may overshoot the image."})

    def __post_init__(self):
        if self.threshold != "auto" and not (isinstance(self.threshold, int)
                                             and 0 <= self.threshold < 255):
            raise ValueError(f"threshold must be 'auto' or an integer in 0..254, "
                             f"got {self.threshold!r}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")


@dataclass(frozen=True)
class LabelsJob:
    """What each sample's function gets as ``env.params``: the parameters, and the mask facts
    to record for each union mask it stores."""

    params: LabelsParams
    facts: tuple[MaskExtractor, ...]


#: The update key that carries a stored mask's facts (mask key -> extractor key -> values)
#: back to :meth:`Labels.run`, which keeps them and strips the key before the update is applied.
FACTS = "mask_facts"


def _mask_from_file(row: dict[str, Any], env: SampleEnv, height: int, width: int,
                    update: Update) -> np.ndarray | None:
    rel = row["annotation"]["mask"]
    try:
        read = read_mask(env.read_source(row, rel), env.params.params.threshold,
                         (height, width))
    except AnnotationError as exc:
        update["drop"] = [(exc.code, f"mask {rel} {exc}")]
        return None
    update["measures"][LABELS_THRESHOLD] = read.threshold
    update["measures"][LABELS_GREY_PIXELS] = read.grey_pixels
    if read.unusual:
        update["flags"] = [("unusual_mask", f"mask {rel}: {'; '.join(read.unusual)}")]
    return read.mask


def rasterize_sample(row: dict[str, Any], env: SampleEnv) -> Update:
    """Masks for one sample (see the module docstring)."""
    ann = row["annotation"]
    height, width = row["height"], row["width"]
    update: Update = {"measures": {}}
    by_class: dict[str, np.ndarray] = {}

    def add(cls: str, mask: np.ndarray) -> None:
        by_class[cls] = by_class[cls] | mask if cls in by_class else mask

    if "mask" in ann:
        mask = _mask_from_file(row, env, height, width, update)
        if mask is None:
            return update
        classes = row["defect_classes"] or ["defect"]
        add(classes[0] if len(classes) == 1 else "defect", mask)
    tol = env.params.params.tolerance
    where = ann.get("file", row["path"])
    try:
        for rle in ann.get("rle", []):
            add(rle["class"], rle_decode(rle["counts"], height, width))
        for b in ann.get("boxes", []):
            check_box_inside(b["x0"], b["y0"], b["x1"], b["y1"], height, width, tol)
            add(b["class"], box_mask(b["x0"], b["y0"], b["x1"], b["y1"], height, width))
        for p in ann.get("polygons", []):
            check_polygon_inside(p["points"], height, width, tol)
            add(p["class"], polygon_mask(p["points"], height, width))
    except AnnotationError as exc:
        update["drop"] = [(exc.code, f"{where}: {exc}")]
        return update

    union = np.zeros((height, width), bool)
    for mask in by_class.values():
        union |= mask
    update["measures"][LABELS_MASK_FRACTION] = float(union.mean()) if union.size else 0.0
    if by_class and (row["label"] != GOOD or union.any()):
        artifacts = {"mask": env.store.put_mask(union)}
        update[FACTS] = {artifacts["mask"]: compute_mask_facts(
            artifacts["mask"], union, env.store, env.params.facts)}
        if len(by_class) > 1:
            for cls, mask in sorted(by_class.items()):
                artifacts[f"mask:{cls}"] = env.store.put_mask(mask)
        update["artifacts"] = artifacts
    return update


class Labels(Stage[LabelsParams]):
    name = "labels"
    version = "2"  # 2: mask files read at full depth, by palette index, label ids as defect
    Params = LabelsParams

    def run(self, inputs: list[Manifest], params: LabelsParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        extractors = tuple(mask_facts([MaskStats(), *ctx.prefetch]))
        updates = map_updates(self, manifest, LabelsJob(params, extractors), ctx,
                              rasterize_sample)
        facts: dict[str, dict[str, dict[str, Any]]] = {}
        for _, update in updates:
            facts.update(update.pop(FACTS, {}))
        add_mask_facts(ctx, extractors, facts)
        return self.output_updates(manifest, updates, params, ctx)
