"""reclassify: sort the Casting images into HSS-IAD's Casting_C1 / C2 / C3 (paper, III-A).

The paper's criteria: C1 — cast and machined surfaces, the machined part simple, no threaded
holes (oil stains or machining marks allowed); C2 — machined surfaces of complex structure with
several threaded holes and other process features; C3 — complicated interference, machined
surfaces with few or no threaded holes.

Three measurable features per image, recorded in ``measures``:

- ``reclassify.holes``: threaded holes — circles found by the Hough transform (radius 4-15% of
  the shorter side) whose inside is clearly darker (by ``hole_contrast`` grey levels) than the
  ring around them;
- ``reclassify.machined``: machined-surface fraction — pixels that are bright (above the image's
  70th percentile and at least ``machined_level``) and smooth (local standard deviation in a
  5x5 window below ``machined_std``);
- ``reclassify.clutter``: interference — Canny edge density on the lightly smoothed image,
  outside the holes found.

Rule, in order: at least ``min_holes_c2`` holes on a machined face (machined fraction at least
``machined_c2``) → C2; else clutter at least ``clutter_c3`` → C3; else machined fraction at
least ``machined_c1`` → C1; else C3 (interference, little machined surface). The defaults were set on
drawn scenes (``curate.testing.fixtures.casting_scene``) — no real casting images are available to
this project — so check them on real data with ``--dry-run`` and correct individual images
with an override file, which always wins: YAML mapping sample id → ``{class: C2, note: why}``.
Overridden samples record ``reclassify.rule = "override"`` and the note.

Only samples of the ``category`` (default ``Casting``) are touched; their category becomes
``<category>_<class>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from curate.core.errors import CurateError, stable_text
from curate.core.manifest import Manifest
from curate.core.measures import (
    RECLASSIFY_CLUTTER,
    RECLASSIFY_HOLES,
    RECLASSIFY_MACHINED,
    RECLASSIFY_NOTE,
    RECLASSIFY_RULE,
)
from curate.engine.runner import (
    Context,
    SampleEnv,
    Stage,
    map_updates,
    params_dict,
    recorded_file,
)
from curate.imaging.io import decode

CLASSES = ("C1", "C2", "C3")


@dataclass(frozen=True)
class ReclassifyParams:
    category: str = "Casting"
    min_holes_c2: int = 2
    machined_c2: float = 0.15
    clutter_c3: float = 0.06
    machined_c1: float = 0.25
    hole_contrast: float = 40.0
    machined_level: int = 150
    machined_std: float = 6.0
    #: YAML file: sample id -> {class: C1|C2|C3, note: text}. Always wins over the rule.
    overrides: str = ""


@dataclass(frozen=True)
class CastingFeatures:
    holes: int
    machined: float
    clutter: float


def casting_features(grey: np.ndarray, p: ReclassifyParams) -> CastingFeatures:
    side = min(grey.shape)
    smooth = cv2.GaussianBlur(grey, (0, 0), 1.5)
    r_min, r_max = max(3, int(0.04 * side)), max(4, int(0.15 * side))
    circles = cv2.HoughCircles(smooth, cv2.HOUGH_GRADIENT, dp=1.2, minDist=2 * r_min,
                               param1=120, param2=18, minRadius=r_min, maxRadius=r_max)
    holes_mask = np.zeros(grey.shape, np.uint8)
    holes = 0
    for cx, cy, r in (circles[0] if circles is not None else []):
        inside = np.zeros(grey.shape, np.uint8)
        cv2.circle(inside, (int(cx), int(cy)), int(r * 0.8), 1, -1)
        ring = np.zeros(grey.shape, np.uint8)
        cv2.circle(ring, (int(cx), int(cy)), int(r * 1.6), 1, -1)
        ring[inside > 0] = 0
        cv2.circle(ring, (int(cx), int(cy)), int(r * 1.1), 0, -1)
        if inside.any() and ring.any() and \
                grey[ring > 0].mean() - grey[inside > 0].mean() >= p.hole_contrast:
            holes += 1
            cv2.circle(holes_mask, (int(cx), int(cy)), int(r * 1.2), 1, -1)
    g = grey.astype(np.float32)
    local_mean = cv2.blur(g, (5, 5))
    local_std = np.sqrt(np.maximum(cv2.blur(g * g, (5, 5)) - local_mean ** 2, 0))
    bright = (g >= max(p.machined_level, float(np.percentile(g, 70))))
    machined = float(np.mean(bright & (local_std < p.machined_std)))
    edges = cv2.Canny(smooth, 60, 150) > 0
    outside = holes_mask == 0
    clutter = float(edges[outside].mean()) if outside.any() else 0.0
    return CastingFeatures(holes, machined, clutter)


def casting_class(f: CastingFeatures, p: ReclassifyParams) -> str:
    if f.holes >= p.min_holes_c2 and f.machined >= p.machined_c2:
        return "C2"
    if f.clutter >= p.clutter_c3:
        return "C3"
    if f.machined >= p.machined_c1:
        return "C1"
    return "C3"


def load_overrides(path: str) -> dict[str, dict[str, str]]:
    """The override file: sample id -> {"class": C1|C2|C3, "note": text}."""
    try:
        doc = yaml.safe_load(Path(path).read_text("utf-8")) or {}
    except FileNotFoundError:
        raise CurateError(f"{path}: override file not found") from None
    except yaml.YAMLError as exc:
        raise CurateError(f"{path}: not valid YAML ({stable_text(exc)}); expected sample id -> "
                          "{class: C1|C2|C3, note: ...}") from None
    if not isinstance(doc, dict):
        raise CurateError(f"{path}: expected a mapping of sample id -> {{class, note}}")
    out = {}
    for sample_id, entry in doc.items():
        cls = entry.get("class") if isinstance(entry, dict) else entry
        if cls not in CLASSES:
            raise CurateError(f"{path}: sample {sample_id}: class {cls!r} is not one of "
                              f"{', '.join(CLASSES)}")
        note = str(entry.get("note", "")) if isinstance(entry, dict) else ""
        out[str(sample_id)] = {"class": cls, "note": note}
    return out


@dataclass(frozen=True)
class _Job:
    """What the workers get: the parameters and the overrides already read."""

    params: ReclassifyParams
    overrides: dict[str, dict[str, str]]


def reclassify_sample(row: dict[str, Any], env: SampleEnv) -> dict[str, Any]:
    p: ReclassifyParams = env.params.params
    if row["category"] != p.category:
        return {}
    grey = decode(env.read_source(row), grayscale=True)
    f = casting_features(grey, p)
    measures: dict[str, Any] = {RECLASSIFY_HOLES: f.holes,
                                RECLASSIFY_MACHINED: f.machined,
                                RECLASSIFY_CLUTTER: f.clutter}
    override = env.params.overrides.get(row["sample_id"])
    if override is not None:
        cls = override["class"]
        measures |= {RECLASSIFY_RULE: "override", RECLASSIFY_NOTE: override["note"]}
    else:
        cls = casting_class(f, p)
        measures[RECLASSIFY_RULE] = "features"
    return {"category": f"{p.category}_{cls}", "measures": measures}


class Reclassify(Stage[ReclassifyParams]):
    name = "reclassify"
    version = "1"
    Params = ReclassifyParams

    def recorded_params(self, params: ReclassifyParams) -> dict[str, Any]:
        recorded = params_dict(params)
        if params.overrides:
            # What the overrides say, not where the file lies, decides the output.
            recorded["overrides"] = recorded_file(params.overrides)
        return recorded

    def run(self, inputs: list[Manifest], params: ReclassifyParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        overrides = load_overrides(params.overrides) if params.overrides else {}
        known = {r["sample_id"] for r in manifest.rows() if r["category"] == params.category}
        stray = sorted(set(overrides) - known)
        if stray:
            raise CurateError(f"{params.overrides}: no {params.category} sample with id "
                              f"{', '.join(stray[:5])} in manifest {manifest.id}")
        updates = map_updates(self, manifest, _Job(params, overrides), ctx, reclassify_sample)
        return self.output_updates(manifest, updates, params, ctx)
