"""The dataset card: counts, plots, aspect ratios, determinism, CLI, bad input."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ingest, labels, mtd_subset
from PIL import Image

from curate.app.cli import cli
from curate.core.errors import CurateError
from curate.core.manifest import KEPT, Manifest, drop
from curate.engine.runner import Context, run_stage
from curate.engine.workspace import Workspace
from curate.export.card import (
    AREA_FIGURE,
    ASPECT_FIGURE,
    COUNTS_FIGURE,
    FIGURES_DIR,
    region_aspect_ratios,
    write_card,
)
from curate.export.mvtec import export_mvtec
from curate.stages.merge import Merge, MergeParams
from curate.testing import fixtures

KINDS = ("kolektorsdd", "mtd", "severstal", "mvtec")


@dataclass
class Built:
    workspace: Workspace
    unlabelled: Manifest  # merged sources, no masks yet
    manifest: Manifest  # labelled, split as the sources split it
    export: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """Generated sources -> ingest -> merge -> labels -> source splits -> MVTec export."""
    root = tmp_path_factory.mktemp("card")
    sources = fixtures.write_all(root / "sources", seed=0)
    workspace = Workspace.open(root / "ws")
    with Context(workspace, jobs=1, progress=False) as ctx:
        merged = run_stage(Merge(), [ingest(ctx, kind, sources[kind]) for kind in KINDS],
                           MergeParams(), ctx).manifest
        labelled = labels(ctx, merged)
        # The sources' own train/test split, so that the card has train samples to count.
        rows = [r | {"split": r["source_split"] if r["source_split"] in ("train", "test")
                     else None} for r in labelled.rows()]
        split = labelled.derive(rows, stage="source_split", stage_version="1")
        workspace.save(split)
        export_mvtec(split, root / "export", ctx)
    return Built(workspace, merged, split, root / "export")


def section(card: str, title: str) -> str:
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for each body row of the Markdown tables in ``text``."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_counts_table_has_a_row_per_category_matching_the_manifest(built, tmp_path):
    card = write_card(built.manifest, built.export, built.workspace.store, tmp_path).read_text()
    expected: dict[str, Counter] = {}
    for row in built.manifest.rows():
        counts = expected.setdefault(row["category"], Counter())
        if row["status"] == KEPT:
            # As the export files them: an anomalous image is a test image whatever its split.
            if row["label"] == "good":
                counts[(row["split"] or "test", "normal")] += 1
            else:
                counts[("test", "anomalous")] += 1
    rows = table_rows(section(card, "Images per category"))
    assert set(rows) == set(expected) | {"category", "**all**"}
    for category, counts in expected.items():
        numbers = [int(v) for v in rows[category][:5]]
        assert numbers == [counts[("train", "normal")], counts[("train", "anomalous")],
                           counts[("test", "normal")], counts[("test", "anomalous")],
                           counts.total()], category
    assert sum(int(rows[c][0]) for c in expected) > 0  # the train columns are exercised
    # Anomalous images the sources filed under train (Severstal's train set) count as test.
    assert any(r["status"] == KEPT and r["label"] != "good" and r["split"] == "train"
               for r in built.manifest.rows())
    assert all(int(rows[c][1]) == 0 for c in expected)
    assert int(rows["**all**"][4]) == built.manifest.header["counts"]["kept"]


def test_figures_are_written_as_readable_pngs(built, tmp_path):
    card = write_card(built.manifest, built.export, built.workspace.store, tmp_path).read_text()
    for name in (COUNTS_FIGURE, AREA_FIGURE, ASPECT_FIGURE):
        assert f"]({FIGURES_DIR}/{name})" in card
        with Image.open(tmp_path / FIGURES_DIR / name) as image:
            assert image.format == "PNG"
            image.load()  # decodes every pixel: a truncated file fails here
            assert image.width >= 600 and image.height >= 400


def test_card_defaults_to_the_export_folder_and_is_byte_identical_when_rewritten(built):
    first = write_card(built.manifest, built.export, built.workspace.store)
    assert first == built.export / "card.md"
    files = sorted([first, *(built.export / FIGURES_DIR).glob("*.png")])
    before = {f: f.read_bytes() for f in files}
    write_card(built.manifest, built.export, built.workspace.store)
    assert {f: f.read_bytes() for f in files} == before


def test_aspect_ratio_of_two_known_rectangles():
    mask = np.zeros((40, 60), bool)
    mask[2:6, 3:13] = True  # 10 wide, 4 tall
    mask[20:38, 40:46] = True  # 6 wide, 18 tall
    assert region_aspect_ratios(mask) == pytest.approx([2.5, 3.0])


def test_aspect_ratio_of_thin_tilted_and_empty_regions():
    line = np.zeros((10, 10), bool)
    line[4, 1:8] = True  # a one-pixel scratch, 7 long
    assert region_aspect_ratios(line) == pytest.approx([7.0])
    diagonal = np.eye(12, dtype=bool)  # 8-connected: one region, tilted 45 degrees
    (ratio,) = region_aspect_ratios(diagonal)
    assert ratio > 5  # a box around it upright would say 1
    assert region_aspect_ratios(np.zeros((5, 5), bool)) == []


def test_samples_without_defects_or_masks_say_none(built, tmp_path):
    store = built.workspace.store
    goods = [r for r in built.manifest.rows() if r["label"] == "good"]
    no_defects = built.manifest.derive(goods, stage="goods_only", stage_version="1")
    card = write_card(no_defects, built.export, store, tmp_path / "goods").read_text()
    assert section(card, "Defect area").strip().endswith("none: no kept defective samples.")
    assert section(card, "Defect aspect ratios").strip().endswith(
        "none: no kept defective samples.")
    assert not (tmp_path / "goods" / FIGURES_DIR / AREA_FIGURE).exists()

    card = write_card(built.unlabelled, built.export, store, tmp_path / "unlabelled").read_text()
    assert "none: no defect regions in the masks." in card
    assert not (tmp_path / "unlabelled" / FIGURES_DIR / ASPECT_FIGURE).exists()


def test_emptied_category_and_curation_notes(built, tmp_path):
    rows = built.manifest.row_list()
    emptied = rows[0]["category"]
    for row in rows:
        if row["category"] == emptied:
            drop(row, "review", "rejected", f"{row['path']}: rejected in review")
    manifest = built.manifest.derive(rows, stage="review", stage_version="1")
    card = write_card(manifest, built.export, built.workspace.store, tmp_path).read_text()
    assert table_rows(section(card, "Images per category"))[emptied][:5] == ["0"] * 5
    curation = table_rows(section(card, "Curation"))
    assert curation["dropped"][:3] == ["review", "`rejected`",
                                       str(sum(r["category"] == emptied for r in rows))]
    assert "**Warning:** the export was written from manifest" in card


def test_sources_section_names_licence_and_citation(built, tmp_path):
    card = write_card(built.manifest, built.export, built.workspace.store, tmp_path).read_text()
    sources = table_rows(section(card, "Sources"))
    assert set(sources) == {"source", *KINDS}
    assert sources["kolektorsdd"][3] == "CC BY-NC-SA 4.0"
    assert "Tabernik" in sources["kolektorsdd"][4]


def test_card_from_a_report_in_hand_matches_the_card_read_from_disk(built, tmp_path):
    """A build hands the card the export report it has just written: the same card, without
    reading ``curate-export.json`` (here the card's folder holds none)."""
    marker = built.export / "curate-export.json"
    report = json.loads(marker.read_text())
    # Two exports with the card beside each (the card links its export by relative path).
    for name in ("disk", "hand"):
        (tmp_path / name / "export").mkdir(parents=True)
    (tmp_path / "disk" / "export" / marker.name).write_bytes(marker.read_bytes())
    from_disk = write_card(built.manifest, tmp_path / "disk" / "export", built.workspace.store,
                           tmp_path / "disk" / "card").read_text()
    in_hand = write_card(built.manifest, tmp_path / "hand" / "export", built.workspace.store,
                         tmp_path / "hand" / "card", report=report).read_text()
    assert in_hand == from_disk
    with pytest.raises(CurateError, match="curate-export.json"):
        write_card(built.manifest, tmp_path / "hand" / "export", built.workspace.store)


def test_missing_export_report_is_a_curate_error(built, tmp_path):
    with pytest.raises(CurateError, match="curate-export.json"):
        write_card(built.manifest, tmp_path, built.workspace.store)


def test_cli_writes_the_card_and_prints_its_path(built, tmp_path):
    args = ["card", "--export", str(built.export), "--out", str(tmp_path / "out"),
            "-w", str(built.workspace.root)]
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert Path(printed["card"]) == tmp_path / "out" / "card.md"
    assert printed["manifest"] == built.manifest.id
    assert Path(printed["card"]).is_file()

    result = CliRunner().invoke(cli, [*args[:2], str(tmp_path), *args[3:]])
    assert result.exit_code == 1
    assert "curate-export.json" in result.output


# ------------------------------------------------------------ title, missing sources, the paper
def test_title_names_the_recipe_and_the_sources_not_the_manifest_id(built, tmp_path):
    card = write_card(built.manifest, built.export, built.workspace.store, tmp_path,
                      recipe="hss-iad").read_text()
    title = card.splitlines()[0]
    assert title == ("# Dataset card: hss-iad, built from KolektorSDD, Magnetic-tile defect "
                     "(MTD), MVTec-AD layout, Severstal: Steel Defect Detection (STEEL)")
    assert table_rows(section(card, "Provenance"))["recipe"] == ["`hss-iad`"]
    assert built.manifest.id in section(card, "Provenance")
    bare = write_card(built.manifest, built.export, built.workspace.store, tmp_path).read_text()
    assert bare.splitlines()[0] == title.replace("hss-iad, built from ", "")
    assert "Incomplete" not in bare


def test_missing_sources_are_listed_above_everything_with_why(built, tmp_path):
    missing = {"casting": "no folder named casting under /downloads",
               "kolektorsdd2": "no folder named KolektorSDD2 under /downloads"}
    card = write_card(built.manifest, built.export, built.workspace.store, tmp_path,
                      recipe="hss-iad", missing=missing).read_text()
    top = card.split("## Provenance")[0]
    assert "**Incomplete:** 2 of the sources of recipe `hss-iad` were missing" in top
    assert "> - Casting surface defects (`casting`): no folder named casting under /downloads" \
        in top
    assert "> - KolektorSDD2 (`kolektorsdd2`): no folder named KolektorSDD2" in top


def test_card_command_with_recipe_lists_the_recipes_sources_the_manifest_lacks(built, tmp_path):
    result = CliRunner().invoke(cli, ["card", "--export", str(built.export), "--out",
                                      str(tmp_path), "--recipe", "hss-iad",
                                      "-w", str(built.workspace.root)])
    assert result.exit_code == 0, result.output
    top = (tmp_path / "card.md").read_text().split("## Provenance")[0]
    assert top.startswith("# Dataset card: hss-iad, built from")
    # hss-iad reads five sources; this manifest has three of them (and an MVTec folder).
    assert "(`casting`): not among the sources of manifest" in top
    assert "(`kolektorsdd2`): not among the sources of manifest" in top
    assert "(`mtd`)" not in top and "(`severstal`)" not in top


def test_paper_ratio_is_not_compared_with_a_dataset_of_other_sources(built, tmp_path):
    card = write_card(built.manifest, built.export, built.workspace.store, tmp_path).read_text()
    area = section(card, "Defect area")
    assert "Anomalous-pixel ratio over all categories" in area
    assert "3.0% for its whole dataset (Table I" in area
    assert "so its figure is not comparable with the paper's" in area
    assert "the same sources as this dataset" not in area


def test_build_of_mtd_alone_names_the_missing_sources_and_does_not_compare(mtd_root, tmp_path):
    """The card of the README (the real MTD built alone): four sources missing, and one
    category's ratio not set against the paper's whole-dataset figure."""
    subset = mtd_subset(mtd_root, tmp_path / "mtd",
                        {"MT_Free": 4, "MT_Blowhole": 2, "MT_Crack": 2})
    result = CliRunner().invoke(cli, ["build", "hss-iad", "--source", f"mtd={subset}",
                                      "--out", str(tmp_path / "out"),
                                      "-w", str(tmp_path / "ws"), "-j", "1"])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "card.md").read_text()
    top = card.split("## Provenance")[0]
    assert top.startswith("# Dataset card: hss-iad, built from Magnetic-tile defect (MTD)\n")
    assert "**Incomplete:** 4 of the sources of recipe `hss-iad` were missing" in top
    for kind in ("casting", "kolektorsdd", "kolektorsdd2", "severstal"):
        assert f"(`{kind}`): " in top, kind
    area = section(card, "Defect area")
    assert "built from Magnetic-tile defect (MTD) only, so its figure is not comparable" in area
