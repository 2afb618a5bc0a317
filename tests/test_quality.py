"""The quality stage on the real MTD: defaults flag no original, degraded copies are caught."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import by_path, ingest

from curate.app.cli import cli
from curate.engine.runner import Context, run_stage
from curate.engine.workspace import Workspace
from curate.stages.quality import Quality, QualityParams, robust_z
from curate.testing.planting import write_planted_mtd

pytestmark = pytest.mark.slow


def test_defaults_flag_no_real_mtd_image(tmp_path, mtd_root):
    """The defaults were chosen on this data: none of the 1,344 originals is dropped."""
    with Context(Workspace.open(tmp_path / "ws"), jobs=2, progress=False) as ctx:
        m = run_stage(Quality(), [ingest(ctx, "mtd", mtd_root)], QualityParams(), ctx).manifest
    assert m.header["counts"]["dropped"] == 0
    zs = [r["measures"]["quality.blur_z"] for r in m.rows()]
    assert min(zs) > -3.0 and abs(float(np.median(zs))) < 1e-9
    assert all(r["measures"]["quality.contrast"] >= 16 for r in m.rows())


@pytest.fixture(scope="module")
def degraded(tmp_path_factory, mtd_root):
    """60 real Free tiles; 12 of them also have blurred copies, 3 each of the other faults."""
    root = tmp_path_factory.mktemp("degraded") / "mtd"
    free = sorted(p.relative_to(mtd_root).as_posix()
                  for p in (mtd_root / "MT_Free" / "Imgs").glob("*.jpg"))[::15][:60]
    write_planted_mtd(mtd_root, root, free, [])
    planted = write_planted_mtd(mtd_root, root, free[:12], ["blur"])
    for k, kind in enumerate(("overexposed", "underexposed", "flat", "tiny")):
        planted += write_planted_mtd(mtd_root, root, free[12 + 3 * k:15 + 3 * k], [kind])
    ws = Workspace.open(root.parent / "ws")
    with Context(ws, jobs=2, progress=False) as ctx:
        m = run_stage(Quality(), [ingest(ctx, "mtd", root)], QualityParams(), ctx).manifest
    return by_path(m), free, planted


def test_blurred_copies_are_flagged_and_their_originals_are_not(degraded):
    rows, free, planted = degraded
    assert all(rows[o]["status"] == "kept" for o in free)
    for _, copy, kind in planted:
        row = rows[copy]
        assert row["status"] == "dropped", (kind, copy, row["measures"])
        codes = {r["code"] for r in row["reasons"]}
        expected = {"blur": "blurry", "overexposed": "overexposed",
                    "underexposed": "underexposed", "flat": "low_contrast",
                    "tiny": "too_small"}[kind]
        assert expected in codes, (kind, codes)
        detail = next(r["detail"] for r in row["reasons"] if r["code"] == expected)
        assert copy in detail and "limit" in detail


def test_every_value_is_recorded(degraded):
    rows, free, _ = degraded
    measures = rows[free[0]]["measures"]
    assert set(measures) == {"quality.sharpness", "quality.blur_z", "quality.dark_fraction",
                             "quality.bright_fraction", "quality.contrast"}
    blurred = next(r for p, r in rows.items() if p.endswith("__blur.jpg"))
    assert blurred["measures"]["quality.blur_z"] < -3


def test_small_categories_are_not_judged_for_blur(tmp_path, mtd_root):
    root = tmp_path / "mtd"
    free = sorted(p.relative_to(mtd_root).as_posix()
                  for p in (mtd_root / "MT_Free" / "Imgs").glob("*.jpg"))[:3]
    write_planted_mtd(mtd_root, root, free, ["blur"])
    with Context(Workspace.open(tmp_path / "ws"), jobs=1, progress=False) as ctx:
        m = run_stage(Quality(), [ingest(ctx, "mtd", root)], QualityParams(), ctx).manifest
    assert m.header["counts"]["dropped"] == 0
    assert all("quality.blur_z" not in r["measures"] for r in m.rows())


def test_robust_z():
    z = robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert z[2] == 0 and z[4] > 30
    assert robust_z(np.array([5.0, 5.0, 5.0])).tolist() == [0, 0, 0]
    tied = robust_z(np.array([1.0, 1.0, 1.0, 2.0, 9.0]))  # MAD 0: mean deviation stands in
    assert tied[0] == 0 and tied[4] > 3


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="max_clipped"):
        QualityParams(max_clipped=0)
    with pytest.raises(ValueError, match="min_category"):
        QualityParams(min_category=1)


def test_cli_dry_run_writes_nothing_and_json(tmp_path, mtd_root):
    root = tmp_path / "mtd"
    free = sorted(p.relative_to(mtd_root).as_posix()
                  for p in (mtd_root / "MT_Free" / "Imgs").glob("*.jpg"))[:10]
    write_planted_mtd(mtd_root, root, free, [])
    write_planted_mtd(mtd_root, root, free[:1], ["jpeg", "overexposed"])
    ws = tmp_path / "ws"
    runner = CliRunner()
    assert runner.invoke(cli, ["ingest", "mtd", str(root), "-w", str(ws)]).exit_code == 0
    before = sorted(p.name for p in (ws / "manifests").iterdir())
    for command in (["quality"], ["dedup", "--radius", "6"]):
        result = runner.invoke(cli, [*command, "--dry-run", "--json", "-w", str(ws)])
        assert result.exit_code == 0, result.output
        (summary,) = json.loads(result.stdout)
        assert summary["dry_run"] and sum(summary["dropped_here"].values()) >= 1
    assert sorted(p.name for p in (ws / "manifests").iterdir()) == before
    result = runner.invoke(cli, ["dedup", "-w", str(ws)])
    assert result.exit_code == 0 and "clusters of duplicates" in result.stdout
