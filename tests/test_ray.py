"""`--executor ray`: the same manifests as the local and process executors, and faults survived.

Runs on a local Ray runtime this module starts (two CPUs) and stops.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'curate[ray]')")

from helpers import ingest, labels, mtd_subset  # noqa: E402

from curate.manifest import Manifest, new_row  # noqa: E402
from curate.runner import Context, Stage, map_samples, run_stage  # noqa: E402
from curate.stages.dedup import Dedup, DedupParams  # noqa: E402
from curate.stages.label_filter import LabelFilter, LabelFilterParams  # noqa: E402
from curate.stages.quality import Quality, QualityParams  # noqa: E402
from curate.workspace import Workspace  # noqa: E402


@pytest.fixture(scope="module")
def ray_runtime():
    # Ray workers do not have tests/ on their path: ship this module's functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def pipeline(ws: Path, source: Path, executor: str) -> list[str]:
    """ingest → labels → dedup → quality → label_filter; the manifest id after each stage."""
    with Context(Workspace.open(ws), jobs=2, executor=executor, progress=False) as ctx:
        manifests = [ingest(ctx, "mtd", source)]
        manifests.append(labels(ctx, manifests[-1]))
        for stage, params in ((Dedup(), DedupParams()),
                              (Quality(), QualityParams(min_category=4)),
                              (LabelFilter(), LabelFilterParams(min_category=4))):
            manifests.append(run_stage(stage, [manifests[-1]], params, ctx).manifest)
    return [m.id for m in manifests]


def test_same_manifests_on_every_executor(ray_runtime, mtd_root, tmp_path):
    source = mtd_subset(mtd_root, tmp_path / "mtd",
                        {"MT_Free": 12, "MT_Blowhole": 4, "MT_Crack": 4, "MT_Fray": 3})
    ids = {executor: pipeline(tmp_path / executor, source, executor)
           for executor in ("local", "process", "ray")}
    assert ids["ray"] == ids["local"] == ids["process"]
    assert len(set(ids["ray"])) == len(ids["ray"])  # every stage made a new manifest


# ----------------------------------------------------------------------------- faults
@dataclass(frozen=True)
class CrashParams:
    marker: str  # the first worker to see this file missing creates it and dies
    fail_on: str = ""


def crash_once(row, env):
    if row["path"] == env.params.fail_on:
        raise ValueError("this sample is bad")
    if row["path"] == "img05.png" and not os.path.exists(env.params.marker):
        Path(env.params.marker).touch()
        os._exit(1)  # the worker process dies, as an OOM kill or a lost node does
    return {"measures": {"crash.value": float(env.rng(row).normal())}}


class CrashOnce(Stage):
    name = "crash_once"
    version = "1"
    Params = CrashParams
    uses_seed = True

    def run(self, inputs, params, ctx):
        (m,) = inputs
        return self.output(m, map_samples(self, m, params, ctx, crash_once), params, ctx)


def synthetic(n=40) -> Manifest:
    rows = [new_row(source="s", path=f"img{i:02d}.png", category="C", label="good",
                    width=4, height=4) for i in range(n)]
    return Manifest.build(rows, stage="ingest", stage_version="1", roots={"s": "/nowhere"})


def test_killed_worker_is_retried_and_a_raising_sample_dropped(ray_runtime, tmp_path):
    marker = tmp_path / "crashed"
    params = CrashParams(marker=str(marker), fail_on="img11.png")

    # Reference run, inline and without the crash (the marker already exists).
    marker.touch()
    with Context(Workspace.open(tmp_path / "clean"), executor="local", progress=False) as ctx:
        clean = run_stage(CrashOnce(), [synthetic()], params, ctx).manifest
    marker.unlink()

    with Context(Workspace.open(tmp_path / "ray"), executor="ray", progress=False) as ctx:
        survived = run_stage(CrashOnce(), [synthetic()], params, ctx).manifest
    assert marker.exists()  # a worker really died
    assert survived.id == clean.id
    dropped = [r for r in survived.rows() if r["status"] == "dropped"]
    assert [r["path"] for r in dropped] == ["img11.png"]
    assert "this sample is bad" in dropped[0]["reasons"][0]["detail"]


def test_ray_address_without_ray_executor_is_refused(tmp_path):
    from curate.errors import CurateError

    with pytest.raises(CurateError, match="--executor ray"):
        Context(Workspace.open(tmp_path / "ws"), executor="process", ray_address="auto")


def test_cli_executor_options(ray_runtime, mtd_root, tmp_path):
    from click.testing import CliRunner

    from curate.cli import cli

    source = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 3, "MT_Crack": 2})
    runner = CliRunner()
    ids = []
    for executor in ("local", "ray"):
        result = runner.invoke(cli, ["ingest", "mtd", str(source), "-w", str(tmp_path / executor),
                                     "--executor", executor, "--json"])
        assert result.exit_code == 0, result.output
        ids.append(json.loads(result.output)[0]["manifest"])
    assert ids[0] == ids[1]
    refused = runner.invoke(cli, ["ingest", "mtd", str(source), "-w", str(tmp_path / "x"),
                                  "--executor", "process", "--ray-address", "auto"])
    assert refused.exit_code == 1 and "--executor ray" in refused.output
