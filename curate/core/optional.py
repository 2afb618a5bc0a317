"""Optional dependencies: which extra brings each one, and one sentence when it is missing.

The base install (``pip install curate``) builds, curates and exports datasets. PyTorch and
friends (``detectors``), FiftyOne (``review``) and Ray (``ray``) are extras, imported only by
the features that use them, through :func:`require`: a missing one stops the command with
"<feature> needs <package>: pip install 'curate[<extra>]'" instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from curate.core.errors import CurateError

#: Top-level module -> (what people call it, the extra that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("PyTorch", "detectors"),
    "torchvision": ("torchvision", "detectors"),
    "transformers": ("Hugging Face Transformers", "detectors"),
    "diffusers": ("diffusers", "detectors"),
    "safetensors": ("safetensors", "detectors"),
    "tqdm": ("tqdm", "detectors"),
    "fiftyone": ("FiftyOne", "review"),
    "ray": ("Ray", "ray"),
}


class MissingExtra(CurateError):
    """A feature was asked for whose optional dependency is not installed."""


def require(module: str, what: str) -> ModuleType:
    """``import module`` for the feature ``what`` (e.g. "stage ssfilter").

    ``module`` is an optional dependency itself (``torch``) or a curate module that imports
    one (``curate.stages.ssfilter.stage``). When an optional dependency is missing, raises
    :class:`MissingExtra` naming it and its extra; any other import error is a broken install
    or a bug, and propagates unchanged.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in EXTRAS:
            raise
        package, extra = EXTRAS[missing]
        raise MissingExtra(f"{what} needs {package}: pip install 'curate[{extra}]'") from exc
