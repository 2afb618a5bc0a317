"""Stages: each reads a manifest and writes a new one (see curate.engine.runner).

:data:`STAGES` maps the names recipes use to the stage classes that take one input manifest.
"""

from __future__ import annotations

from curate.core.errors import CurateError
from curate.core.optional import require
from curate.engine.runner import Stage

#: Stage name -> "module:Class". Modules are imported when a stage is asked for: some pull in
#: optional heavy libraries (PyTorch), which a recipe that does not use them must not need.
STAGES: dict[str, str] = {
    "dedup": "curate.stages.dedup:Dedup",
    "quality": "curate.stages.quality:Quality",
    "foreground": "curate.stages.foreground.stage:Foreground",
    "labels": "curate.stages.labels:Labels",
    "label_filter": "curate.stages.label_filter:LabelFilter",
    "reclassify": "curate.stages.reclassify:Reclassify",
    "split": "curate.stages.split:Split",
    "sdas_sample": "curate.stages.sdas.stage:SdasSample",
    "sdas_blend": "curate.stages.sdas.stage:SdasBlend",
    "ssfilter": "curate.stages.ssfilter.stage:SSFilter",
}


def stage_class(name: str) -> type[Stage]:
    """The stage a recipe names; a stage whose optional libraries are missing is one
    sentence naming the extra to install."""
    try:
        module, cls = STAGES[name].split(":")
    except KeyError:
        raise CurateError(f"unknown stage {name!r}; stages a recipe can name: "
                          f"{', '.join(sorted(STAGES))}") from None
    return getattr(require(module, f"stage {name}"), cls)
