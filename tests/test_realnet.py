"""RealNet (detectors/realnet.py) on the tiny random backbone and real MTD images: AFS, training,
maps, persistence, seeding, anomaly synthesis (foreground, bank or procedural textures), the
official checkpoint layout and loader, and `curate bench --detector realnet`."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the detectors extra (torch) is not installed")

from click.testing import CliRunner  # noqa: E402
from helpers import mtd_images, mtd_subset  # noqa: E402

from detectors import create_detector, load_detector  # noqa: E402
from detectors.data import read_image  # noqa: E402
from detectors.realnet import (  # noqa: E402
    RealNet,
    SyntheticAnomalies,
    build_modules,
    load_official_realnet,
    official_to_ours,
)
from detectors.synthesis import anomaly_mask, list_bank  # noqa: E402

LAYOUT = Path(__file__).parent / "data" / "realnet_official_layout.json"
# Small and fast (64 px; two UNet levels, since layer 4 is 2×2); the paper's stay the defaults.
SMALL = {"image_size": 64, "afs_channels": [32, 32, 32, 32], "afs_batches": 2,
         "channel_mult": [1, 2], "num_res_blocks": 1, "attention_mult": [2],
         "num_head_channels": 16, "norm_groups": 8, "rrs_numbers": [16, 16]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machines are shared; one thread is faster there
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0, **options) -> RealNet:
    return create_detector("realnet", backbone="wide_resnet_tiny", weights="random", seed=seed,
                           device="cpu", **{**SMALL, **options})


@pytest.fixture(scope="module")
def trained(mtd_root):
    """A small RealNet trained on real MT_Free images (shared by several tests)."""
    images = mtd_images(mtd_root, "MT_Free", 8)
    detector = tiny()
    losses = detector.fit(images, iterations=24, batch_size=4, progress=False)
    return detector, images, losses


# ------------------------------------------------------------------- training and outputs


def test_training_selects_features_and_loss_decreases(trained):
    detector, _, losses = trained
    assert len(losses) == 24 and detector.iterations_done == 24
    assert all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert bool(detector.afs.selected)
    for layer, index in zip(detector.afs.layers, detector.afs.indices(), strict=True):
        channels = detector.backbone.module.channels[detector.afs.layers.index(layer)]
        assert len(index) == 32 and index.dtype == torch.long
        assert torch.all(index[1:] > index[:-1]) and int(index[-1]) < channels
    # AFS chose something other than the first channels somewhere
    assert any(not torch.equal(i, torch.arange(32)) for i in detector.afs.indices())


def test_maps_have_the_input_size(trained):
    detector, images, _ = trained
    odd = np.random.default_rng(0).integers(0, 255, (70, 131, 3), dtype=np.uint8)
    pred = detector.predict([*images[:2], odd], batch_size=2)
    sizes = [read_image(p).shape[:2] for p in images[:2]] + [odd.shape[:2]]
    assert [m.shape for m in pred.maps] == sizes
    assert pred.scores.shape == (3,) and np.all(np.isfinite(pred.scores))
    assert all(m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1 for m in pred.maps)
    x = torch.stack([detector.geometry.to_input(read_image(p)) for p in images[:2]])
    scores, maps = detector.predict_batch(x)
    assert maps.shape == (2, 64, 64)
    pooled = torch.nn.functional.avg_pool2d(maps[:, None], 16, stride=1)
    torch.testing.assert_close(scores, pooled.flatten(1).amax(1))
    detector.options["image_score"] = "max"
    try:
        torch.testing.assert_close(detector.predict_batch(x)[0], maps.flatten(1).amax(1))
    finally:
        detector.options["image_score"] = "avgpool"


def test_save_load_gives_identical_outputs(trained, tmp_path):
    detector, images, _ = trained
    path = detector.save(tmp_path / "realnet.safetensors")
    again = load_detector(path, device="cpu")
    assert isinstance(again, RealNet) and again.iterations_done == 24
    for a, b in zip(detector.afs.indices(), again.afs.indices(), strict=True):
        assert torch.equal(a, b)
    assert bool(again.afs.selected)
    a, b = detector.predict(images[:3]), again.predict(images[:3])
    np.testing.assert_array_equal(a.scores, b.scores)
    for m1, m2 in zip(a.maps, b.maps, strict=True):
        np.testing.assert_array_equal(m1, m2)


def test_training_is_deterministic_by_seed(mtd_root):
    images = mtd_images(mtd_root, "MT_Free", 4)
    runs = []
    for seed in (3, 3, 4):
        detector = tiny(seed=seed, afs_batches=1)
        losses = detector.fit(images, iterations=2, batch_size=2, progress=False)
        runs.append((losses, detector.predict(images[:2]).scores, detector.afs.layer3.clone()))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2], runs[1][2])
    assert runs[0][0] != runs[2][0]


# --------------------------------------------------------------------- anomaly synthesis


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    from detectors.backbones import IMAGENET_MEAN, IMAGENET_STD

    return x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def test_blending_stays_inside_the_foreground(mtd_root):
    images = mtd_images(mtd_root, "MT_Free", 3)
    detector = tiny()
    foregrounds = []
    for path in images:  # the left half of each image is foreground
        h, w = read_image(path).shape[:2]
        fg = np.zeros((h, w), bool)
        fg[:, : w // 2] = True
        foregrounds.append(fg)
    data = SyntheticAnomalies(images, detector.geometry, detector.options, seed=0, stream=1,
                              foregrounds=foregrounds, anomaly_ratio=1.0)
    seen = 0
    for epoch in range(6):
        data.epoch = epoch
        for i in range(len(images)):
            x, a, m, anomalous = data[i]
            mask = m[0] > 0
            assert bool(mask.any()) == anomalous
            assert not mask[:, 32:].any()  # nothing outside the foreground
            assert torch.equal(a[:, ~mask], x[:, ~mask])  # the image is unchanged there
            if anomalous:
                seen += 1
                assert not torch.allclose(a[:, mask], x[:, mask])
    assert seen >= 3
    # the mask function on its own
    rng = np.random.default_rng(0)
    fg = np.zeros((64, 64), bool)
    fg[10:40, 20:50] = True
    for _ in range(20):
        assert not (anomaly_mask((64, 64), rng, fg) & ~fg).any()


def test_bank_images_or_procedural_textures_are_the_source(mtd_root, tmp_path):
    images = mtd_images(mtd_root, "MT_Free", 2)
    bank = tmp_path / "bank"
    (bank / "sub").mkdir(parents=True)
    colour = np.zeros((40, 40, 3), np.uint8)
    colour[:] = (250, 10, 120)
    import cv2

    cv2.imwrite(str(bank / "sub" / "a.png"), colour[:, :, ::-1])
    assert list_bank(bank) == [bank / "sub" / "a.png"]
    options = {**RealNet.defaults, **SMALL, "delta_range": [1.0, 1.0]}
    geometry = tiny().geometry
    with_bank = SyntheticAnomalies(images, geometry, options, seed=0, stream=1,
                                   bank=list_bank(bank), anomaly_ratio=1.0)
    textures = SyntheticAnomalies(images, geometry, options, seed=0, stream=1, anomaly_ratio=1.0)
    found = 0
    for epoch in range(6):
        with_bank.epoch = textures.epoch = epoch
        for i in range(len(images)):
            _, a, m, anomalous = with_bank[i]
            if not anomalous:
                continue
            found += 1
            mask = m[0] > 0
            pixels = _denormalise(a)[:, mask] * 255  # δ = 1: the bank colour itself
            torch.testing.assert_close(pixels, torch.tensor([250.0, 10.0, 120.0])[:, None]
                                       .expand_as(pixels), atol=1e-3, rtol=0)
            _, t, tm, _ = textures[i]
            assert torch.equal(tm, m)  # same mask draw; only the source differs
            assert not torch.allclose(t[:, mask], a[:, mask])
    assert found
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        list_bank(tmp_path / "empty")
    # a fit with the bank works
    detector = tiny(bank=str(bank), afs_batches=1)
    losses = detector.fit(images, iterations=2, batch_size=2, progress=False)
    assert all(np.isfinite(losses))


# ------------------------------------------------------------------- official checkpoints


def test_official_layout_matches_the_paper_model():
    """Every key of the official MVTec-AD model maps onto ours with its shape (built on the
    meta device: the paper-size model has 524M parameters)."""
    layout = json.loads(LAYOUT.read_text())["state_dict"]
    state = {k: torch.empty(v["shape"], device="meta") for k, v in layout.items()}
    mapped = official_to_ours(state)
    with torch.device("meta"):
        afs, recon, rrs = build_modules(RealNet.defaults, (256, 512, 1024, 2048))
    for name, module in (("afs", afs), ("recon", recon), ("rrs", rrs)):
        ours = {k: tuple(v.shape) for k, v in module.state_dict().items() if k != "selected"}
        theirs = {k: tuple(v.shape) for k, v in mapped[name].items()}
        assert ours == theirs, name
    with torch.device("meta"):
        from torchvision.models import wide_resnet50_2

        from detectors.backbones import WideResNetFeatures

        features = WideResNetFeatures(wide_resnet50_2(), ("layer1", "layer2", "layer3", "layer4"))
    assert {k: tuple(v.shape) for k, v in features.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in mapped["backbone"].items()}


def _official_state(detector: RealNet) -> dict[str, torch.Tensor]:
    """A checkpoint in the official layout, from a (trained) detector of ours and a fresh
    unfused tiny backbone (the official checkpoint carries its backbone)."""
    from torchvision.models import resnet

    gen = torch.Generator().manual_seed(5)
    state = {}
    model = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], width_per_group=8)
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            if value.is_floating_point():
                value = torch.rand(value.shape, generator=gen) * 0.1 + (
                    0.5 if key.endswith("running_var") else 0.0)
            state[f"module.backbone.feature_extractor.{key}"] = value
    for i, index in enumerate(detector.afs.indices()):
        state[f"module.afs.indexes.block{i + 1}_layer{i + 1}"] = index.clone()
    for key, value in detector.recon.state_dict().items():
        block, rest = key.split(".", 1)
        state[f"module.recon.{block}_recon.{rest}"] = value.clone()
    for key, value in detector.rrs.state_dict().items():
        state[f"module.rrs.{key}"] = value.clone()
    return state


def test_official_checkpoint_loads_strictly(trained, tmp_path, monkeypatch):
    detector, images, _ = trained
    state = _official_state(detector)
    # the official file: a pickle holding an EasyDict config next to the state dict
    easydict = types.ModuleType("easydict")

    class EasyDict(dict):  # as easydict's: items are attributes too
        def __init__(self, **items):
            super().__init__(items)
            self.__dict__.update(items)

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    easydict.EasyDict = EasyDict
    monkeypatch.setitem(sys.modules, "easydict", easydict)
    path = tmp_path / "ckpt_best.pth.tar"
    torch.save({"epoch": 5, "arch": EasyDict(name="backbone"), "state_dict": state,
                "best_metric": 0.9}, path)
    monkeypatch.delitem(sys.modules, "easydict")
    loaded = load_official_realnet(path, backbone="wide_resnet_tiny", weights="random",
                                   device="cpu", **{k: v for k, v in SMALL.items()
                                                    if k != "afs_channels"})
    assert loaded.backbone.weights == str(path)
    for a, b in zip(loaded.afs.indices(), detector.afs.indices(), strict=True):
        assert torch.equal(a, b)
    # same heads as ours; a backbone the checkpoint supplied → same outputs as our detector
    # given that backbone
    reference = tiny()
    reference.afs.load_state_dict(detector.afs.state_dict())
    reference.recon.load_state_dict(detector.recon.state_dict())
    reference.rrs.load_state_dict(detector.rrs.state_dict())
    from detectors.realnet import _load_backbone

    _load_backbone(reference, official_to_ours(state)["backbone"], path)
    reference.to("cpu")
    x = torch.stack([loaded.geometry.to_input(read_image(p)) for p in images[:2]])
    torch.testing.assert_close(loaded.predict_batch(x), reference.predict_batch(x))
    # a renamed key or a missing one fails
    renamed = dict(state)
    renamed["module.rrs.decoder2.0.weights"] = renamed.pop("module.rrs.decoder2.0.weight")
    with pytest.raises(RuntimeError, match="decoder2.0.weight"):
        load_official_realnet({"state_dict": renamed}, backbone="wide_resnet_tiny",
                              weights="random", device="cpu", **SMALL)
    unknown = dict(state)
    unknown["module.discriminator.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="discriminator.weight"):
        load_official_realnet(unknown, backbone="wide_resnet_tiny", weights="random",
                              device="cpu", **SMALL)


# ----------------------------------------------------------------------------- curate bench


def test_curate_bench_realnet_end_to_end(mtd_root, tmp_path):
    from helpers import ingest, labels

    from curate.app.cli import cli
    from curate.engine.runner import Context, run_stage
    from curate.engine.workspace import Workspace
    from curate.export.mvtec import export_mvtec
    from curate.stages.split import Split, SplitParams

    source = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 8, "MT_Blowhole": 2,
                                                      "MT_Crack": 2})
    with Context(Workspace.open(tmp_path / "ws"), jobs=1, progress=False) as ctx:
        labelled = labels(ctx, ingest(ctx, "mtd", source))
        split = run_stage(Split(), [labelled], SplitParams(test_fraction=0.3), ctx).manifest
        export_mvtec(split, tmp_path / "export", ctx)
    bank = tmp_path / "bank"
    bank.mkdir()
    for jpg in sorted((mtd_root / "MT_Crack" / "Imgs").glob("*.jpg"))[:2]:
        (bank / jpg.name).symlink_to(jpg)
    options = [item for key, value in {**SMALL, "afs_batches": 1, "bank": str(bank)}.items()
               for item in ("--option", f"{key}={json.dumps(value)}")]
    out = tmp_path / "tables"
    result = CliRunner().invoke(cli, [
        "bench", str(tmp_path / "export"), "--detector", "realnet", "--backbone",
        "wide_resnet_tiny", "--weights", "random", "--device", "cpu", "--iterations", "2",
        "--batch-size", "4", "--eval-size", "64", "--out", str(out), "--save-models", "--json",
        *options])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["detector"] == "realnet" and Path(data["files"]["md"]).is_file()
    table = json.loads(Path(data["files"]["json"]).read_text())
    assert table["provenance"]["detector_options"]["bank"] == str(bank)
    assert table["provenance"]["iterations"] == 2
    row = next(iter(table["categories"].values()))
    assert all(np.isfinite(row[k]) for k in ("i_auroc", "p_auroc", "aupro"))
    saved = list(out.glob("realnet-*.safetensors"))
    assert saved and isinstance(load_detector(saved[0], device="cpu"), RealNet)
