"""Stages: each reads a manifest and writes a new one (see curate.runner).

``STAGES`` maps the names recipes use to the stage classes that take one input manifest.
"""

from __future__ import annotations

from curate.errors import CurateError
from curate.runner import Stage


def stage_class(name: str) -> type[Stage]:
    """The stage a recipe names (imported lazily: some stages pull in heavy libraries)."""
    from curate.stages.dedup import Dedup
    from curate.stages.foreground import Foreground
    from curate.stages.label_filter import LabelFilter
    from curate.stages.labels import Labels
    from curate.stages.quality import Quality
    from curate.stages.reclassify import Reclassify
    from curate.stages.sdas import SdasBlend, SdasSample
    from curate.stages.split import Split
    from curate.stages.ssfilter import SSFilter

    stages = {s.name: s for s in (Dedup, Quality, Foreground, Labels, LabelFilter, Reclassify,
                                  Split, SdasSample, SdasBlend, SSFilter)}
    try:
        return stages[name]
    except KeyError:
        raise CurateError(f"unknown stage {name!r}; stages a recipe can name: "
                          f"{', '.join(sorted(stages))}") from None
