"""Our exports loaded by the tools users point at them (issue 17): anomalib's ``MVTecAD`` and
``Folder`` datamodules, unmodified, on the export of a generated build (``curate demo``) and of
real MTD images; RealNet's and Real-IAD's lists parsed as their loaders parse them.

anomalib pairs test images with masks by sorting two path lists and asserting that each image
stem is in its mask's stem; it globs every ``.png`` under a category folder. So every pair is
checked here against ``curate-export.json``: the mask anomalib gives an image is the one the
report lists for it, and the pixels anomalib reads are the source image's and the stored
mask's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ingest, labels
from test_export_lists import _realiad_reads, _realnet_reads

from curate.app.cli import cli
from curate.engine.runner import run_stage
from curate.export.mvtec import FOREGROUND, MARKER, export_mvtec
from curate.export.realiad import export_realiad
from curate.export.realnet import export_realnet
from curate.imaging.io import decode
from curate.stages import stage_class
from curate.stages.foreground.stage import ForegroundParams
from curate.stages.split import SplitParams

pytestmark = pytest.mark.slow
anomalib_data = pytest.importorskip("anomalib.data", reason="anomalib is in the dev extra")

CATEGORY = "Magnetic-tile-defect"
#: The four real MTD Uneven images whose masks are empty: skipped, never a test anomaly.
UNEVEN_EMPTY = ("exp3_num_45042", "exp4_num_124690", "exp4_num_352527", "exp4_num_45057")


def _report(out: Path) -> dict:
    return json.loads((out / MARKER).read_text())


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """curate's decoded pixels as the RGB anomalib reads (PIL ``convert("RGB")``)."""
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels[:, :, :3]  # curate decodes to RGB(A)


def check_dataset(dataset, out: Path, roots: dict[str, Path], pixels: bool) -> int:
    """Every sample anomalib lists is an exported image, with the report's mask (or none for a
    good one); with ``pixels``, each item's image and mask are the source's and the store's
    (read back from the export). Returns the number of anomalous samples."""
    by_file = {e["file"]: e for e in _report(out)["files"]}
    samples = dataset.samples
    assert len(samples) > 0
    anomalous = 0
    for index, sample in enumerate(samples.itertuples()):
        entry = by_file[str(Path(sample.image_path).relative_to(out))]
        good = entry["mask"] is None
        assert sample.label_index == (0 if good else 1), entry
        if good:
            assert not sample.mask_path, entry
        else:
            anomalous += 1
            assert Path(sample.mask_path) == out / entry["mask"], entry
        if not pixels:
            continue
        item = dataset[index]
        source = decode((roots[entry["source"]] / entry["path"]).read_bytes())
        image = (item.image.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
        assert np.array_equal(image, _rgb(source)), entry
        expected = np.zeros(source.shape[:2], bool) if good else \
            decode((out / entry["mask"]).read_bytes()) > 0
        assert np.array_equal(item.gt_mask.numpy().astype(bool), expected), entry
        assert good or expected.any(), f"a test anomaly without defect pixels: {entry}"
    return anomalous


def load_mvtec(out: Path, category: str):
    module = anomalib_data.MVTecAD(root=out, category=category, num_workers=0,
                                   train_batch_size=4, eval_batch_size=4)
    module.setup()
    return module


def load_folder(out: Path, category: str):
    root = out / category
    defects = sorted(p.name for p in (root / "test").iterdir() if p.name != "good")
    module = anomalib_data.Folder(
        name=category, root=root, normal_dir="train/good",
        normal_test_dir="test/good" if (root / "test" / "good").is_dir() else None,
        abnormal_dir=[f"test/{d}" for d in defects],
        mask_dir=[f"ground_truth/{d}" for d in defects], num_workers=0,
        train_batch_size=4, eval_batch_size=4,
        val_split_mode="same_as_test")  # the default moves half the test set to validation
    module.setup()
    return module


def check_lists(out: Path) -> None:
    """RealNet's and Real-IAD's lists, read as their loaders read them, give each image of the
    report its label and mask, and no defect an empty one."""
    by_file = {e["file"]: e for e in _report(out)["files"]}
    listed = set()
    for meta_file in sorted((out / "realnet").glob("*_*.json")):
        if meta_file.stem.endswith("_uni"):
            continue
        for meta in _realnet_reads(meta_file, out):
            listed.add(meta["filename"])
            assert meta.get("maskname") == by_file[meta["filename"]]["mask"]
            if meta["label"] == 1:
                assert (decode((out / meta["maskname"]).read_bytes()) > 0).any(), meta
    assert listed == set(by_file)
    listed = set()
    for meta_file in sorted((out / "realiad").glob("*.json")):
        for _, meta in _realiad_reads(meta_file, out):
            listed.add(meta["filename"])
            assert meta["maskname"] == by_file[meta["filename"]]["mask"]
    assert listed == set(by_file)


# ----------------------------------------------------------------------- a generated build
@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    base = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(cli, ["demo", "--no-mtd", "--out", str(base / "demo"),
                                      "--json", "-j", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    roots = {p.name: p for p in (base / "demo" / "sources").iterdir()}
    return base / "demo" / "export", roots


def _sources(out: Path, roots: dict[str, Path]) -> dict[str, Path]:
    """The source name of each report entry -> its root (the generated sources' folders)."""
    names = {e["source"] for e in _report(out)["files"]}
    found = {}
    for name in names:
        for root in roots.values():
            if any((root / e["path"]).is_file() for e in _report(out)["files"]
                   if e["source"] == name):
                found[name] = root
                break
    assert set(found) == names
    return found


def test_a_generated_build_loads_in_anomalib_mvtecad_and_folder(demo_export):
    out, roots = demo_export
    roots = _sources(out, roots)
    counts = _report(out)["counts"]
    assert (out / FOREGROUND).is_dir()  # foregrounds exported, outside every category
    for category, splits in counts.items():
        anomalous = sum(n for label, n in splits["test"].items() if label != "good")
        module = load_mvtec(out, category)
        assert len(module.train_data) == splits["train"]["good"]
        assert check_dataset(module.train_data, out, roots, pixels=False) == 0
        assert check_dataset(module.test_data, out, roots, pixels=True) == anomalous
        folder = load_folder(out, category)
        assert len(folder.train_data) == splits["train"]["good"]
        assert check_dataset(folder.test_data, out, roots, pixels=False) == anomalous
    check_lists(out)


# ----------------------------------------------------------------------- real MTD images
@pytest.fixture(scope="module")
def mtd_export(tmp_path_factory, mtd_root) -> tuple[Path, dict[str, Path], dict]:
    """Real MTD images (20 of each defect, the four empty-mask Uneven ones, 60 good ones),
    ingested, given foregrounds, labelled, split and exported with both sample lists."""
    base = tmp_path_factory.mktemp("mtd")
    root = base / "mtd"
    chosen = {folder: sorted((mtd_root / folder / "Imgs").glob("*.jpg"))[:20]
              for folder in ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")}
    chosen["MT_Free"] = sorted((mtd_root / "MT_Free" / "Imgs").glob("*.jpg"))[:60]
    chosen["MT_Uneven"] += [mtd_root / "MT_Uneven" / "Imgs" / f"{s}.jpg" for s in UNEVEN_EMPTY]
    for folder, jpgs in chosen.items():
        (root / folder / "Imgs").mkdir(parents=True)
        for jpg in jpgs:
            for original in (jpg, jpg.with_suffix(".png")):
                target = root / folder / "Imgs" / original.name
                try:
                    os.link(original, target)
                except OSError:
                    shutil.copyfile(original, target)
    from curate.engine.runner import Context
    from curate.engine.workspace import Workspace

    with Context(Workspace.open(base / "ws"), jobs=2, progress=False) as ctx:
        manifest = ingest(ctx, "mtd", root)
        manifest = run_stage(stage_class("foreground")(), [manifest], ForegroundParams(),
                             ctx).manifest
        manifest = labels(ctx, manifest)
        manifest = run_stage(stage_class("split")(), [manifest], SplitParams(), ctx).manifest
        report = export_mvtec(manifest, base / "out", ctx)
    export_realnet(base / "out")
    export_realiad(base / "out")
    return base / "out", {"mtd": root}, report


def test_real_mtd_loads_in_anomalib_with_every_pair_exact(mtd_export):
    out, roots, report = mtd_export
    # Item 1: foreground masks exist, but not in the category tree anomalib globs.
    assert all(e["foreground"].startswith(f"{FOREGROUND}/{CATEGORY}/")
               for e in report["files"])
    assert not (out / CATEGORY / FOREGROUND).exists()
    # Item 3: the empty masks are skipped with a reason, not test anomalies.
    assert sorted(Path(s["path"]).stem for s in report["skipped"]) == sorted(UNEVEN_EMPTY)
    assert all(s["why"].endswith("but its mask is empty") for s in report["skipped"])

    module = load_mvtec(out, CATEGORY)
    counts = report["counts"][CATEGORY]
    assert len(module.train_data) == counts["train"]["good"]
    anomalous = sum(n for label, n in counts["test"].items() if label != "good")
    assert anomalous == 100
    assert check_dataset(module.test_data, out, roots, pixels=True) == anomalous
    assert check_dataset(module.train_data, out, roots, pixels=False) == 0
    folder = load_folder(out, CATEGORY)
    assert check_dataset(folder.test_data, out, roots, pixels=False) == anomalous
    check_lists(out)


def test_stems_that_sort_apart_with_mask_are_paired_exactly(ctx, mtd_root, tmp_path):
    """Item 2, the issue's two-file tree: `exp1_num_1087` < `exp1_num_108719` but
    `exp1_num_1087_mask` > `exp1_num_108719_mask`; named after them, anomalib raised
    MisMatchError. Real MTD Crack images and masks under those names."""
    root = tmp_path / "mtd"
    stems = ["exp1_num_108719", "exp1_num_1087"]
    assert sorted(stems) != [m[:-5] for m in sorted(f"{s}_mask" for s in stems)]
    for folder, names in (("MT_Crack", stems), ("MT_Free", ["free0", "free1"])):
        (root / folder / "Imgs").mkdir(parents=True)
        real = sorted((mtd_root / folder / "Imgs").glob("*.jpg"))
        for stem, jpg in zip(names, real, strict=False):
            for src in (jpg, jpg.with_suffix(".png")):
                (root / folder / "Imgs" / f"{stem}{src.suffix}").write_bytes(src.read_bytes())
    manifest = labels(ctx, ingest(ctx, "mtd", root))
    manifest = run_stage(stage_class("split")(), [manifest], SplitParams(test_fraction=0.5),
                         ctx).manifest
    export_mvtec(manifest, tmp_path / "out", ctx)
    module = load_mvtec(tmp_path / "out", CATEGORY)
    assert check_dataset(module.test_data, tmp_path / "out", {"mtd": root}, pixels=True) == 2


def test_a_sdas_blend_exports_as_test_anomalies_anomalib_loads(ctx, mtd_root, tmp_path):
    """Item 10: a blend's rows carry their masks (no `labels` run): the export takes them, as
    test anomalies (anomalib reads no anomalous training image), each with its mask."""
    from curate.stages.sdas.stage import SdasBlend, SdasBlendParams

    root = tmp_path / "mtd"
    (root / "MT_Free" / "Imgs").mkdir(parents=True)
    for jpg in sorted((mtd_root / "MT_Free" / "Imgs").glob("*.jpg"))[:3]:
        for original in (jpg, jpg.with_suffix(".png")):
            shutil.copyfile(original, root / "MT_Free" / "Imgs" / original.name)
    normal = run_stage(stage_class("foreground")(), [ingest(ctx, "mtd", root)],
                       ForegroundParams(), ctx).manifest
    blend = run_stage(SdasBlend(), [normal], SdasBlendParams(category=CATEGORY, n=6, size=64),
                      ctx).manifest
    assert not any("labels.mask_fraction" in r["measures"] for r in blend.rows())
    out = tmp_path / "out"
    report = export_mvtec(blend, out, ctx)
    assert report["written"] + len(report["skipped"]) == 6 and report["written"] > 0
    assert report["counts"] == {CATEGORY: {"test": {"synthetic": report["written"]}}}
    assert all(s["why"].endswith("but its mask is empty") for s in report["skipped"])
    roots = {name: Path(path) for name, path in blend.roots.items()}
    for entry in report["files"]:
        row = next(r for r in blend.rows() if r["sample_id"] == entry["sample_id"])
        assert (out / entry["mask"]).read_bytes() == \
            ctx.workspace.store.read_bytes(row["artifacts"]["mask"])
    module = anomalib_data.MVTecAD(root=out, category=CATEGORY, num_workers=0)
    module.setup()
    assert check_dataset(module.test_data, out, roots, pixels=True) == report["written"]
