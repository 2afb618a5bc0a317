"""Hostile inputs at the export (issue 16): names that collide once cleaned, a full disk, a
killed export, originals changed after ingest. An export is exact and all or nothing."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ingest, labels, tree_digest
from hypothesis import given
from hypothesis import strategies as st

import curate.export.index as export_report
import curate.export.mvtec as mvtec
from curate.app.build import BuildResult, export_all
from curate.app.cli import cli
from curate.app.recipe import load_recipe
from curate.core.errors import CurateError
from curate.core.manifest import Manifest
from curate.export import staging
from curate.export.mvtec import MARKER, export_mvtec, indexed_names
from curate.imaging.io import decode

CATEGORY = "Magnetic-tile-defect"


def mtd_copy(mtd_root: Path, root: Path, names: dict[str, list[str]]) -> Path:
    """An MTD-shaped tree of copies of real MTD images (and their masks) under new names:
    ``{"MT_Crack": ["a b", "a_b"]}`` copies the first two Crack images as ``a b.jpg``/``.png``
    and ``a_b.jpg``/``.png``."""
    for folder, stems in names.items():
        real = sorted((mtd_root / folder / "Imgs").glob("*.jpg"))
        assert len(real) >= len(stems), folder
        (root / folder / "Imgs").mkdir(parents=True)
        for stem, jpg in zip(stems, real, strict=False):
            for src in (jpg, jpg.with_suffix(".png")):
                (root / folder / "Imgs" / f"{stem}{src.suffix}").write_bytes(src.read_bytes())
    return root


FREE = {"MT_Free": ["free0", "free1"]}


@pytest.fixture
def labelled(ctx, mtd_root, tmp_path):
    """Six real MTD samples, ingested and labelled: the root and the manifest."""
    root = mtd_copy(mtd_root, tmp_path / "mtd", {"MT_Crack": ["c0", "c1", "c2", "c3"], **FREE})
    return root, labels(ctx, ingest(ctx, "mtd", root))


def leftovers(out: Path) -> list[str]:
    """Temporary folders beside ``out`` (a failed or killed export must leave none)."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.curate-*"))


def assert_exported_exactly(out: Path, manifest, root: Path, store) -> None:
    """Every kept sample is one exported image with its own pixels and its own mask; the tree
    holds nothing else."""
    report = json.loads((out / MARKER).read_text())
    rows = {r["sample_id"]: r for r in manifest.rows() if r["status"] == "kept"}
    assert report["skipped"] == []
    assert sorted(e["sample_id"] for e in report["files"]) == sorted(rows)
    for entry in report["files"]:
        exported = decode((out / entry["file"]).read_bytes())
        assert np.array_equal(exported, decode((root / entry["path"]).read_bytes())), entry
        if entry["mask"] is not None:
            mask = rows[entry["sample_id"]]["artifacts"]["mask"]
            assert (out / entry["mask"]).read_bytes() == store.read_bytes(mask), entry
    written = {e[k] for e in report["files"] for k in ("file", "mask") if e[k]}
    assert set(tree_digest(out)) == written | {MARKER}


# ------------------------------------------------------------------ item 1: unique names
def test_names_that_clean_alike_are_all_exported(ctx, mtd_root, tmp_path):
    """`a b` and `a_b`, `ä` and `ö`, `A` and `a` each used to overwrite each other; exported
    files are numbered in order of source path, and the report traces each one back."""
    root = mtd_copy(mtd_root, tmp_path / "mtd",
                    {"MT_Crack": ["a b", "a_b", "ä", "ö", "Crack", "crack"], **FREE})
    manifest = labels(ctx, ingest(ctx, "mtd", root))
    out = tmp_path / "out"
    report = export_mvtec(manifest, out, ctx)
    assert report["counts"] == {CATEGORY: {"test": {"Crack": 6, "good": 2}}}
    crack = sorted(p.name for p in (out / CATEGORY / "test" / "Crack").iterdir())
    assert crack == [f"00{i}.png" for i in range(6)]
    assert sorted(p.name for p in (out / CATEGORY / "ground_truth" / "Crack").iterdir()) == \
        [f"00{i}_mask.png" for i in range(6)]
    names = {e["path"]: e["file"] for e in report["files"]}
    in_order = sorted(p for p in names if p.startswith("MT_Crack/"))
    assert [names[p] for p in in_order] == [f"{CATEGORY}/test/Crack/00{i}.png" for i in range(6)]
    assert_exported_exactly(out, manifest, root, ctx.workspace.store)


def test_same_stem_in_two_formats_exports_both(ctx, mtd_root, tmp_path):
    """`000.png` and `000.bmp` in one folder (a COCO file lists both): both become PNGs."""
    root = tmp_path / "casting"
    (root / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "crack"}]}
    first, second = sorted((mtd_root / "MT_Free" / "Imgs").glob("*.jpg"))[:2]
    for i, (src, name) in enumerate(((first, "000.png"), (second, "000.bmp"))):
        pixels = decode(src.read_bytes())
        ok, data = cv2.imencode(Path(name).suffix, pixels)
        assert ok
        (root / "images" / name).write_bytes(data.tobytes())
        coco["images"].append({"id": i + 1, "file_name": f"images/{name}",
                               "height": pixels.shape[0], "width": pixels.shape[1]})
    (root / "coco.json").write_text(json.dumps(coco))
    manifest = labels(ctx, ingest(ctx, "casting", root))
    out = tmp_path / "out"
    report = export_mvtec(manifest, out, ctx)
    assert report["counts"] == {"Casting": {"test": {"good": 2}}}
    assert sorted(p.name for p in (out / "Casting" / "test" / "good").iterdir()) == \
        ["000.png", "001.png"]
    assert_exported_exactly(out, manifest, root, ctx.workspace.store)


def test_labels_that_share_a_folder_are_refused(ctx, mtd_root, tmp_path):
    root = mtd_copy(mtd_root, tmp_path / "mtd", {"MT_Crack": ["c0", "c1"], **FREE})
    (root / "MT_crack" / "Imgs").mkdir(parents=True)
    for name in ("c1.jpg", "c1.png"):
        (root / "MT_Crack" / "Imgs" / name).rename(root / "MT_crack" / "Imgs" / name)
    manifest = labels(ctx, ingest(ctx, "mtd", root))
    out = tmp_path / "out"
    with pytest.raises(CurateError, match="labels 'Crack' and 'crack' of category .* both "
                                          "be exported to the folder"):
        export_mvtec(manifest, out, ctx)
    assert not out.exists() and leftovers(out) == []

    (root / "MT_crack").rename(root / "MT_Good")  # a defect label that would pass for normal
    manifest = labels(ctx, ingest(ctx, "mtd", root))
    with pytest.raises(CurateError, match="labels 'good' and 'Good' of category"):
        export_mvtec(manifest, out, ctx)
    assert not out.exists() and leftovers(out) == []


def test_the_tree_is_checked_against_the_report_before_it_is_moved(ctx, labelled, tmp_path,
                                                                 monkeypatch):
    """A file the report does not list, or a listed file missing, fails the export."""
    root, manifest = labelled
    out = tmp_path / "out"
    real = mvtec.export_sample

    def astray(job, env):
        written = real(job, env)
        if job["path"].endswith("c2.jpg"):
            (Path(env.params.out) / f"{job['export_image']}.bak").write_bytes(b"stray")
        return written

    monkeypatch.setattr(mvtec, "export_sample", astray)
    with pytest.raises(CurateError, match=rf"{out}/{CATEGORY}/test/Crack/002.png.bak was written "
                                          f"but is not listed in {MARKER}"):
        export_mvtec(manifest, out, ctx)
    assert not out.exists() and leftovers(out) == []

    def lost(job, env):
        written = real(job, env)
        if job["path"].endswith("c2.jpg"):
            (Path(env.params.out) / job["export_mask"]).unlink()
        return written

    monkeypatch.setattr(mvtec, "export_sample", lost)
    with pytest.raises(CurateError, match=rf"{out}/{CATEGORY}/ground_truth/Crack/002_mask.png is "
                                          f"listed in {MARKER} but was not written"):
        export_mvtec(manifest, out, ctx)
    assert not out.exists() and leftovers(out) == []


@given(st.integers(min_value=1, max_value=20_000))
def test_indexed_names_sort_alike_with_and_without_mask(count):
    """Issue 17 item 2: loaders pair images with masks by sorting both lists; source stems of
    different lengths sort differently with `_mask` (`a_1` < `a_12`, `a_1_mask` > `a_12_mask`)."""
    names = indexed_names(count)
    assert len(set(names)) == count and len(names[0]) >= 3
    assert sorted(names) == names
    assert sorted(f"{n}_mask.png" for n in names) == [f"{n}_mask.png" for n in names]
    assert sorted(f"{n}.png" for n in names) == [f"{n}.png" for n in names]


# ------------------------------------------------------------------ item 3: all or nothing
def _full_disk_after(calls: int):
    real = mvtec.atomic_write_bytes
    count = [0]

    def write(path, data):
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{path}.1234.tmp")
        real(path, data)

    return write


def test_a_full_disk_fails_the_export_and_leaves_out_as_it_was(ctx, labelled, tmp_path,
                                                               monkeypatch):
    root, manifest = labelled
    out = tmp_path / "out"
    monkeypatch.setattr(mvtec, "atomic_write_bytes", _full_disk_after(3))
    with pytest.raises(CurateError) as failed:
        export_mvtec(manifest, out, ctx)
    message = str(failed.value)
    assert message.startswith(f"cannot write {out}/{CATEGORY}/")
    assert "No space left on device" in message and "nothing was exported" in message
    assert ".curate-tmp" not in message
    assert not out.exists() and leftovers(out) == []

    monkeypatch.undo()
    export_mvtec(manifest, out, ctx)
    before = tree_digest(out)
    monkeypatch.setattr(mvtec, "atomic_write_bytes", _full_disk_after(0))
    with pytest.raises(CurateError, match="No space left on device"):
        export_mvtec(manifest, out, ctx, overwrite=True)
    assert tree_digest(out) == before and leftovers(out) == []


def test_the_cli_on_a_file_size_limit_exits_1_with_one_sentence(ctx, labelled, tmp_path):
    """A real write failure (EFBIG under RLIMIT_FSIZE), in a real process: exit 1, one line,
    the earlier export untouched, no temporary folder left."""
    root, manifest = labelled
    out = tmp_path / "out"
    export_mvtec(manifest, out, ctx)
    before = tree_digest(out)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))  # masks fit, images not

    done = subprocess.run(
        [sys.executable, "-m", "curate.app.cli", "export", "mvtec", manifest.id, "--out", str(out),
         "--overwrite", "-w", str(ctx.workspace.root), "-j", "1"],
        capture_output=True, text=True, preexec_fn=limit_file_size, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: cannot write {out}/{CATEGORY}/")
    assert "File too large" in lines[0]
    assert tree_digest(out) == before and leftovers(out) == []


#: The CLI with one sample's export held until the process is killed: a deterministic
#: "middle of an export" for kill -9 (a real process, the real export code around it).
_HELD_EXPORT = """
import os, sys, time
import curate.export.mvtec as mvtec
from curate.app.cli import main
real = mvtec.export_sample
def held(job, env):
    if job["path"] == os.environ["HOLD_AT"]:
        open(os.environ["HELD"], "w").close()
        time.sleep(600)
    return real(job, env)
mvtec.export_sample = held
main()
"""


def test_a_killed_export_leaves_no_temporary_folder_behind(ctx, labelled, tmp_path):
    """kill -9 in the middle of an export, then export again."""
    root, manifest = labelled
    out, held = tmp_path / "out", tmp_path / "held"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HELD_EXPORT, "export", "mvtec", manifest.id, "--out", str(out),
         "-w", str(ctx.workspace.root), "-j", "1"],
        env={**os.environ, "HOLD_AT": "MT_Free/Imgs/free1.jpg", "HELD": str(held)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not held.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert held.exists(), f"the export did not reach the held sample: {proc.stderr.read()}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    tmp = staging.aside(out, staging.TMP, proc.pid)
    assert leftovers(out) == [tmp.name] and not out.exists()  # what kill -9 leaves
    assert list(tmp.rglob("*.png")), "the killed export had written images"

    export_mvtec(manifest, out, ctx)
    assert leftovers(out) == []
    assert_exported_exactly(out, manifest, root, ctx.workspace.store)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphans_are_removed_and_a_replaced_export_is_put_back(tmp_path):
    out = tmp_path / "out"
    dead, alive = _dead_pid(), os.getppid()
    for kind, pid in ((staging.TMP, dead), (staging.TMP, alive), (staging.OLD, dead)):
        folder = staging.aside(out, kind, pid)
        folder.mkdir()
        (folder / MARKER).write_text(kind)
    staging.remove_orphans(out)
    # Killed between the two renames of a replacement: the earlier export comes back.
    assert (out / MARKER).read_text() == staging.OLD
    assert leftovers(out) == [staging.aside(out, staging.TMP, alive).name]  # still running


def test_build_exports_are_all_or_nothing(ctx, labelled, tmp_path, monkeypatch):
    """`curate build` writes the tree, the sample lists and the card as one export."""
    root, manifest = labelled
    result = BuildResult("hss-iad", [SimpleNamespace(manifest=manifest)], {}, {})
    recipe = load_recipe("hss-iad")
    out = tmp_path / "out"
    exports = export_all(result, recipe, ctx, out, card=False)
    assert exports["realnet"][0].startswith(str(out / "realnet"))
    before = tree_digest(out)
    assert any(rel.startswith("realiad/") for rel in before)

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{path}.1234.tmp")

    monkeypatch.setattr(export_report, "atomic_write_text", full)
    with pytest.raises(CurateError, match=rf"cannot write {out}/realnet/\S+\.json: No space"):
        export_all(result, recipe, ctx, out, card=False)
    assert tree_digest(out) == before and leftovers(out) == []


def test_build_exports_hand_the_report_on_instead_of_reading_it_back(ctx, labelled, tmp_path,
                                                                    monkeypatch):
    """The lists and the card are written from the report the MVTec export has just written,
    not from ``curate-export.json`` read back (which the standalone commands do)."""
    import curate.export.card as card
    import curate.export.realiad as realiad
    import curate.export.realnet as realnet

    def no_reading(export_dir):
        raise AssertionError(f"{export_dir}: the report was read back")

    for module in (realnet, realiad, card):
        monkeypatch.setattr(module, "read_report", no_reading)
    _, manifest = labelled
    result = BuildResult("hss-iad", [SimpleNamespace(manifest=manifest)], {}, {})
    exports = export_all(result, load_recipe("hss-iad"), ctx, tmp_path / "out")
    assert exports["realnet"] and exports["realiad"] and Path(exports["card"]).is_file()


def test_a_defective_sample_without_a_mask_is_still_only_skipped(ctx, labelled, tmp_path):
    """The one legitimate skip: listed in the report, the rest exported, no failure."""
    root, manifest = labelled
    rows = manifest.row_list()
    maskless = next(r for r in rows if r["path"] == "MT_Crack/Imgs/c1.jpg")
    del maskless["artifacts"]["mask"]
    edited = Manifest.build(rows, stage="edit", stage_version="1", roots=manifest.roots)
    report = export_mvtec(edited, tmp_path / "out", ctx)
    assert report["skipped"] == [{"sample_id": maskless["sample_id"], "path": maskless["path"],
                                  "why": "labelled 'Crack' but has no mask"}]
    assert report["counts"] == {CATEGORY: {"test": {"Crack": 3, "good": 2}}}
    assert leftovers(tmp_path / "out") == []


# ------------------------------------------------------------------ item 5: originals checked
def test_an_original_changed_since_ingest_fails_the_export(ctx, labelled, tmp_path, mtd_root):
    root, manifest = labelled
    out = tmp_path / "out"
    export_mvtec(manifest, out, ctx)
    before = tree_digest(out)
    changed = root / "MT_Crack" / "Imgs" / "c1.jpg"
    expected = next(r["sha256"] for r in manifest.rows() if r["path"] == "MT_Crack/Imgs/c1.jpg")
    changed.write_bytes((root / "MT_Crack" / "Imgs" / "c2.jpg").read_bytes())
    result = CliRunner().invoke(cli, ["export", "mvtec", manifest.id, "--out", str(out),
                                      "--overwrite", "-w", str(ctx.workspace.root), "-j", "1"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {changed} changed since ingest (sha256 "
        f"{mvtec.sha256_bytes(changed.read_bytes())}, expected {expected}): ingest it again; "
        "nothing was exported"]
    assert tree_digest(out) == before and leftovers(out) == []

    changed.unlink()
    with pytest.raises(CurateError, match=rf"{changed} is missing \(ingested with sha256 "
                                          rf"{expected}\): ingest it again"):
        export_mvtec(manifest, tmp_path / "other", ctx)
    assert not (tmp_path / "other").exists() and leftovers(tmp_path / "other") == []


def test_a_category_named_like_a_list_folder_is_refused(ctx, mtd_root, tmp_path):
    """A category 'RealNet' would mix its images with the build's realnet/ sample lists."""
    root = mtd_copy(mtd_root, tmp_path / "mtd", {"MT_Crack": ["c0"], **FREE})
    manifest = labels(ctx, ingest(ctx, "mtd", root, category="RealNet"))
    result = BuildResult("hss-iad", [SimpleNamespace(manifest=manifest)], {}, {})
    out = tmp_path / "out"
    with pytest.raises(CurateError, match="category 'RealNet' has the name of a folder"):
        export_all(result, load_recipe("hss-iad"), ctx, out, card=False)
    assert not out.exists() and not leftovers(out)


# ------------------------------------------------------------------ issue 17
def test_build_replaces_another_manifests_export_only_with_overwrite(ctx, mtd_root, tmp_path):
    """Issue 17 item 6: `build --out` used to replace any earlier export silently while
    `export mvtec` refused; now both replace one of the same manifest (made again from the
    same data) and another manifest's only with --overwrite."""
    root = mtd_copy(mtd_root, tmp_path / "mtd", {"MT_Crack": ["c0", "c1"],
                                                 "MT_Free": [f"free{i}" for i in range(6)]})
    out, ws = tmp_path / "out", str(ctx.workspace.root)

    def build(*extra: str):
        return CliRunner().invoke(cli, ["build", "hss-iad", "--source", f"mtd={root}", "--out",
                                        str(out), "--no-card", "-w", ws, "-j", "1", *extra])

    assert build().exit_code == 0
    first = json.loads((out / MARKER).read_text())["manifest"]
    assert build().exit_code == 0  # the same manifest again
    before = tree_digest(out)
    refused = build("--seed", "7")  # another split: another manifest
    assert refused.exit_code == 1
    assert refused.stderr.strip().splitlines() == [
        f"error: {out} already holds a curate export of manifest {first[:12]}: pass "
        "--overwrite to replace it"]
    assert tree_digest(out) == before and leftovers(out) == []
    assert build("--seed", "7", "--overwrite").exit_code == 0
    assert json.loads((out / MARKER).read_text())["manifest"] != first
    # export mvtec follows the same rule.
    with pytest.raises(CurateError, match="already holds a curate export of manifest"):
        export_mvtec(labels(ctx, ingest(ctx, "mtd", root)), out, ctx)


def test_a_defect_with_an_empty_mask_is_skipped_not_exported(ctx, labelled, tmp_path):
    """Issue 17 item 3: a reviewer's `keep` on a `defect_without_mask` sample left a defective
    image with an all-zero mask in the export; it is skipped with its reason."""
    root, manifest = labelled
    rows = manifest.row_list()
    emptied = next(r for r in rows if r["path"] == "MT_Crack/Imgs/c1.jpg")
    emptied["artifacts"]["mask"] = ctx.workspace.store.put_mask(
        np.zeros((emptied["height"], emptied["width"]), bool))
    edited = Manifest.build(rows, stage="edit", stage_version="1", roots=manifest.roots)
    out = tmp_path / "out"
    report = export_mvtec(edited, out, ctx)
    assert report["skipped"] == [{"sample_id": emptied["sample_id"], "path": emptied["path"],
                                  "why": "labelled 'Crack' but its mask is empty"}]
    assert report["counts"] == {CATEGORY: {"test": {"Crack": 3, "good": 2}}}
    assert emptied["sample_id"] not in {e["sample_id"] for e in report["files"]}
    for entry in report["files"]:
        if entry["mask"]:
            assert decode((out / entry["mask"]).read_bytes()).any(), entry
    ctx.workspace.save(edited)
    result = CliRunner().invoke(cli, ["export", "mvtec", edited.id, "--out", str(tmp_path / "x"),
                                      "-w", str(ctx.workspace.root), "-j", "1"])
    assert result.exit_code == 0, result.output
    assert f"skipped {emptied['path']}: labelled 'Crack' but its mask is empty" in \
        " ".join(result.stdout.split())


def test_a_category_named_like_the_foreground_tree_is_refused(ctx, mtd_root, tmp_path):
    """Foreground masks live in <out>/foreground/ (issue 17 item 1): a category of that name
    would mix its images with them."""
    root = mtd_copy(mtd_root, tmp_path / "mtd", {"MT_Crack": ["c0"], **FREE})
    manifest = labels(ctx, ingest(ctx, "mtd", root, category="Foreground"))
    out = tmp_path / "out"
    with pytest.raises(CurateError, match="category 'Foreground' has the name of the folder the "
                                          "export keeps foreground masks in"):
        export_mvtec(manifest, out, ctx)
    assert not out.exists() and not leftovers(out)
