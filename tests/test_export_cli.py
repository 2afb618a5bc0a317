"""`curate export mvtec|realnet|realiad|fiftyone` on any manifest version, and `curate demo`
from anywhere (issue 17 items 7 and 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ingest, labels, mtd_subset, tree_digest

from curate.app.cli import cli
from curate.app.cli.review import review_push
from curate.app.demo import checkout_mtd, choose_mtd
from curate.core.manifest import KEPT, drop
from curate.engine.runner import Context
from curate.engine.workspace import Workspace
from curate.export.mvtec import MARKER

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def reviewed(mtd_root, tmp_path_factory):
    """A workspace on a small real-MTD subset: labelled, then changed as a review pull changes
    it (one defective sample dropped, the good ones put in train), so that the latest manifest
    is not what any build exported."""
    root = tmp_path_factory.mktemp("export-cli")
    subset = mtd_subset(mtd_root, root / "mtd", {"MT_Free": 3, "MT_Blowhole": 2, "MT_Crack": 2})
    workspace = Workspace.open(root / "ws")
    with Context(workspace, jobs=1, progress=False) as ctx:
        labelled = labels(ctx, ingest(ctx, "mtd", subset))
    rows = list(labelled.rows())
    defective = sorted(r["path"] for r in rows if r["label"] != "good")
    for r in rows:
        r["split"] = "train" if r["label"] == "good" else "test"
        if r["path"] == defective[0]:
            drop(r, "review", "reviewer_drop", "dropped by a reviewer")
    changed = labelled.derive(rows, stage="review", stage_version="1")
    workspace.save(changed)
    return root, labelled, changed, defective[0]


@pytest.mark.parametrize("fmt", ["realnet", "realiad"])
def test_list_export_of_a_reviewed_manifest_writes_the_tree_and_lists_that_load(reviewed, fmt):
    root, _, changed, dropped = reviewed
    out = root / f"out-{fmt}"
    result = run("export", fmt, "--out", out, "-w", root / "ws", "-j", "1", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["manifest"] == changed.id and shown[fmt]
    report = json.loads((out / MARKER).read_text())
    assert report["manifest"] == changed.id
    kept = sum(r["status"] == KEPT for r in changed.rows())
    assert report["written"] == kept
    # Every path a list names is a file of the tree written with it; the dropped sample's
    # image is in none of them.
    named = []
    for path in map(Path, shown[fmt]):
        assert path.parent == out / fmt and path.is_file()
        if fmt == "realnet":
            for line in path.read_text().splitlines():
                sample = json.loads(line)
                named += [sample["filename"], *filter(None, [sample.get("maskname")])]
        else:
            doc = json.loads(path.read_text())
            for split in ("train", "test"):
                for sample in doc[split]:
                    named += [f"{doc['meta']['prefix']}/{sample['image_path']}",
                              *([f"{doc['meta']['prefix']}/{sample['mask_path']}"]
                                if sample["mask_path"] else [])]
    assert named and all((out / rel).is_file() for rel in named)
    assert any("ground_truth" in rel for rel in named)
    exported = {f["path"] for f in report["files"]}
    assert len(exported) == kept and dropped not in exported


def test_export_mvtec_takes_an_earlier_manifest_version(reviewed):
    root, labelled, changed, _ = reviewed
    out = root / "out-earlier"
    result = run("export", "mvtec", labelled.id[:12], "--out", out, "-w", root / "ws",
                 "-j", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / MARKER).read_text())
    assert report["manifest"] == labelled.id != changed.id
    assert report["written"] == sum(r["status"] == KEPT for r in labelled.rows())


def test_list_export_refuses_an_existing_export_without_overwrite_and_changes_nothing(reviewed):
    root, labelled, changed, _ = reviewed
    out = root / "out-twice"
    assert run("export", "realnet", labelled.id, "--out", out, "-w", root / "ws",
               "-j", "1").exit_code == 0
    before = tree_digest(out)
    refused = run("export", "realnet", "--out", out, "-w", root / "ws", "-j", "1")
    assert refused.exit_code == 1
    assert "--overwrite" in one_line_error(refused)
    assert tree_digest(out) == before
    replaced = run("export", "realnet", "--out", out, "--overwrite", "-w", root / "ws",
                   "-j", "1")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / MARKER).read_text())["manifest"] == changed.id


def test_list_export_never_writes_into_a_folder_it_did_not_write(reviewed, tmp_path):
    root, *_ = reviewed
    (tmp_path / "notes.txt").write_text("mine")
    refused = run("export", "realiad", "--out", tmp_path, "--overwrite", "-w", root / "ws")
    assert refused.exit_code == 1
    assert "not an earlier curate export" in one_line_error(refused)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_list_export_failures_are_one_line(reviewed, tmp_path):
    root, *_ = reviewed
    unknown = run("export", "realnet", "feedfeedfeed", "--out", tmp_path / "x", "-w",
                  root / "ws")
    assert unknown.exit_code == 1 and "feedfeedfeed" in one_line_error(unknown)
    no_workspace = run("export", "realiad", "--out", tmp_path / "y", "-w", tmp_path / "none")
    assert no_workspace.exit_code == 1
    one_line_error(no_workspace)
    no_out = run("export", "realnet", "-w", root / "ws")
    assert no_out.exit_code == 2 and "--out" in one_line_error(no_out)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_export_fiftyone_is_review_push():
    assert cli.commands["export"].commands["fiftyone"] is review_push
    assert "fiftyone" in run("export", "--help").output


# ----------------------------------------------------------------------------- demo (item 9)
def test_help_texts_name_no_development_path():
    for args in (["--help"], ["demo", "--help"], ["ingest", "--help"], ["export", "--help"]):
        result = run(*args)
        assert result.exit_code == 0 and "shared" not in result.output, args


def test_demo_from_another_folder_uses_the_generated_mtd_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("demo", "--out", "demo", "-j", "1")
    assert result.exit_code == 0, result.output
    assert "MTD: the generated sample (pass --mtd PATH" in result.stdout
    assert "verify: OK" in result.stdout
    # The generated MTD is the one built (and the card says the dataset is complete).
    ingested = json.loads((tmp_path / "demo" / "export" / MARKER).read_text())
    assert ingested["written"] > 0
    card = (tmp_path / "demo" / "export" / "card.md").read_text()
    assert card.startswith("# Dataset card: hss-iad, built from") and "Incomplete" not in card
    # All five of the paper's sources: its whole-dataset ratio is the one to compare with.
    assert "the same sources as this dataset" in card


def test_demo_with_mtd_path_builds_from_that_mtd(mtd_root, tmp_path, monkeypatch):
    subset = mtd_subset(mtd_root, tmp_path / "real-mtd",
                        {"MT_Free": 4, "MT_Blowhole": 2, "MT_Crack": 2})
    monkeypatch.chdir(tmp_path)
    result = run("demo", "--out", "demo", "--mtd", subset, "-j", "1", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["mtd"] == f"MTD: the real one at {subset} (--mtd)"
    assert Path(shown["sources"]["mtd"]) == subset
    real = {p.relative_to(subset).as_posix() for p in subset.rglob("*.jpg")}
    report = json.loads((tmp_path / "demo" / "export" / MARKER).read_text())
    exported = {f["path"] for f in report["files"] if f["source"] == "mtd"}
    assert exported and exported <= real


def test_demo_with_a_missing_mtd_path_is_bad_usage(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--mtd", tmp_path / "nowhere")
    assert result.exit_code == 2 and "--mtd" in one_line_error(result)
    assert not (tmp_path / "demo").exists()


def test_the_readme_command_finds_the_real_mtd_only_from_the_checkout_root(tmp_path):
    # README command 1 runs `curate demo` in the repository root, with ../shared beside it.
    beside = REPO.parent / "shared" / "data" / "mtd"
    expected = beside if (beside / "MT_Free").is_dir() else None
    assert checkout_mtd(REPO) == expected
    assert checkout_mtd(tmp_path) is None
    assert checkout_mtd(REPO / "tests") is None
    assert choose_mtd(None, False, tmp_path)[0] is None
    assert choose_mtd(None, True, REPO) == (None, "MTD: the generated sample (--no-mtd)")
    if expected is not None:
        path, said = choose_mtd(None, False, REPO)
        assert path == expected and str(expected) in said
