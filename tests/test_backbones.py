"""Backbones load the official checkpoint layouts strictly, from local files only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the detectors extra (torch) is not installed")

from detectors.backbones import (  # noqa: E402
    WeightsNotFoundError,
    build_backbone,
    hub_to_transformers,
    interpolate_pos_embed,
)

LAYOUTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "checkpoint-layouts"


def _layout(name: str) -> dict[str, list[int]]:
    path = LAYOUTS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"checkpoint layout {path} is missing (../shared beside the repository)")
    data = json.loads(path.read_text())
    data.pop("meta")
    return data


def _random_hub_state(layout: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the official layout; LayerScale and norms of order 1 (see methods.md:
    a LayerScale near 1e-8 would make every block nearly the identity and hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        value = torch.randn(shape, generator=g) * 0.05
        if key.endswith("gamma") or (".norm" in key or key.startswith("norm")) and key.endswith("weight"):
            value = 1.0 + 0.2 * torch.randn(shape, generator=g)
        state[key] = value
    return state


@pytest.fixture(scope="module")
def vits_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hub") / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(_random_hub_state(_layout("dinov2_vits14_reg")), path)
    return path


def test_mapping_agrees_with_the_recorded_map():
    recorded = json.loads((LAYOUTS / "dinov2_transformers_map.json").read_text())["mapping"]
    layout = _layout("dinov2_vits14_reg")
    backbone = build_backbone("dinov2_vits14_reg", "random")
    mapped = hub_to_transformers({k: torch.zeros(v) for k, v in layout.items()},
                                 backbone.module.model)
    expected = set()
    for value in recorded.values():
        expected.update(value if isinstance(value, list) else [value])
    assert set(mapped) == expected == set(backbone.module.model.state_dict())


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov2_vitb14_reg"])
def test_hub_layout_loads_strictly(name):
    layout = _layout(name)
    backbone = build_backbone(name, "random")
    model = backbone.module.model
    state = hub_to_transformers(_random_hub_state(layout), model)
    model.load_state_dict(state, strict=True)
    n_params = sum(v.numel() for v in state.values())
    assert n_params == sum(torch.Size(s).numel() for s in layout.values())
    # The fused qkv was split in q, k, v order along the output dimension.
    hub = _random_hub_state(layout)
    q = model.encoder.layer[3].attention.k_proj.weight
    dim = q.shape[0]
    assert torch.equal(q, hub["blocks.3.attn.qkv.weight"][dim:2 * dim])


def test_hub_file_features_equal_transformers_forward(vits_checkpoint):
    backbone = build_backbone("dinov2_vits14_reg", vits_checkpoint)
    assert backbone.weights == str(vits_checkpoint) and len(backbone.sha256) == 64
    x = torch.randn(2, 3, 224, 280)  # non-square: 16 × 20 patches
    with torch.no_grad():
        ours = backbone.module(x, depth=12)
        ref = backbone.module.model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
    assert len(ours) == 12
    assert ours[0].shape == (2, 1 + 4 + 16 * 20, 384)
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # Blocks differ from each other (the LayerScale trap would make them nearly equal).
    assert (ours[2] - ours[9]).abs().mean() > 0.1


def test_depth_runs_only_the_first_blocks(vits_checkpoint):
    backbone = build_backbone("dinov2_vits14_reg", vits_checkpoint)
    x = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        full = backbone.module(x)
        ten = backbone.module(x, depth=10)
    assert len(ten) == 10 and torch.equal(ten[-1], full[9])


def test_huggingface_safetensors_folder_loads(vits_checkpoint, tmp_path):
    from safetensors.torch import save_file

    hub = build_backbone("dinov2_vits14_reg", vits_checkpoint)
    folder = tmp_path / "snapshot"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in hub.module.model.state_dict().items()},
              str(folder / "model.safetensors"))
    hf = build_backbone("dinov2_vits14_reg", folder)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(hub.module(x)[-1], hf.module(x)[-1])


def test_renamed_or_reshaped_key_is_refused(tmp_path):
    layout = _layout("dinov2_vits14_reg")
    state = _random_hub_state(layout)
    state["blocks.0.mlp.fc3.weight"] = state.pop("blocks.0.mlp.fc2.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(KeyError, match="fc3"):
        build_backbone("dinov2_vits14_reg", path)
    state = _random_hub_state(layout)
    state["norm.weight"] = torch.ones(385)
    torch.save(state, path)
    with pytest.raises(ValueError, match=str(path)):
        build_backbone("dinov2_vits14_reg", path)


def test_missing_weights_is_one_line_naming_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("CURATE_WEIGHTS", str(tmp_path / "mine"))
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone("dinov2_vitb14_reg")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "mine" / "dinov2_vitb14_reg4_pretrain.pth") in message
    assert "facebook/dinov2-with-registers-base" in message
    with pytest.raises(WeightsNotFoundError, match="nope.pth"):
        build_backbone("wide_resnet50_2", tmp_path / "nope.pth")


def test_weights_are_found_in_the_torch_hub_cache(tmp_path, monkeypatch, vits_checkpoint):
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / vits_checkpoint.name).symlink_to(vits_checkpoint)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CURATE_WEIGHTS", raising=False)
    backbone = build_backbone("dinov2_vits14_reg")
    assert backbone.weights == str(cache / vits_checkpoint.name)


def test_position_interpolation_matches_transformers_and_dinomaly_settings():
    backbone = build_backbone("dinov2_tiny_reg", "random")
    emb = backbone.module.model.embeddings
    table = emb.position_embeddings.detach()
    ours = interpolate_pos_embed(table, 28, 28, antialias=True, offset=0.0)
    dummy = torch.zeros(1, 1 + 28 * 28, table.shape[-1])
    assert torch.allclose(ours, emb.interpolate_pos_encoding(dummy, 392, 392), atol=1e-6)
    # Dinomaly's encoder: offset 0.1, no antialias — a different (and reproducible) table.
    dinomaly = interpolate_pos_embed(table, 28, 28, antialias=False, offset=0.1)
    assert dinomaly.shape == ours.shape and not torch.allclose(dinomaly, ours, atol=1e-4)
    grid = table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    manual = torch.nn.functional.interpolate(grid, scale_factor=(28.1 / 37, 28.1 / 37),
                                             mode="bicubic", antialias=False)
    assert torch.allclose(dinomaly[:, 1:], manual.permute(0, 2, 3, 1).reshape(1, 784, -1))


def test_wide_resnet_features_are_torchvision_layers_two_and_three(tmp_path):
    from torchvision.models import wide_resnet50_2
    from torchvision.models.feature_extraction import create_feature_extractor

    reference = wide_resnet50_2(weights=None).eval()
    with torch.no_grad():
        for module in reference.modules():  # BatchNorm statistics away from the identity
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "wide_resnet50_2-95faca4d.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("wide_resnet50_2", path)
    module = backbone.module
    assert not hasattr(module, "layer4") and not hasattr(module, "fc")
    extractor = create_feature_extractor(reference, {"layer2": "f2", "layer3": "f3"})
    x = torch.randn(1, 3, 96, 128)
    module.train()  # stays frozen: BatchNorm keeps its running statistics
    with torch.no_grad():
        f2, f3 = module(x)
        ref = extractor(x)
    assert torch.allclose(f2, ref["f2"], atol=1e-5) and torch.allclose(f3, ref["f3"], atol=1e-5)
    assert module.channels == (512, 1024) and not module.training


def test_test_only_sizes_need_random_weights(tmp_path):
    with pytest.raises(ValueError, match="test-only"):
        build_backbone("dinov2_tiny_reg", tmp_path / "x.pth")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet18", "random")


def test_random_backbones_are_seeded():
    a = build_backbone("wide_resnet_tiny", "random", seed=1)
    b = build_backbone("wide_resnet_tiny", "random", seed=1)
    c = build_backbone("wide_resnet_tiny", "random", seed=2)
    wa, wb, wc = (m.module.layer2[0].conv1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.sha256 == "random:1"


def test_a_detector_reaching_for_the_wrong_kind_of_backbone_is_told_which_it_got():
    wrn = build_backbone("wide_resnet_tiny", "random")
    vit = build_backbone("dinov2_tiny_reg", "random")
    assert wrn.wide_resnet is wrn.module and vit.dino is vit.module
    with pytest.raises(TypeError, match="'wide_resnet_tiny' is not a DINOv2"):
        _ = wrn.dino
    with pytest.raises(TypeError, match="'dinov2_tiny_reg' is not a WideResNet"):
        _ = vit.wide_resnet
