"""`curate build`: recipes, source discovery, the HSS-IAD build end to end, resumption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from curate.app.build import build, export_all
from curate.app.cli import cli
from curate.app.recipe import builtin_recipes, load_recipe
from curate.core.errors import CurateError
from curate.core.files import walk_files
from curate.engine.runner import Context
from curate.engine.workspace import Workspace
from curate.sources import CATALOG, READERS
from curate.sources.discover import discover
from curate.testing import fixtures

KINDS = ["kolektorsdd", "kolektorsdd2", "casting", "mtd", "severstal"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return fixtures.write_all(tmp_path_factory.mktemp("downloads") / "sources", seed=0)


def invoke(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


# ------------------------------------------------------------------------- recipe
def test_the_hss_iad_recipe_is_valid_and_complete():
    recipe = load_recipe("hss-iad")
    assert "hss-iad" in builtin_recipes()
    assert [s.kind for s in recipe.sources] == KINDS
    assert [s.stage for s in recipe.stages] == ["dedup", "quality", "foreground", "labels",
                                                "label_filter", "reclassify", "split"]
    assert recipe.exports == ["mvtec", "realnet", "realiad"]


def test_recipe_mistakes_are_named(tmp_path):
    doc = yaml.safe_load((Path(__file__).parents[1] / "manifests" / "hss-iad.yaml").read_text())
    doc["stages"][1]["params"]["blurr_z"] = -3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(CurateError, match=r"bad.yaml: stages\[1\].*blurr_z"):
        load_recipe(str(bad))
    doc["stages"][1] = {"stage": "sharpen"}
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(CurateError, match="unknown stage 'sharpen'"):
        load_recipe(str(bad))
    bad.write_text("name: x\nversion: 1\nsources: []\nstages: []\n")
    with pytest.raises(CurateError, match="bad.yaml"):
        load_recipe(str(bad))
    with pytest.raises(CurateError, match="no recipe 'mvtec-2019'"):
        load_recipe("mvtec-2019")


# ------------------------------------------------------------------------- discovery
def test_each_reader_declares_its_source_in_one_place(sources):
    """Kind, catalog entry and layout check live on the reader; the catalog is read from it."""
    assert list(CATALOG) == list(READERS)
    for kind, reader in READERS.items():
        assert reader.kind == kind and reader.info.kind == kind and CATALOG[kind] is reader.info
        assert reader.info.folder_names and reader.info.title
        assert reader.looks_like(sources[kind]), f"{kind} does not recognise its own layout"
        others = [k for k in READERS if k != kind and READERS[k].looks_like(sources[kind])]
        # Only casting's check is loose (any images beside annotation files).
        assert set(others) <= {"casting"}, f"{kind}'s fixture also looks like {others}"


def test_sources_are_found_by_name_by_layout_or_explicitly(tmp_path, sources):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "kolektorsdd").symlink_to(sources["kolektorsdd"])        # name, other case
    (folder / "my-steel-copy").symlink_to(sources["severstal"])        # layout only
    (folder / "tiles").symlink_to(sources["mtd"])                      # layout only
    found, missing = discover(folder, KINDS, {}, {"casting": sources["casting"]})
    assert found == {"kolektorsdd": folder / "kolektorsdd", "severstal": folder / "my-steel-copy",
                     "mtd": folder / "tiles", "casting": sources["casting"]}
    assert set(missing) == {"kolektorsdd2"}
    assert "KolektorSDD2" in missing["kolektorsdd2"] and "--source" in missing["kolektorsdd2"]


def test_a_build_without_any_source_stops_with_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("build", "hss-iad", "--sources", tmp_path / "empty", "-w", tmp_path / "ws",
                    code=1)
    assert "none of the sources of recipe hss-iad was found" in result.stderr


# ------------------------------------------------------------------------- builds
@pytest.mark.slow
def test_build_on_the_real_mtd_alone(tmp_path, mtd_root):
    out = tmp_path / "hss-iad"
    result = invoke("build", "hss-iad", "--source", f"mtd={mtd_root}", "-w", tmp_path / "ws",
                    "--out", out, "--json", "-j", "2")
    report = json.loads(result.stdout)
    assert set(report["missing"]) == {"kolektorsdd", "kolektorsdd2", "casting", "severstal"}
    final = {s["stage"]: s for s in report["stages"]}
    assert final["label_filter"]["dropped_here"] == {"defect_without_mask": 4,
                                                     "mask_too_small": 2, "mask_vanishes": 1}
    assert final["label_filter"]["flagged_here"]["mask_oversize"] == 18
    assert list(report["exports"]["mvtec"]["counts"]) == ["Magnetic-tile-defect"]
    # Every one of the 1,344 files is accounted for: a kept or dropped row, its mask, or the
    # inventory.
    ws = Workspace.open(tmp_path / "ws", create=False)
    m = ws.load(report["manifest"])
    inventory = m.header["inventory"]["mtd"]
    rows = m.row_list()
    assert len(rows) == 1344
    seen = {r["path"] for r in rows} | {r["annotation"]["mask"] for r in rows} | \
        {e["path"] for e in inventory["ignored"] + inventory["unpaired"]}
    assert seen == set(walk_files(mtd_root))
    exported = json.loads((out / "curate-export.json").read_text())
    assert exported["written"] == sum(r["status"] == "kept" for r in rows)
    splits = exported["counts"]["Magnetic-tile-defect"]
    assert set(splits["train"]) == {"good"} and splits["test"]["good"] > 0
    assert (out / "card.md").is_file() and (out / "realiad" /
                                            "Magnetic-tile-defect.json").is_file()


def test_changing_a_late_stage_reruns_only_from_there(tmp_path, sources):
    ws = Workspace.open(tmp_path / "ws")
    recipe = load_recipe("hss-iad")
    with Context(ws, jobs=1, progress=False) as ctx:
        first = build(recipe, ctx, sources["mtd"].parent)
        again = build(recipe, ctx, sources["mtd"].parent)
    assert all(s.from_cache for s in again.stages)
    assert again.manifest.id == first.manifest.id
    doc = yaml.safe_load((Path(__file__).parents[1] / "manifests" / "hss-iad.yaml").read_text())
    doc["stages"][-1]["params"]["test_fraction"] = 0.5
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(doc))
    with Context(ws, jobs=1, progress=False) as ctx:
        third = build(load_recipe(str(changed)), ctx, sources["mtd"].parent)
        export_all(third, load_recipe(str(changed)), ctx, tmp_path / "out", card=False)
    assert [s.from_cache for s in third.stages] == [True] * (len(third.stages) - 1) + [False]
    assert third.manifest.id != first.manifest.id
    assert (tmp_path / "out" / "realnet").is_dir()


def _manifest_count(ws: Path) -> int:
    return len(list((ws / "manifests").glob("*.parquet"))) if (ws / "manifests").is_dir() else 0


@pytest.mark.slow
def test_a_killed_build_resumes_to_the_same_manifest(tmp_path, sources, mtd_root):
    """kill -9 in the middle of a build; the rerun ends where an uninterrupted run ends."""
    args = ["build", "hss-iad", "--sources", str(sources["mtd"].parent), "--source",
            f"mtd={mtd_root}", "--no-card", "-j", "1", "--json"]
    clean = json.loads(invoke(*args, "-w", tmp_path / "clean", "--out",
                              tmp_path / "clean-out").stdout)
    ws = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "curate.app.cli", *args, "-w", str(ws), "--out",
                             str(tmp_path / "killed-out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    # Five ingests and a merge done, dedup under way: kill it there.
    while _manifest_count(ws) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (tmp_path / "killed-out").exists()
    resumed = json.loads(invoke(*args, "-w", ws, "--out", tmp_path / "killed-out").stdout)
    assert resumed["manifest"] == clean["manifest"]
    cached = [s["from_cache"] for s in resumed["stages"]]
    assert cached[:6] == [True] * 6 and not all(cached)
