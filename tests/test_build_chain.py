"""Merge, export modes, the demo command and the JSON Schemas, on generated sources."""

from __future__ import annotations

import json

import jsonschema
import pytest
from click.testing import CliRunner
from helpers import ingest, labels

from curate.app.cli import cli
from curate.core.errors import CurateError, ManifestError
from curate.core.files import sha256_file
from curate.core.schemas import load_schema, validate_recipe
from curate.engine.runner import run_stage
from curate.export.mvtec import export_mvtec, indexed_names
from curate.stages.merge import Merge, MergeParams
from curate.testing import fixtures


@pytest.fixture
def sources(tmp_path):
    return fixtures.write_all(tmp_path / "sources", seed=3)


def test_merge_combines_sources_whatever_the_order(ctx, sources):
    a = ingest(ctx, "kolektorsdd2", sources["kolektorsdd2"])
    b = ingest(ctx, "severstal", sources["severstal"])
    ab = run_stage(Merge(), [a, b], MergeParams(), ctx).manifest
    ba = run_stage(Merge(), [b, a], MergeParams(), ctx)
    assert ba.from_cache and ba.manifest.id == ab.id
    assert len(ab) == len(a) + len(b)
    assert ab.header["parents"] == sorted([a.id, b.id])
    assert set(ab.header["sources"]) == {"kolektorsdd2", "severstal"}
    assert set(ab.header["inventory"]) == {"kolektorsdd2", "severstal"}
    assert ab.roots == {"kolektorsdd2": str(sources["kolektorsdd2"]),
                        "severstal": str(sources["severstal"])}


def test_merge_refuses_clashing_names_and_shared_samples(ctx, sources):
    a = ingest(ctx, "kolektorsdd2", sources["kolektorsdd2"], source="steel")
    b = ingest(ctx, "severstal", sources["severstal"], source="steel")
    with pytest.raises(CurateError, match="another --name"):
        run_stage(Merge(), [a, b], MergeParams(), ctx)
    with pytest.raises(CurateError, match="same manifest twice"):
        run_stage(Merge(), [a, a], MergeParams(), ctx)
    with pytest.raises(CurateError, match="share samples"):
        run_stage(Merge(), [a, labels(ctx, a)], MergeParams(), ctx)


def test_export_needs_masks_first(ctx, sources, tmp_path):
    m = ingest(ctx, "mvtec", sources["mvtec"])
    with pytest.raises(CurateError, match="run `curate labels`"):
        export_mvtec(m, tmp_path / "out", ctx)
    assert not (tmp_path / "out").exists()


def test_export_keep_copies_originals_byte_for_byte(ctx, sources, tmp_path):
    m = labels(ctx, ingest(ctx, "casting", sources["casting"]))
    report = export_mvtec(m, tmp_path / "out", ctx, images="keep")
    assert report["written"] == m.header["counts"]["kept"] and report["images"] == "keep"
    for entry in report["files"]:
        exported = tmp_path / "out" / entry["file"]
        assert exported.suffix == ".jpg"
        assert sha256_file(exported) == entry["sha256"]
    with pytest.raises(CurateError, match="images must be"):
        export_mvtec(m, tmp_path / "other", ctx, images="tiff")


def test_export_names_are_mvtec_indices():
    """Zero-padded like MVTec AD's own (000.png), wider only where a folder needs it; the
    source of each file is in curate-export.json."""
    assert indexed_names(3) == ["000", "001", "002"]
    assert indexed_names(1001)[0] == "0000" and indexed_names(1001)[-1] == "1000"


def test_demo_builds_all_seven_categories_from_generated_sources(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--no-mtd",
                                      "--json", "-j", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["problems"] == [] and out["missing"] == {}
    ingested = {s["source"] for s in out["stages"] if s["stage"] == "ingest"}
    assert ingested == {"kolektorsdd", "kolektorsdd2", "mtd", "severstal", "casting"}
    counts = out["exports"]["mvtec"]["counts"]
    assert set(counts) == {"Casting_C1", "Casting_C2", "Casting_C3", "KolektorSDD",
                           "KolektorSDD2", "Magnetic-tile-defect", "STEEL"}
    for category, splits in counts.items():
        assert splits["train"] == {"good": splits["train"]["good"]}, category  # normal only
        assert any(label != "good" for label in splits["test"]), category
    export = tmp_path / "demo" / "export"
    assert (export / "card.md").is_file() and (export / "realnet").is_dir()
    # Foreground masks beside the categories, not in them (anomalib globs a category's tree).
    assert (export / "foreground" / "Casting_C1").is_dir()
    assert not (export / "Casting_C1" / "foreground").exists()


@pytest.mark.parametrize("name", ["sample", "header", "recipe"])
def test_schemas_are_valid_draft_07(name):
    schema = load_schema(name)
    assert schema["$schema"].startswith("http://json-schema.org/draft-07/")
    jsonschema.Draft7Validator.check_schema(schema)


def test_recipe_schema_accepts_a_recipe_and_names_what_is_wrong():
    recipe = {"name": "hss-iad", "version": 1, "seed": 0,
              "sources": [{"kind": "mtd", "folder_names": ["Magnetic-tile-defect-datasets."],
                           "category": "Magnetic-tile-defect"}],
              "stages": [{"stage": "labels", "params": {"threshold": "auto"}}],
              "export": {"formats": ["mvtec"]}}
    validate_recipe(recipe, "test.yaml")
    recipe["sources"][0]["kind"] = "imagenet"
    with pytest.raises(ManifestError, match="test.yaml"):
        validate_recipe(recipe, "test.yaml")
