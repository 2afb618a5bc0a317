"""CRAS (detectors/cras.py) on the tiny random backbone: training, maps, persistence, seeding,
label-free class matching, the fast formulations against plain ones, the official loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the detectors extra (torch) is not installed")

from helpers import mtd_images  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from detectors import create_detector  # noqa: E402
from detectors.cras import (  # noqa: E402
    Discriminator,
    PatchFeatures,
    gaussian_smooth,
    load_official_cras,
)

LAYOUT = Path(__file__).parent / "data" / "cras_official_layout.json"
# Small and fast; the paper's defaults (329/288, 1536-d) stay the defaults.
SMALL = {"resize": 72, "crop": 64, "embed_dim": 128}


def tiny(seed: int = 0, **options):
    return create_detector("cras", backbone="wide_resnet_tiny", weights="random", seed=seed,
                           device="cpu", **{**SMALL, **options})


@pytest.fixture(scope="module")
def trained(mtd_root):
    """A small CRAS trained on real MT_Free images (shared by several tests)."""
    images = mtd_images(mtd_root, "MT_Free", 8)
    detector = tiny()
    losses = detector.fit(images, iterations=40, batch_size=4, progress=False)
    return detector, images, losses


# ------------------------------------------------------------------- training and outputs


def test_training_loss_decreases_on_real_images(trained):
    detector, _, losses = trained
    assert len(losses) == 40 and detector.iterations_done == 40
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert detector.classes == ["all"] and detector.centres.vectors.shape == (1, 64, 128)


def test_maps_have_the_input_size(trained):
    detector, images, _ = trained
    odd = np.random.default_rng(0).integers(0, 255, (70, 131, 3), dtype=np.uint8)
    from detectors.data import read_image

    inputs = [*images[:2], odd]
    pred = detector.predict(inputs, batch_size=2)
    sizes = [read_image(p).shape[:2] for p in images[:2]] + [odd.shape[:2]]
    assert [m.shape for m in pred.maps] == sizes
    assert pred.scores.shape == (3,) and np.all(np.isfinite(pred.scores))
    assert all(m.dtype == np.float32 for m in pred.maps)
    # image score: max of the smoothed map (paper), or of the raw patch scores (official code)
    x = torch.stack([detector.geometry.to_input(read_image(p)) for p in images[:2]])
    scores, maps = detector.predict_batch(x)
    assert maps.shape == (2, 64, 64)
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    detector.options["image_score"] = "patch"
    try:
        patch_scores, _ = detector.predict_batch(x)
    finally:
        detector.options["image_score"] = "map"
    assert torch.allclose(patch_scores, detector.patch_scores(x).flatten(1).amax(1))


def test_save_load_gives_identical_outputs(trained, tmp_path):
    from detectors import load_detector

    detector, images, _ = trained
    path = detector.save(tmp_path / "cras.safetensors")
    again = load_detector(path, device="cpu")
    assert again.classes == detector.classes and again.iterations_done == 40
    assert torch.equal(again.centres.vectors, detector.centres.vectors)
    a, b = detector.predict(images[:3]), again.predict(images[:3])
    np.testing.assert_array_equal(a.scores, b.scores)
    for m1, m2 in zip(a.maps, b.maps, strict=True):
        np.testing.assert_array_equal(m1, m2)


def test_training_is_deterministic_by_seed(mtd_root):
    images = mtd_images(mtd_root, "MT_Free", 4)
    runs = []
    for seed in (3, 3, 4):
        detector = tiny(seed=seed, embed_dim=64)
        losses = detector.fit(images, iterations=3, batch_size=2, progress=False)
        runs.append((losses, detector.predict(images[:2]).scores))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


# ------------------------------------------------------------------- label-free matching


def test_matching_uses_no_labels(mtd_root):
    tiles = [np.asarray(img) for img in mtd_images(mtd_root, "MT_Free", 3)]
    from detectors.data import read_image

    tiles = [read_image(p) for p in tiles]
    rng = np.random.default_rng(1)
    stripes = [np.kron(rng.integers(0, 255, (1, 12, 3)), np.ones((96, 8, 1))).astype(np.uint8)
               for _ in range(3)]
    detector = tiny(embed_dim=64)
    detector.fit(tiles + stripes, ["tile"] * 3 + ["stripes"] * 3, iterations=2, batch_size=3,
                 progress=False)
    assert detector.classes == ["tile", "stripes"]
    tests_tiles = [read_image(p) for p in mtd_images(mtd_root, "MT_Free", 5)[3:]]
    tests_stripes = [np.kron(rng.integers(0, 255, (1, 12, 3)), np.ones((90, 9, 1)))
                     .astype(np.uint8) for _ in range(2)]
    mixed = [tests_tiles[0], tests_stripes[0], tests_tiles[1], tests_stripes[1]]
    assert detector.predict_classes(mixed, batch_size=4) == ["tile", "stripes"] * 2
    assert detector.predict_classes(mixed[:1], batch_size=1) == ["tile"]
    assert detector.predict_classes(mixed[1:2], batch_size=1) == ["stripes"]
    together = detector.predict(mixed, batch_size=4)
    alone = [detector.predict([image], batch_size=1) for image in mixed]
    np.testing.assert_allclose(together.scores, [p.scores[0] for p in alone], rtol=0, atol=1e-5)
    for amap, single in zip(together.maps, alone, strict=True):
        np.testing.assert_allclose(amap, single.maps[0], rtol=0, atol=1e-5)


# --------------------------------------------------------- fast formulations = plain ones


def reference_patch_features(feats, embed_dim, out_dim, patch=3):
    """The plain chain: unfold, upsample unfolded later layers, adaptive-pool each layer's
    flattened C·p·p vector, then adaptive-pool their concatenation."""
    pad = patch // 2
    height, width = feats[0].shape[-2:]
    pooled = []
    for f in feats:
        b, c, h, w = f.shape
        cols = F.unfold(f, patch, padding=pad).reshape(b, c, patch, patch, h, w)
        if (h, w) != (height, width):
            cols = F.interpolate(cols.reshape(-1, 1, h, w), size=(height, width),
                                 mode="bilinear", align_corners=False)
            cols = cols.reshape(b, c, patch, patch, height, width)
        cols = cols.permute(0, 4, 5, 1, 2, 3).reshape(b * height * width, 1, -1)
        pooled.append(F.adaptive_avg_pool1d(cols, embed_dim).squeeze(1))
    stacked = torch.stack(pooled, 1).reshape(len(pooled[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, out_dim).reshape(b, height * width, out_dim)


@pytest.mark.parametrize("channels,embed,out,size", [
    ((512, 1024), 1536, 1536, 10),  # the paper's setting
    ((512, 1024), 128, 128, 8),
    ((48, 80), 100, 70, 6),  # not block-structured: the dense fallback
])
def test_fast_aggregation_equals_unfold_and_adaptive_pooling(channels, embed, out, size):
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, channels[0], size, size, generator=gen),
             torch.randn(2, channels[1], size // 2, size // 2, generator=gen)]
    fast = PatchFeatures(channels, embed, out, 3)(feats).flatten(2).transpose(1, 2)
    ref = reference_patch_features(feats, embed, out)
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_discriminator_residual_path_equals_plain(training):
    torch.manual_seed(0)
    disc = Discriminator(32, layers=3).train(training)
    if not training:  # non-trivial running statistics
        disc.hidden[0].norm.running_mean.normal_()
        disc.hidden[0].norm.running_var.uniform_(0.5, 2)
    u, bank = torch.randn(50, 32), torch.randn(7, 32)
    rows = torch.randint(0, 7, (50,))
    noise = 0.1 * torch.randn(50, 32)
    p, v = bank[rows], u + noise
    plain = disc.logits(torch.cat((torch.cat((u, u - p), 1), torch.cat((v, v - p), 1))))
    fast = disc.residual_logits(u, bank, rows, noise)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    if not training:
        torch.testing.assert_close(disc.residual_logits(u, bank, rows),
                                   disc.logits(torch.cat((u, u - p), 1)), rtol=1e-4, atol=1e-5)
    assert disc.head.bias is None and [b.linear.out_features for b in disc.hidden] == [32, 16]


def test_distance_aware_synthesis():
    detector = tiny(embed_dim=64)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 20, 64, generator=gen)
    p = u + torch.rand(3, 20, 1, generator=gen) * torch.randn(3, 20, 64, generator=gen)
    p[0, 0] = u[0, 0]  # r = 0: clamped, no inf / nan
    noise = detector.synthesize(u, p, torch.Generator().manual_seed(5))
    g = torch.randn(u.shape, generator=torch.Generator().manual_seed(5)) * 0.015
    r = (u - p).norm(dim=-1).clamp_min(1e-6)
    s = g.norm(dim=-1) / r
    s = s / s.mean(dim=1, keepdim=True)
    torch.testing.assert_close(s.mean(dim=1), torch.ones(3))
    alpha = 0.3 * (s - 1) + 1
    torch.testing.assert_close(noise, alpha.unsqueeze(-1) * g)
    assert torch.isfinite(noise).all()
    # farther from the centre → smaller noise (for the same g)
    assert alpha[1].argmax() == (g[1].norm(dim=-1) / r[1]).argmax()


def test_gaussian_smoothing_matches_scipy():
    from scipy import ndimage

    maps = torch.rand(2, 40, 37, generator=torch.Generator().manual_seed(0))
    ours = gaussian_smooth(maps, 4.0).numpy()
    ref = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in maps.numpy()])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ official checkpoints


def official_state(seed: int = 0):
    layout = json.loads(LAYOUT.read_text())
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for part, keys in layout["checkpoint"].items():
        state[part] = {}
        for key, spec in keys.items():
            if spec["dtype"] == "int64":
                state[part][key] = torch.tensor(7)
            elif key.endswith("running_var"):
                state[part][key] = torch.rand(spec["shape"], generator=gen) + 0.5
            else:
                state[part][key] = torch.randn(spec["shape"], generator=gen) * 0.05
    centres = torch.randn(2, *layout["center"]["shape"][1:], generator=gen)
    return state, centres


def official_forward(state, x):
    """The official discriminator computed by hand from its state dict (eval mode)."""
    d = state["discriminator"]
    for block in (1, 2):
        pre = f"body.block{block}."
        x = F.linear(x, d[pre + "0.weight"], d[pre + "0.bias"])
        x = F.batch_norm(x, d[pre + "1.running_mean"], d[pre + "1.running_var"],
                         d[pre + "1.weight"], d[pre + "1.bias"], training=False)
        x = F.leaky_relu(x, 0.2)
    return torch.sigmoid(F.linear(x, d["tail.0.weight"])).squeeze(-1)


def test_official_checkpoint_loads_strictly(tmp_path):
    state, centres = official_state()
    torch.save(state, tmp_path / "ckpt_best_12.pth")
    torch.save(centres, tmp_path / "center.pth")
    detector = load_official_cras(tmp_path, backbone="wide_resnet_tiny", weights="random",
                                  categories=["a", "b"], device="cpu")
    assert detector.classes == ["a", "b"] and detector.grid == 36
    torch.testing.assert_close(detector.adapter.weight, state["pre_projection"]["layers.0fc.weight"])
    torch.testing.assert_close(detector.centres.vectors, centres)
    gen = torch.Generator().manual_seed(1)
    u, p = torch.randn(5, 1536, generator=gen), torch.randn(5, 1536, generator=gen)
    x = torch.cat((u, u - p), 1)
    with torch.no_grad():
        torch.testing.assert_close(detector.discriminator(x), official_forward(state, x))
    # a renamed key, a missing key, or missing centres fail
    renamed, _ = official_state()
    renamed["discriminator"]["body.block1.0.weights"] = renamed["discriminator"].pop(
        "body.block1.0.weight")
    with pytest.raises(KeyError, match="block1.0.weights"):
        load_official_cras(dict(renamed, center=centres), backbone="wide_resnet_tiny",
                           weights="random", device="cpu")
    missing, _ = official_state()
    del missing["discriminator"]["body.block2.1.running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        load_official_cras(dict(missing, center=centres), backbone="wide_resnet_tiny",
                           weights="random", device="cpu")
    (tmp_path / "center.pth").unlink()
    with pytest.raises(FileNotFoundError, match="center.pth"):
        load_official_cras(tmp_path / "ckpt_best_12.pth", backbone="wide_resnet_tiny",
                           weights="random", device="cpu")


def test_paper_geometry_with_real_weights():
    """WRN-50-2 (ImageNet weights from the local cache) at 288 px → 36×36 grid of 1536-d."""
    from detectors.backbones import WeightsNotFoundError

    try:
        detector = create_detector("cras", device="cpu")
    except WeightsNotFoundError as error:
        pytest.skip(f"needs the WideResNet-50-2 ImageNet weights: {error}")
    x = torch.zeros(1, 3, 288, 288)
    assert detector.features(detector.input_tensor(x)).shape == (1, 36 * 36, 1536)
