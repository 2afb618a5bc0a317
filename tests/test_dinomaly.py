"""Dinomaly on CPU with the tiny random DINOv2-R (hidden 48, 12 blocks): training, maps, save/load,
determinism, the hard-mining gradient, linear attention, StableAdamW and the official-checkpoint
loader (against the key layout of the authors' ViTill for ViT-S, tests/data/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from detectors import create_detector
from detectors.backbones import WeightsNotFoundError
from detectors.data import read_image
from detectors.dinomaly import (
    LinearAttention,
    hard_mining_cosine_loss,
    load_official_dinomaly,
    official_state_dict,
    warm_cosine_lr,
)
from detectors.optim import StableAdamW

LAYOUT = Path(__file__).parent / "data" / "dinomaly_official_vits_layout.json"
SMALL = dict(image_size=128, crop_size=112, warmup=5)  # 8×8 tokens instead of 28×28


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from a second thread, and on a shared, busy machine two
    OpenMP threads wait on each other (5× slower wall time measured); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0, **options):
    return create_detector("dinomaly", backbone="dinov2_tiny_reg", weights="random", seed=seed,
                           device="cpu", **{**SMALL, **options})


@pytest.fixture(scope="module")
def mtd_images(mtd_root) -> list[Path]:
    images = sorted((mtd_root / "MT_Free" / "Imgs").glob("*.jpg"))[:16]
    assert len(images) == 16
    return images


def test_loss_decreases_on_real_images(mtd_images):
    detector = tiny()
    losses = detector.fit(mtd_images, iterations=25, batch_size=4, progress=False)
    assert len(losses) == 25 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert detector.iterations_done == 25


def test_maps_have_the_input_size(mtd_images):
    detector = tiny()
    rng = np.random.default_rng(0)
    odd = rng.integers(0, 256, size=(150, 230, 3), dtype=np.uint8)  # wider than tall
    tall = rng.integers(0, 256, size=(300, 140, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(120, 120), dtype=np.uint8)
    images = [mtd_images[0], odd, tall, grey]
    prediction = detector.predict(images, batch_size=3)
    expected = [read_image(mtd_images[0]).shape[:2], (150, 230), (300, 140), (120, 120)]
    assert [m.shape for m in prediction.maps] == expected
    assert prediction.scores.shape == (4,) and prediction.scores.dtype == np.float32
    assert all(np.isfinite(m).all() and m.dtype == np.float32 for m in prediction.maps)
    # the image score is the mean of the top 1% of the 256×256 map over the crop
    x = torch.stack([detector.geometry.to_input(odd)])
    scores, maps = detector.predict_batch(x)
    assert maps.shape == (1, 256, 256)
    top = maps.flatten().sort(descending=True).values[:655].mean()
    assert torch.allclose(scores[0], top, atol=1e-6)


def test_map_equals_the_official_chain():
    """Folded matrices == bilinear up to the crop (align_corners) → bilinear to 256 → 5×5 σ=4."""
    detector = tiny()
    gen = torch.Generator().manual_seed(0)
    en = [torch.randn(2, 64, 48, generator=gen) for _ in range(2)]
    de = [torch.randn(2, 64, 48, generator=gen) for _ in range(2)]
    _, maps = detector.anomaly_maps(en, de, (8, 8))
    per_group = []
    for e, d in zip(en, de, strict=True):
        e4 = e.transpose(1, 2).reshape(2, 48, 8, 8)
        d4 = d.transpose(1, 2).reshape(2, 48, 8, 8)
        a = (1 - F.cosine_similarity(e4, d4)).unsqueeze(1)
        per_group.append(F.interpolate(a, size=112, mode="bilinear", align_corners=True))
    ref = torch.cat(per_group, dim=1).mean(dim=1, keepdim=True)
    ref = F.interpolate(ref, size=256, mode="bilinear", align_corners=False)
    xs = torch.arange(5, dtype=torch.float32) - 2
    g = torch.exp(-(xs[:, None] ** 2 + xs[None] ** 2) / 32)
    ref = F.conv2d(ref, (g / g.sum())[None, None], padding=2)[:, 0]
    assert torch.allclose(maps, ref, atol=1e-5)


def test_save_load_gives_identical_outputs(mtd_images, tmp_path):
    detector = tiny()
    detector.fit(mtd_images[:8], iterations=3, batch_size=4, progress=False)
    before = detector.predict(mtd_images[:3])
    path = detector.save(tmp_path / "dinomaly.safetensors")
    loaded = type(detector).load(path)
    after = loaded.predict(mtd_images[:3])
    assert loaded.iterations_done == 3 and loaded.options == detector.options
    np.testing.assert_array_equal(before.scores, after.scores)
    for a, b in zip(before.maps, after.maps, strict=True):
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_result_different_seed_different(mtd_images):
    runs = []
    for seed in (3, 3, 4):
        detector = tiny(seed=seed)
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        losses = detector.fit(mtd_images[:8], iterations=3, batch_size=4, progress=False)
        runs.append((losses, detector.predict(mtd_images[:2]).scores))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]
    assert not np.array_equal(runs[0][1], runs[2][1])


def test_hard_mining_gradient_matches_hand_computation():
    gen = torch.Generator().manual_seed(0)
    batch, tokens, dim, p = 2, 6, 4, 0.5
    en = [torch.randn(batch, tokens, dim, generator=gen) for _ in range(2)]
    de = [torch.randn(batch, tokens, dim, generator=gen, requires_grad=True) for _ in range(2)]
    loss = hard_mining_cosine_loss(en, de, p=p, factor=0.1)
    loss.backward()
    expected_loss = 0.0
    for e, leaf in zip(en, de, strict=True):
        d = leaf.detach()
        a, b = e.flatten(1), d.flatten(1)  # per image
        na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
        cos = (a * b).sum(1, keepdim=True) / (na * nb)
        expected_loss += (1 - cos).mean() / 2
        # d(1 - cos)/db = -(a / (|a||b|) - cos · b / |b|²), averaged over images and groups
        grad = -(a / (na * nb) - cos * b / nb ** 2) / batch / 2
        grad = grad.view(batch, tokens, dim)
        dist = 1 - (e * d).sum(-1) / (e.norm(dim=-1) * d.norm(dim=-1))
        keep = int(batch * tokens * (1 - p))  # 6 of 12 tokens keep their full gradient
        thresh = dist.flatten().sort(descending=True).values[keep - 1]
        easy = dist < thresh
        assert easy.sum() == batch * tokens - keep
        grad[easy] *= 0.1
        assert torch.allclose(leaf.grad, grad, atol=1e-6)
    assert torch.allclose(loss, torch.as_tensor(expected_loss), atol=1e-6)


def test_hard_mining_off_at_p_zero():
    gen = torch.Generator().manual_seed(1)
    en = [torch.randn(2, 5, 3, generator=gen)]
    d1 = torch.randn(2, 5, 3, generator=gen, requires_grad=True)
    d2 = d1.detach().clone().requires_grad_(True)
    hard_mining_cosine_loss(en, [d1], p=0.0).backward()
    (1 - F.cosine_similarity(en[0].flatten(1), d2.flatten(1))).mean().backward()
    assert torch.allclose(d1.grad, d2.grad, atol=1e-7)


def test_linear_attention_equals_naive_reference():
    torch.manual_seed(0)
    attn = LinearAttention(12, heads=3)
    for param in attn.parameters():  # weights of order one
        torch.nn.init.normal_(param, std=0.5)
    x = torch.randn(2, 9, 12)
    b, n, c, h = 2, 9, 12, 3
    q, k, v = attn.qkv(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    weights = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)  # no 1/sqrt(d)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    ref = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_stable_adamw_matches_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(5, 4, requires_grad=True)
    ref = w.detach().clone()
    opt = StableAdamW([w], lr=0.1, betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-2, amsgrad=True)
    m = torch.zeros_like(ref)
    v = torch.zeros_like(ref)
    vmax = torch.zeros_like(ref)
    for step in range(1, 4):
        grad = torch.randn(5, 4) * (10.0 if step == 2 else 1e-3)
        w.grad = grad.clone()
        opt.step()
        ref = ref * (1 - 0.1 * 1e-2)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        vmax = torch.maximum(vmax, v)
        denom = vmax.sqrt() / math.sqrt(1 - 0.999 ** step) + 1e-10
        rms = ((grad / denom) ** 2).mean().sqrt()
        ref = ref - 0.1 / (1 - 0.9 ** step) / max(1.0, float(rms)) * m / denom
        assert torch.allclose(w.detach(), ref, atol=1e-6)


def test_lr_schedule_is_the_official_one():
    lrs = [warm_cosine_lr(s, 10000, 100, 2e-3, 2e-4) for s in (0, 1, 99, 100, 5050, 9999, 10000)]
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(2e-3 / 99)
    assert lrs[2] == pytest.approx(2e-3) and lrs[3] == pytest.approx(2e-3)
    assert lrs[4] == pytest.approx(2e-4 + 0.5 * 1.8e-3 * (1 + math.cos(math.pi * 4950 / 9900)))
    assert lrs[5] == pytest.approx(2e-4, abs=1e-9) and lrs[6] == 2e-4


def test_random_encoder_layers_differ():
    """LayerScale trap: DINOv2's 1e-8 LayerScale makes a random encoder nearly the identity."""
    detector = tiny()
    encoder = detector.backbone.module
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = encoder(x, depth=10)
        en, _ = detector.features(x)
    targets = [hidden[i] for i in detector.target_layers]
    for layer in encoder.model.encoder.layer:  # of order one, not DINOv2's 1e-8
        assert layer.layer_scale1.lambda1.abs().min() > 0.1
    for a, b in zip(targets, targets[1:], strict=False):
        assert ((a - b).norm() / a.norm()) > 0.01  # ~1e-9 with a 1e-8 LayerScale
    cos = F.cosine_similarity(en[0].flatten(1), en[1].flatten(1)).min()
    assert 1 - cos > 1e-3  # ~1e-15 with a 1e-8 LayerScale
    # the decoder is initialised with small weights but still changes the tokens
    assert detector.features(x)[1][0].shape == (2, 64, 48)


# ------------------------------------------------------------------------ official loader


@pytest.fixture(scope="module")
def vits():
    return create_detector("dinomaly", backbone="dinov2_vits14_reg", weights="random", seed=0,
                           device="cpu")


@pytest.fixture(scope="module")
def layout() -> dict[str, list[int]]:
    return json.loads(LAYOUT.read_text())["keys"]


def _random_state(layout, detector, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ours = official_state_dict(detector)
    return {k: ours[k].clone() if k.startswith("encoder.") else torch.randn(shape, generator=gen)
            for k, shape in layout.items()}


def test_official_layout_is_ours(vits, layout):
    assert len(layout) == 276
    ours = official_state_dict(vits)
    assert {k: list(v.shape) for k, v in ours.items()} == layout


def test_official_checkpoint_loads_strictly(vits, layout, tmp_path):
    state = _random_state(layout, vits)
    path = tmp_path / "model.pth"
    torch.save(state, path)
    vits.load_official(path)
    assert torch.equal(vits.bottleneck.fc1.weight, state["bottleneck.0.fc1.weight"])
    assert torch.equal(vits.decoder[7].attn.qkv.bias, state["decoder.7.attn.qkv.bias"])
    assert torch.equal(vits.decoder[3].mlp.fc2.weight, state["decoder.3.mlp.fc2.weight"])
    # and back: the official layout of what was loaded is what was saved
    back = official_state_dict(vits)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_official_checkpoint_encoder_must_match_backbone(vits, layout):
    state = _random_state(layout, vits, seed=1)
    state["encoder.blocks.3.mlp.fc1.weight"] = state["encoder.blocks.3.mlp.fc1.weight"] + 1
    with pytest.raises(ValueError, match="encoder differs"):
        vits.load_official(state)
    vits.load_official(state, check_encoder=False)  # names and shapes only
    assert torch.equal(vits.bottleneck.fc2.bias, state["bottleneck.0.fc2.bias"])


@pytest.mark.parametrize("change", ["rename", "reshape", "drop", "extra", "rename_encoder"])
def test_official_checkpoint_mismatch_fails(vits, layout, change):
    state = _random_state(layout, vits, seed=2)
    before = vits.decoder[0].attn.qkv.weight.clone()
    if change == "rename":
        state["decoder.0.attn.qkv_.weight"] = state.pop("decoder.0.attn.qkv.weight")
    elif change == "reshape":
        state["decoder.0.mlp.fc1.weight"] = torch.zeros(1536, 385)
    elif change == "drop":
        del state["bottleneck.0.fc2.bias"]
    elif change == "extra":
        state["decoder.8.norm1.weight"] = torch.ones(384)
    else:
        state["encoder.blocks.0.attn.qkvx.weight"] = state.pop("encoder.blocks.0.attn.qkv.weight")
    with pytest.raises(ValueError, match="official Dinomaly checkpoint"):
        vits.load_official(state)
    assert torch.equal(vits.decoder[0].attn.qkv.weight, before)  # nothing changed


def test_official_loader_builds_a_detector(layout, vits):
    state = _random_state(layout, vits, seed=3)
    detector = load_official_dinomaly(state, backbone="dinov2_vits14_reg", weights="random")
    assert torch.equal(detector.decoder[5].norm2.weight, state["decoder.5.norm2.weight"])


def test_real_weights_vitb():
    """Needs dinov2_vitb14_reg4_pretrain.pth in a local cache (nothing is downloaded)."""
    try:
        detector = create_detector("dinomaly", backbone="dinov2_vitb14_reg", device="cpu")
    except WeightsNotFoundError as error:
        pytest.skip(f"missing dinov2_vitb14_reg4_pretrain.pth: {error}")
    x = torch.zeros(1, 3, 392, 392)
    scores, maps = detector.predict_batch(x)
    assert maps.shape == (1, 256, 256) and torch.isfinite(scores).all()
