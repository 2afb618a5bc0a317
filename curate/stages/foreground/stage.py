"""foreground: a foreground mask per image, for anomaly synthesis to stay on the object.

Stored as artifact ``foreground`` (a 0/255 PNG of the image's size), with
``foreground.fraction`` (share of the image that is foreground) and ``foreground.confidence``
(how decided the mask is, 0..1); below ``min_confidence`` the sample is flagged
``foreground_uncertain`` for review. Two backends behind one interface:

- ``classical`` (default, no weights): by category policy. ``texture`` categories (KolektorSDD,
  KolektorSDD2, Magnetic-tile-defect, STEEL: the surface fills the frame) get the whole image,
  confidence 1. ``object`` categories (the castings) get Otsu's threshold on a smoothed grey
  image, the polarity whose foreground touches the image border least, a morphological
  closing and opening, the largest connected component, holes filled; the confidence is
  Otsu's separability (between-class over total variance), which is near 1 for a clean
  bimodal image and near 0 for a featureless one. An object's mask is a per-image fact
  (:class:`OtsuFacts`, :mod:`curate.engine.facts`): a build computes it from the decode its
  first look makes anyway, and it is kept by content, so no image is decoded for it again.
- ``isnet``: IS-Net (DIS, ``curate.stages.foreground.isnet``) with the official ``isnet-general-use.pth`` weights
  from a path the user gives; the sigmoid output is thresholded at an *absolute* 0.5 (the
  official per-image min-max would turn a blank image into a full-range map).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from curate.core.errors import CurateError
from curate.core.manifest import Manifest
from curate.core.measures import FOREGROUND_CONFIDENCE, FOREGROUND_FRACTION
from curate.core.optional import require
from curate.engine.facts import LOOK_COLUMNS, WANTS_ONLY, Extractor, Look, look
from curate.engine.runner import (
    Context,
    SampleEnv,
    Stage,
    kept_rows,
    map_updates,
    params_dict,
    recorded_file,
)
from curate.imaging.io import decode

TEXTURE, OBJECT = "texture", "object"
#: HSS-IAD's categories: castings are objects on a background, the rest are surfaces.
HSS_IAD_POLICY = {"Casting": OBJECT, "Casting_C1": OBJECT, "Casting_C2": OBJECT,
                  "Casting_C3": OBJECT, "KolektorSDD": TEXTURE, "KolektorSDD2": TEXTURE,
                  "Magnetic-tile-defect": TEXTURE, "STEEL": TEXTURE}


@dataclass(frozen=True)
class ForegroundParams:
    backend: str = "classical"
    #: category -> "texture" or "object" (classical backend); others get ``default_policy``.
    policy: dict[str, str] = field(default_factory=lambda: dict(HSS_IAD_POLICY))
    default_policy: str = TEXTURE
    min_confidence: float = 0.5
    #: isnet backend: the weights file, the square input size, the device.
    weights: str = ""
    size: int = 1024
    device: str = "cpu"

    def __post_init__(self):
        if self.backend not in ("classical", "isnet"):
            raise ValueError(f"backend must be 'classical' or 'isnet', got {self.backend!r}")
        bad = {k: v for k, v in self.policy.items() if v not in (TEXTURE, OBJECT)}
        if bad or self.default_policy not in (TEXTURE, OBJECT):
            raise ValueError(f"policies must be 'texture' or 'object', got {bad or self.default_policy}")
        if self.backend == "isnet" and not self.weights:
            raise ValueError("the isnet backend needs weights: the path of isnet-general-use.pth")


def otsu_foreground(grey: np.ndarray) -> tuple[np.ndarray, float]:
    """Object mask by Otsu's threshold, and Otsu's separability as its confidence."""
    smooth = cv2.GaussianBlur(grey, (0, 0), max(1.0, min(grey.shape) / 200))
    threshold, binary = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    total_var = float(smooth.var())
    if total_var == 0:
        return np.ones(grey.shape, bool), 0.0
    above = smooth > threshold
    w1 = above.mean()
    between = w1 * (1 - w1) * (float(smooth[above].mean()) - float(smooth[~above].mean())) ** 2 \
        if 0 < w1 < 1 else 0.0
    separability = between / total_var
    # The object is the side that touches the image border least.
    border = np.concatenate([above[0], above[-1], above[:, 0], above[:, -1]])
    side = above if border.mean() <= 0.5 else ~above
    k = max(3, (min(grey.shape) // 100) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    closed = cv2.morphologyEx(side.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    opened = cv2.morphologyEx(closed, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if count <= 1:
        return np.zeros(grey.shape, bool), 0.0
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    component = (labels == largest).astype(np.uint8)
    # Fill holes: everything not reachable from the border through background.
    flood = np.pad(1 - component, 1, constant_values=1)
    cv2.floodFill(flood, None, (0, 0), 2)
    fg = (flood[1:-1, 1:-1] != 2)
    return fg, float(separability)


@cache
def _isnet(weights: str, device: str):
    from curate.stages.foreground import isnet  # torch is imported only for this backend

    return isnet.load_isnet(weights).to(device)


@dataclass(frozen=True)
class OtsuFacts(Extractor):
    """The classical backend's mask of one object image (:func:`otsu_foreground`), in the
    store, with its foreground fraction and confidence. Only images of the policy's object
    categories want it: textures get the whole frame without being looked at."""

    name = "foreground.otsu"
    version = "1"
    fields = (("mask", pa.string()), ("fraction", pa.float64()), ("confidence", pa.float64()))
    #: The policy (sorted (category, policy) pairs) and the default: which images want a mask,
    #: not how it is computed, so a mask found under one policy serves another.
    policy: tuple[tuple[str, str], ...] = field(default=(), metadata=WANTS_ONLY)
    default_policy: str = field(default=TEXTURE, metadata=WANTS_ONLY)

    @cached_property
    def _policy(self) -> dict[str, str]:
        return dict(self.policy)

    def wants(self, row: dict[str, Any]) -> bool:
        return self._policy.get(row["category"], self.default_policy) == OBJECT

    def compute(self, look: Look) -> dict[str, Any]:
        pixels = look.pixels
        # OpenCV's conversion, as this backend has always made it, not the look's Pillow grey:
        # the two differ by a grey level here and there, enough to move Otsu's threshold.
        grey = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels[..., :3],
                                                            cv2.COLOR_RGB2GRAY)
        mask, confidence = otsu_foreground(grey)
        return {"mask": look.store.put_mask(mask), "fraction": float(mask.mean()),
                "confidence": confidence}


def otsu_facts(params: ForegroundParams) -> OtsuFacts:
    return OtsuFacts(tuple(sorted(params.policy.items())), params.default_policy)


def mask_update(path: str, p: ForegroundParams, key: str, fraction: float,
                confidence: float) -> dict[str, Any]:
    """A sample's foreground artifact and measures, flagged when the mask is uncertain."""
    update: dict[str, Any] = {
        "artifacts": {"foreground": key},
        "measures": {FOREGROUND_FRACTION: fraction, FOREGROUND_CONFIDENCE: confidence},
    }
    if confidence < p.min_confidence:
        update["flags"] = [("foreground_uncertain",
                            f"{path}: {p.backend} foreground confidence {confidence:.2f} "
                            f"(limit {p.min_confidence:g})")]
    return update


def isnet_sample(row: dict[str, Any], env: SampleEnv) -> dict[str, Any]:
    """The isnet backend's mask of one image (every category: the model needs no policy)."""
    from curate.stages.foreground import isnet

    p: ForegroundParams = env.params
    pixels = decode(env.read_source(row))
    prob = isnet.foreground_probability(_isnet(p.weights, p.device), pixels, size=p.size,
                                        device=p.device)
    mask = prob > 0.5
    return mask_update(row["path"], p, env.store.put_mask(mask), float(mask.mean()),
                       isnet.confidence(prob))


class Foreground(Stage[ForegroundParams]):
    name = "foreground"
    version = "1"
    Params = ForegroundParams

    def facts(self, params: ForegroundParams) -> list[Extractor]:
        # IS-Net needs its model, loaded where the stage runs: it decodes for itself.
        return [otsu_facts(params)] if params.backend == "classical" else []

    def run(self, inputs: list[Manifest], params: ForegroundParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        if params.backend == "isnet":
            # Before any work: in a worker it would drop every sample.
            require("curate.stages.foreground.isnet", "the isnet foreground backend")
            updates = map_updates(self, manifest, params, ctx, isnet_sample)
            return self.output_updates(manifest, updates, params, ctx)
        positions, rows = kept_rows(manifest, (*LOOK_COLUMNS, "height", "width"))
        otsu = otsu_facts(params)
        looked = look(ctx, self.name, rows, manifest.roots, [otsu], desc="foreground")
        objects = [k for k, row in enumerate(rows) if otsu.wants(row) and k not in looked.failed]
        masks = dict(zip(objects, looked[otsu].take([rows[k]["sha256"] for k in objects])
                         .to_pylist(), strict=True))
        frames: dict[tuple[int, int], str] = {}  # one all-foreground mask per size
        result = []
        for k, row in enumerate(rows):
            if k in looked.failed:
                update = looked.failed[k]
            elif k in masks:
                fact = masks[k]
                update = mask_update(row["path"], params, fact["mask"], fact["fraction"],
                                     fact["confidence"])
            else:
                # A surface fills the frame: the mask is the whole image, no need to decode it.
                size = (row["height"], row["width"])
                if size not in frames:
                    frames[size] = ctx.workspace.store.put_mask(np.ones(size, bool))
                update = mask_update(row["path"], params, frames[size], 1.0, 1.0)
            result.append((positions[k], update))
        return self.output_updates(manifest, result, params, ctx)

    def recorded_params(self, params: ForegroundParams) -> dict[str, Any]:
        recorded = params_dict(params)
        if params.backend == "isnet":
            # Fail once, before any work; and record what the weights are, not where they lie,
            # so the manifest id does not depend on the folder a user keeps them in.
            if not Path(params.weights).is_file():
                raise CurateError(f"IS-Net weights not found at {params.weights}: download "
                                  "isnet-general-use.pth (DIS repository release) and pass its "
                                  "path")
            recorded["weights"] = recorded_file(params.weights)
        return recorded
