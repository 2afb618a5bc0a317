"""The detectors' user errors: mistakes in what a detector was asked to run with.

They are what ``curate bench`` shows as one sentence; any other exception out of a detector
is a bug and keeps its traceback. (The two other user errors live beside the code that
raises them: ``detectors.data.DatasetError`` for an export folder that is not the MVTec AD
layout, ``detectors.backbones.WeightsNotFoundError`` for weights that are not there.)
"""

from __future__ import annotations


class DetectorConfigError(ValueError):
    """A detector, backbone or option value that cannot be run: an unknown name, a value a
    detector refuses, a weights file of another model. The message names what was given
    and what was expected."""
