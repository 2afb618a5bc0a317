"""`curate bench`: an MTD export → trained detector → HSS-IAD-style tables (Markdown, CSV, JSON).

The figures are meaningless with random backbones; what is tested is the pipeline: reading the
export, both protocols, the metric suite on every category, the tables and their provenance.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the detectors extra (torch) is not installed")

from click.testing import CliRunner  # noqa: E402
from helpers import ingest, labels, mtd_subset  # noqa: E402

import detectors  # noqa: E402
from curate.app.cli import cli  # noqa: E402
from curate.engine.runner import Context, run_stage  # noqa: E402
from curate.engine.workspace import Workspace  # noqa: E402
from curate.export.mvtec import export_mvtec  # noqa: E402
from curate.stages.split import Split, SplitParams  # noqa: E402
from detectors.base import Detector, Geometry  # noqa: E402
from detectors.bench import METRIC_KEYS, run_bench  # noqa: E402
from detectors.data import DatasetError, read_mvtec  # noqa: E402


@pytest.fixture(scope="module")
def mtd_export(mtd_root, tmp_path_factory) -> Path:
    """Real MTD images through ingest → labels → split → `curate export mvtec`."""
    tmp = tmp_path_factory.mktemp("bench")
    source = mtd_subset(mtd_root, tmp / "mtd",
                         {"MT_Free": 14, "MT_Blowhole": 3, "MT_Crack": 3, "MT_Fray": 2})
    with Context(Workspace.open(tmp / "ws"), jobs=1, progress=False) as ctx:
        labelled = labels(ctx, ingest(ctx, "mtd", source))
        split = run_stage(Split(), [labelled], SplitParams(test_fraction=0.3), ctx).manifest
        export_mvtec(split, tmp / "export", ctx)
    return tmp / "export"


class MeanDetector(Detector):
    """A transparent test detector: distance of each pixel to the mean training image."""

    name = "mean"
    default_backbone = "wide_resnet_tiny"
    backbones = ("wide_resnet_tiny",)
    defaults = {"crop": 64}

    @property
    def geometry(self) -> Geometry:
        return Geometry(resize=(72, 72), crop=self.options["crop"])

    def build(self) -> None:
        self.model = torch.nn.Module()
        self.model.register_buffer("mean", torch.zeros(3, self.options["crop"], self.options["crop"]))

    def modules(self):
        return {"model": self.model}

    def fit(self, images, categories=None, *, iterations=None, batch_size=None, progress=True):
        total, count = 0, 0
        for batch, _ in self.loader(images, batch_size or 4, shuffle=True):
            total = total + batch.sum(0)
            count += len(batch)
        self.model.mean.copy_(total / count)
        self.iterations_done += 1
        return [float(count)]

    def predict_batch(self, x):
        maps = (x - self.model.mean).abs().mean(1)
        return maps.flatten(1).amax(1), maps


@pytest.fixture
def mean_detector(monkeypatch):
    real = detectors.detector_class
    monkeypatch.setattr(detectors, "detector_class",
                        lambda name: MeanDetector if name == "mean" else real(name))


def test_export_reads_as_an_mvtec_dataset(mtd_export):
    splits = read_mvtec(mtd_export)
    (name, split), = splits.items()
    assert split.train and all("/train/good/" in str(p) for p in split.train)
    assert sum(split.labels) == 8  # every defective image is in test
    assert len(split.test) + len(split.train) == 22
    for path, label, mask in zip(split.test, split.labels, split.masks, strict=True):
        assert (mask is None) == (label == 0)
        if mask is not None:
            assert mask.name == path.stem + "_mask.png"


def test_bench_both_protocols_produce_the_tables(mtd_export, tmp_path, mean_detector):
    for protocol in ("multi-class", "class-separated"):
        result = run_bench(mtd_export, "mean", protocol, weights="random", seed=3,
                           device="cpu", progress=False)
        (category, row), = result.categories.items()
        assert set(row) == set(METRIC_KEYS)
        assert all(0.0 <= v <= 1.0 for v in row.values())
        assert result.mean == pytest.approx(row)
        paths = result.write(tmp_path / protocol)
        table = paths["md"].read_text()
        assert category in table and "Average" in table and "AUPRO" in table
        rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
        assert [r["category"] for r in rows] == [category, "Average"]
        assert float(rows[0]["i_auroc"]) == pytest.approx(row["i_auroc"], abs=1e-6)
        data = json.loads(paths["json"].read_text())
        prov = data["provenance"]
        assert prov["seed"] == 3 and prov["device"].startswith("cpu")
        assert prov["backbone"]["sha256"] == "random:3"
        assert prov["curate_version"] and prov["export_manifest"]
        assert data["counts"][category] == {"train": 10, "test": 12, "anomalous": 8}


def test_bench_scores_match_the_metric_suite_on_the_same_maps(mtd_export, mean_detector):
    """The table is the metric suite applied to the detector's maps at eval size — recompute."""
    import cv2

    from detectors import create_detector, metrics

    result = run_bench(mtd_export, "mean", "multi-class", weights="random", device="cpu",
                       progress=False, eval_size=64)
    (split,) = read_mvtec(mtd_export).values()
    model = create_detector("mean", weights="random", device="cpu")
    model.fit(split.train)
    prediction = model.predict(split.test)
    maps = np.stack([cv2.resize(m, (64, 64)) for m in prediction.maps])
    masks = np.stack([cv2.resize(split.read_mask(i, m.shape).astype(np.float32), (64, 64),
                                 interpolation=cv2.INTER_AREA) >= 0.5
                      for i, m in enumerate(prediction.maps)])
    expected = metrics.evaluate(prediction.scores, np.array(split.labels), maps, masks)
    assert result.categories[split.name] == pytest.approx(expected, abs=1e-9)


def test_maps_have_each_input_images_size(mean_detector):
    model = detectors.create_detector("mean", weights="random", device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((80, 120), (200, 90))]
    model.fit(images)
    prediction = model.predict(images)
    assert [m.shape for m in prediction.maps] == [(80, 120), (200, 90)]
    assert prediction.scores.shape == (2,) and prediction.scores.dtype == np.float32


def test_geometry_round_trip_puts_the_crop_back_where_it_was():
    geometry = Geometry(resize=(448, 448), crop=392)
    top, left, rh, rw = geometry.crop_box(300, 500)
    assert (rh, rw) == (448, 448) and top == left == 28
    amap = torch.zeros(392, 392)
    amap[100:120, 200:240] = 1.0
    full = geometry.to_image(amap, 448, 448)
    assert full.shape == (448, 448)
    assert full[28 + 110, 28 + 220] == pytest.approx(1.0) and full[10, 10] == 0.0
    shorter = Geometry(resize=329, crop=288)
    assert shorter.resized_size(256, 1600) == (329, 2056)
    x = shorter.to_input(np.zeros((256, 1600, 3), np.uint8))
    assert x.shape == (3, 288, 288)


def test_bench_cli_writes_tables_and_reports_bad_input(mtd_export, tmp_path, mean_detector,
                                                        monkeypatch):
    import click

    # The CLI offers the registered detectors; let it accept the test one too.
    runner = CliRunner()
    command = cli.commands["bench"]
    option = next(p for p in command.params if p.name == "detector")
    monkeypatch.setattr(option, "type", click.Choice(["dinomaly", "cras", "mean"]))
    out = tmp_path / "tables"
    result = runner.invoke(cli, ["bench", str(mtd_export), "--detector", "mean", "--weights",
                                 "random", "--device", "cpu", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert Path(data["files"]["md"]).is_file() and data["detector"] == "mean"
    # A defect image whose mask is missing is an error naming both files; nothing is written.
    broken = tmp_path / "broken"
    (broken / "Part" / "train" / "good").mkdir(parents=True)
    (broken / "Part" / "test" / "dent").mkdir(parents=True)
    first = next((mtd_export).glob("*/train/good/*.png"))
    (broken / "Part" / "train" / "good" / "a.png").symlink_to(first)
    (broken / "Part" / "test" / "dent" / "b.png").symlink_to(first)
    result = runner.invoke(cli, ["bench", str(broken), "--detector", "mean", "--weights",
                                 "random", "--out", str(tmp_path / "t2")])
    assert result.exit_code == 1
    assert "b.png" in result.output and "b_mask.png" in result.output
    assert not (tmp_path / "t2").exists()
    result = runner.invoke(cli, ["bench", str(tmp_path), "--detector", "mean",
                                 "--weights", "random"])
    assert result.exit_code == 1 and "MVTec AD layout" in result.output
    with pytest.raises(DatasetError, match="no category Nope"):
        read_mvtec(mtd_export, ["Nope"])


def test_missing_backbone_weights_fail_in_one_line(mtd_export, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("CURATE_WEIGHTS", raising=False)
    result = CliRunner().invoke(cli, ["bench", str(mtd_export), "--detector", "cras",
                                      "--out", str(tmp_path / "t")])
    assert result.exit_code == 1
    assert "wide_resnet50_2" in result.output and "nothing is downloaded" in result.output


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run faster without OpenMP workers contending."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("detector, argv", [
    ("dinomaly", ["--backbone", "dinov2_tiny_reg", "--option", "image_size=126",
                  "--option", "crop_size=112", "--option", "map_size=64",
                  "--option", "warmup=2", "--iterations", "3", "--batch-size", "4"]),
    ("cras", ["--backbone", "wide_resnet_tiny", "--option", "resize=80", "--option", "crop=64",
              "--option", "embed_dim=64", "--iterations", "3", "--batch-size", "4"]),
])
def test_curate_bench_end_to_end_on_the_mtd_export(mtd_export, tmp_path, detector, argv,
                                                    one_thread):
    """The real pipeline and table with a tiny random backbone: numbers meaningless, plumbing not."""
    out = tmp_path / "tables"
    result = CliRunner().invoke(cli, ["bench", str(mtd_export), "--detector", detector,
                                      "--weights", "random", "--device", "cpu", "--seed", "5",
                                      "--save-models", "--out", str(out), "--json", *argv])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    (category, row), = data["categories"].items()
    assert set(row) == set(METRIC_KEYS)
    assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in row.values())
    prov = data["provenance"]
    assert prov["iterations"] == 3 and prov["seed"] == 5
    assert prov["backbone"]["sha256"] == "random:5"
    assert np.isfinite(prov["final_loss"]["all"])
    table = Path(data["files"]["md"]).read_text()
    assert table.count("|") > 20 and category in table
    # Same seed, same table: the saved model's recorded options rebuild the same run.
    saved = detectors.load_detector(prov["models"]["all"], device="cpu")
    again = run_bench(mtd_export, detector, "multi-class", backbone=saved.backbone.name,
                      weights="random", seed=5, device="cpu", iterations=3, batch_size=4,
                      options=saved.options, progress=False)
    assert again.categories[category] == pytest.approx(row, abs=1e-6)
