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

The features are per-image facts (:class:`CastingFacts`, :mod:`curate.engine.facts`) of the
grey image the look converts as Pillow does: a build computes them from the decode its first
look makes anyway, so the stage itself reads no pixels, and changing the rule's thresholds or
the override file decodes nothing.

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

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
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
from curate.engine.facts import LOOK_COLUMNS, WANTS_ONLY, Extractor, Look, look
from curate.engine.runner import Context, Stage, kept_rows, params_dict, recorded_file

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


@dataclass(frozen=True)
class CastingFacts(Extractor):
    """The three features of one image of the category being split, with the parameters
    :func:`casting_features` reads (the rule's thresholds are decisions, not facts)."""

    name = "reclassify.casting"
    version = "1"
    fields = (("holes", pa.int64()), ("machined", pa.float64()), ("clutter", pa.float64()))
    hole_contrast: float
    machined_level: float
    machined_std: float
    #: Which images want the features, not how they are computed.
    category: str = field(default="Casting", metadata=WANTS_ONLY)

    def wants(self, row: dict[str, Any]) -> bool:
        return row["category"] == self.category

    def compute(self, look: Look) -> dict[str, Any]:
        return dataclasses.asdict(casting_features(look.grey, self))


def casting_facts(p: ReclassifyParams) -> CastingFacts:
    # As floats (the features compare them with float grey levels): 40 and 40.0 are one
    # parameter, and so one fact key.
    return CastingFacts(float(p.hole_contrast), float(p.machined_level), float(p.machined_std),
                        p.category)


def casting_features(grey: np.ndarray, p: CastingFacts) -> CastingFeatures:
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


def decide(sample_id: str, f: CastingFeatures, p: ReclassifyParams,
           overrides: dict[str, dict[str, str]]) -> dict[str, Any]:
    """A sample's class (by the override file, else by the rule) and the measures behind it."""
    measures: dict[str, Any] = {RECLASSIFY_HOLES: f.holes,
                                RECLASSIFY_MACHINED: f.machined,
                                RECLASSIFY_CLUTTER: f.clutter}
    override = overrides.get(sample_id)
    if override is not None:
        cls = override["class"]
        measures |= {RECLASSIFY_RULE: "override", RECLASSIFY_NOTE: override["note"]}
    else:
        cls = casting_class(f, p)
        measures[RECLASSIFY_RULE] = "features"
    return {"category": f"{p.category}_{cls}", "measures": measures}


class Reclassify(Stage[ReclassifyParams]):
    name = "reclassify"
    #: 2: the features are taken from the look's grey (Pillow's conversion of the full decode)
    #: instead of libjpeg's own grey decode; the two differ only where colour clips (a grey
    #: level or more on saturated pixels), so outputs cached under 1 are not reused.
    version = "2"
    Params = ReclassifyParams

    def facts(self, params: ReclassifyParams) -> list[Extractor]:
        return [casting_facts(params)]

    def recorded_params(self, params: ReclassifyParams) -> dict[str, Any]:
        recorded = params_dict(params)
        if params.overrides:
            # What the overrides say, not where the file lies, decides the output.
            recorded["overrides"] = recorded_file(params.overrides)
        return recorded

    def run(self, inputs: list[Manifest], params: ReclassifyParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        overrides = load_overrides(params.overrides) if params.overrides else {}
        ids, categories = manifest.column_values("sample_id"), manifest.column_values("category")
        known = {i for i, c in zip(ids, categories, strict=True) if c == params.category}
        stray = sorted(set(overrides) - known)
        if stray:
            raise CurateError(f"{params.overrides}: no {params.category} sample with id "
                              f"{', '.join(stray[:5])} in manifest {manifest.id}")
        positions, rows = kept_rows(manifest, LOOK_COLUMNS)
        features = casting_facts(params)
        looked = look(ctx, self.name, rows, manifest.roots, [features], desc="reclassify")
        split = [k for k, row in enumerate(rows) if features.wants(row) and k not in looked.failed]
        records = looked[features].take([rows[k]["sha256"] for k in split]).to_pylist()
        updates = {k: decide(rows[k]["sample_id"], CastingFeatures(
                       record["holes"], record["machined"], record["clutter"]), params, overrides)
                   for k, record in zip(split, records, strict=True)}
        updates.update(looked.failed)
        return self.output_updates(manifest, [(positions[k], updates[k]) for k in sorted(updates)],
                                   params, ctx)
