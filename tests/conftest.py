"""Shared test fixtures: a fresh workspace, a runner context, helpers to run stages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from curate.engine.runner import Context
from curate.engine.workspace import Workspace

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")

# CI machines are shared and small: no per-example time limit, which only measures the load.
settings.register_profile("curate", deadline=None)
# CI draws the same examples on every run (derandomized, no example database), so a red build
# is reproducible and never caused by a newly drawn example; select it with CI=1 (as CI
# services set it) or HYPOTHESIS_PROFILE=ci.
settings.register_profile("ci", deadline=None, derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                      or ("ci" if os.environ.get("CI") else "curate"))

#: The real magnetic-tile dataset, read in place (never copied into the repository).
MTD_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mtd"


@pytest.fixture(scope="session")
def mtd_root() -> Path:
    if not (MTD_ROOT / "MT_Free").is_dir():
        pytest.skip(f"the real MTD data is missing: expected it at {MTD_ROOT}")
    return MTD_ROOT


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace.open(tmp_path / "ws")


@pytest.fixture
def ctx(workspace):
    with Context(workspace, jobs=1, progress=False) as c:
        yield c
