"""Bundled anomaly detectors (Dinomaly, CRAS, RealNet) and the one metric suite.

Usable without curate's pipeline (nothing here imports `curate`): they read an MVTec-layout
export. `create_detector("dinomaly", backbone="dinov2_vitb14_reg", weights=PATH)` builds one;
see `detectors.base` for fit / predict / save / load and `detectors.metrics` for the metrics.
"""

from __future__ import annotations

from importlib import import_module

from .errors import DetectorConfigError

# name → "module:Class"; modules are imported on first use (torch is an optional extra).
DETECTORS = {
    "dinomaly": "detectors.dinomaly:Dinomaly",
    "cras": "detectors.cras:CRAS",
    "realnet": "detectors.realnet:RealNet",
}


def detector_class(name: str):
    if name not in DETECTORS:
        raise DetectorConfigError(
            f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    module, cls = DETECTORS[name].split(":")
    return getattr(import_module(module), cls)


def create_detector(name: str, backbone: str | None = None, weights=None, **kwargs):
    """Build detector `name` on `backbone` loaded from `weights` (a path, None = local caches,
    or "random" for tests); keyword options override the paper defaults."""
    return detector_class(name)(backbone=backbone, weights=weights, **kwargs)


def load_detector(path, weights=None, *, device=None):
    """Rebuild a detector saved with `save(path)`."""
    from .base import Detector

    return Detector.load(path, weights=weights, device=device)
