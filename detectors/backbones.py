"""Frozen feature backbones, always loaded from weights the user has on disk.

Two families serve the bundled detectors:

- DINOv2 with registers, ViT-S/14, B/14 and L/14 (Dinomaly), as transformers'
  `Dinov2WithRegistersModel`. Accepted weights: the official torch-hub checkpoints
  (`dinov2_vit{s,b,l}14_reg4_pretrain.pth`, converted by key mapping: the fused `attn.qkv` splits
  into q/k/v), a Hugging Face snapshot folder or its `model.safetensors`, or a `.safetensors`
  file holding the hub keys.
- WideResNet-50-2 (CRAS, RealNet) from torchvision, cut after the deepest layer a detector asks
  for: CRAS uses layers 2 and 3 only, so `layer4` and the classifier are never run; RealNet
  reads layers 1–4 (`build_backbone(..., layers=("layer1", …, "layer4"))`).

Nothing is ever downloaded. `weights` is a file or folder path; when it is None the usual caches
are searched (`$CURATE_WEIGHTS`, torch hub's `checkpoints/`, the Hugging Face hub cache) and a
missing file is one line naming the file and every place looked. `weights="random"` builds a
seeded random network — for tests and speed benchmarks only; its features mean nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .errors import DetectorConfigError

if TYPE_CHECKING:  # imported where used: torchvision and transformers load slowly
    from torchvision.models import ResNet
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

__all__ = [
    "BACKBONES",
    "Backbone",
    "DinoV2Encoder",
    "WeightsNotFoundError",
    "WideResNetFeatures",
    "build_backbone",
    "file_sha256",
    "hub_to_transformers",
    "torchvision_wide_resnet",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(FileNotFoundError):
    """A weight file the user asked for (or that the cache should hold) is not there."""


@dataclass(frozen=True)
class _DinoSize:
    hidden: int
    layers: int
    heads: int
    hub_file: str | None  # torch-hub checkpoint name
    hf_repo: str | None  # Hugging Face model id (its cache folder name)


_DINO = {
    "dinov2_vits14_reg": _DinoSize(384, 12, 6, "dinov2_vits14_reg4_pretrain.pth",
                                   "facebook/dinov2-with-registers-small"),
    "dinov2_vitb14_reg": _DinoSize(768, 12, 12, "dinov2_vitb14_reg4_pretrain.pth",
                                   "facebook/dinov2-with-registers-base"),
    "dinov2_vitl14_reg": _DinoSize(1024, 24, 16, "dinov2_vitl14_reg4_pretrain.pth",
                                   "facebook/dinov2-with-registers-large"),
    # Test-only size: twelve blocks (Dinomaly taps blocks 2..9) at a width that runs in
    # milliseconds on a CPU. Random weights only.
    "dinov2_tiny_reg": _DinoSize(48, 12, 3, None, None),
}

# torchvision's file names for the ImageNet weights (V1 is what CRAS and RealNet were trained with).
_WRN_FILES = ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth",
              "wide_resnet50_2-32ee1156.pth")

BACKBONES = (*_DINO, "wide_resnet50_2", "wide_resnet_tiny")


# ----------------------------------------------------------------------------------- weights


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("CURATE_WEIGHTS"):
        dirs.append(Path(os.environ["CURATE_WEIGHTS"]))
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    dirs.append(torch_home / "hub" / "checkpoints")
    return dirs


def _hf_snapshots(repo_id: str) -> list[Path]:
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    folder = hub / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return sorted(folder.glob("*")) if folder.is_dir() else []


def _find_weights(name: str, files: tuple[str, ...], hf_repo: str | None) -> Path:
    looked = []
    for folder in _cache_dirs():
        for file in files:
            candidate = folder / file
            looked.append(str(candidate))
            if candidate.is_file():
                return candidate
    if hf_repo:
        for snapshot in _hf_snapshots(hf_repo):
            if (snapshot / "model.safetensors").is_file():
                return snapshot
        looked.append(f"Hugging Face cache for {hf_repo}")
    raise WeightsNotFoundError(
        f"no weights for backbone {name!r}: looked for {', '.join(looked)}; "
        "pass weights=PATH (nothing is downloaded)"
    )


def _resolve(name: str, weights, files: tuple[str, ...], hf_repo: str | None) -> Path:
    if weights is None:
        return _find_weights(name, files, hf_repo)
    path = Path(weights).expanduser()
    if path.is_dir():
        for file in (*files, "model.safetensors"):
            if (path / file).is_file():
                return path if file == "model.safetensors" else path / file
        raise WeightsNotFoundError(
            f"no weights for backbone {name!r} in folder {path}: expected one of "
            f"{', '.join((*files, 'model.safetensors'))}"
        )
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file for backbone {name!r} not found: {path}")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


# ------------------------------------------------------------------------------------ DINOv2


def _dino_config(size: _DinoSize) -> Dinov2WithRegistersConfig:
    from transformers import Dinov2WithRegistersConfig

    # attn_implementation is a keyword every transformers config takes (its __post_init__ reads
    # it), but the dataclass signature the stubs give lists only the model's own fields.
    return Dinov2WithRegistersConfig(  # type: ignore[call-arg]
        hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
        mlp_ratio=4, image_size=518, patch_size=14, num_register_tokens=4, qkv_bias=True,
        layerscale_value=1.0, layer_norm_eps=1e-6, attn_implementation="sdpa",
    )


def hub_to_transformers(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an official torch-hub DINOv2 state dict to `model`'s (transformers) keys.

    transformers renamed the attention projections between 4.x (`attention.attention.query`,
    `attention.output.dense`) and 5.x (`attention.q_proj`, `attention.o_proj`); the names are
    read off `model` so either works.
    """
    target = set(model.state_dict())
    five = "encoder.layer.0.attention.q_proj.weight" in target
    q, k, v, o = (("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
                  if five else ("attention.attention.query", "attention.attention.key",
                                "attention.attention.value", "attention.output.dense"))
    fixed = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "register_tokens": "embeddings.register_tokens",
        "mask_token": "embeddings.mask_token",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    inner = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "attn.proj": o}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in fixed:
            new = fixed[key]
            # The hub stores mask_token as (1, C); transformers keeps the same shape.
            out[new] = value
            continue
        parts = key.split(".")
        if parts[0] != "blocks":
            raise KeyError(f"unexpected key in DINOv2 hub checkpoint: {key}")
        block, rest = parts[1], ".".join(parts[2:])
        prefix = f"encoder.layer.{block}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, chunk in zip((q, k, v), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}{name}.{kind}"] = chunk.contiguous()
        elif rest in ("ls1.gamma", "ls2.gamma"):
            out[f"{prefix}layer_scale{rest[2]}.lambda1"] = value
        else:
            head, kind = rest.rsplit(".", 1)
            if head not in inner:
                raise KeyError(f"unexpected key in DINOv2 hub checkpoint: {key}")
            out[f"{prefix}{inner[head]}.{kind}"] = value
    return out


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int, *,
                          antialias: bool, offset: float) -> torch.Tensor:
    """Resample DINOv2's (1, 1 + S*S, C) position table to a grid_h × grid_w patch grid.

    Follows the DINOv2 code exactly: bicubic with `scale_factor = (grid + offset) / S`. The hub
    models use offset 0 with antialiasing (what transformers does); Dinomaly's encoder was built
    with offset 0.1 and no antialiasing, so its features are reproduced only with those settings.
    """
    cls, patch = pos_embed[:, :1], pos_embed[:, 1:]
    side = int(math.sqrt(patch.shape[1]))
    if side == grid_h == grid_w:
        return pos_embed
    dim = patch.shape[-1]
    grid = patch.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((grid_h + offset) / side, (grid_w + offset) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    if grid.shape[-2:] != (grid_h, grid_w):
        raise ValueError(f"position grid {tuple(grid.shape[-2:])} != {(grid_h, grid_w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos_embed.dtype)
    return torch.cat((cls, grid), dim=1)


class DinoV2Encoder(nn.Module):
    """A frozen DINOv2-with-registers ViT that returns the raw outputs of its first blocks.

    `forward(x, depth)` runs only blocks 0..depth-1 (Dinomaly needs 10 of 12) and returns their
    token sequences (B, 1 + registers + patches, C), before the final LayerNorm, as the official
    `blocks[i](x)` loop gives them. Position tables are interpolated once per input size and
    cached (the official code re-interpolates on every forward).
    """

    def __init__(self, model: Dinov2WithRegistersModel, *, pos_antialias: bool = True,
                 pos_offset: float = 0.0):
        super().__init__()
        self.model = model
        config = model.config
        self.embed_dim = config.hidden_size
        if not isinstance(config.patch_size, int):  # transformers also takes (height, width)
            raise ValueError(f"DINOv2 patches are square, not {config.patch_size}")
        self.patch_size = config.patch_size
        self.num_blocks = config.num_hidden_layers
        self.num_prefix_tokens = 1 + config.num_register_tokens
        self.pos_antialias = pos_antialias
        self.pos_offset = pos_offset
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: never leaves eval mode
        return super().train(False)

    def _pos(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        table = self.model.embeddings.position_embeddings
        key = (grid_h, grid_w, like.device, like.dtype, table.data_ptr(), table._version)
        cached = self._pos_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = interpolate_pos_embed(table, grid_h, grid_w, antialias=self.pos_antialias,
                                               offset=self.pos_offset).to(like.dtype)
            self._pos_cache = {key: cached}
        return cached

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + positions + registers (no masking, no dropout)."""
        emb = self.model.embeddings
        batch, _, height, width = x.shape
        patches = emb.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((emb.cls_token.expand(batch, -1, -1).to(patches.dtype), patches), dim=1)
        tokens = tokens + self._pos(height // self.patch_size, width // self.patch_size, tokens)
        registers = emb.register_tokens.expand(batch, -1, -1).to(tokens.dtype)
        return torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)

    def forward(self, x: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        depth = self.num_blocks if depth is None else depth
        hidden = self.tokens(x)
        outputs = []
        for layer in self.model.encoder.layer[:depth]:
            hidden = layer(hidden)
            outputs.append(hidden)
        return outputs


def _build_dino(name: str, weights, seed: int, pos_antialias: bool, pos_offset: float
                ) -> tuple[DinoV2Encoder, Path | None]:
    from transformers import Dinov2WithRegistersModel

    size = _DINO[name]
    config = _dino_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2WithRegistersModel(config)
    if weights == "random":
        return DinoV2Encoder(model, pos_antialias=pos_antialias, pos_offset=pos_offset), None
    if size.hub_file is None:
        raise DetectorConfigError(f"backbone {name!r} is a test-only size: use weights='random'")
    path = _resolve(name, weights, (size.hub_file,), size.hf_repo)
    state = _read_state_dict(path)
    if "blocks.0.attn.qkv.weight" in state:
        state = hub_to_transformers(state, model)
    else:  # Hugging Face layout; its snapshot keys may carry the model prefix
        state = {k.removeprefix("dinov2_with_registers."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise DetectorConfigError(
            f"{path}: not a {name} checkpoint ({str(error).splitlines()[0]})") from None
    return DinoV2Encoder(model, pos_antialias=pos_antialias, pos_offset=pos_offset), path


# -------------------------------------------------------------------------------- WideResNet


class WideResNetFeatures(nn.Module):
    """WideResNet-50-2's stem and the layers up to the deepest one asked for; `forward` returns
    the outputs of `layers` in order (default: (layer2, layer3), what CRAS uses — layer 4 is then
    not even kept). RealNet asks for all four."""

    LAYERS = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, resnet: ResNet, layers: tuple[str, ...] = ("layer2", "layer3")):
        super().__init__()
        layers = tuple(layers)
        if not layers or any(name not in self.LAYERS for name in layers) or \
                list(layers) != sorted(set(layers), key=self.LAYERS.index):
            raise ValueError(f"layers must be distinct, ordered names from {self.LAYERS}, "
                             f"not {layers}")
        self.layers = layers
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.depth = self.LAYERS.index(layers[-1]) + 1
        for name in self.LAYERS[:self.depth]:
            setattr(self, name, getattr(resnet, name))
        self.channels = tuple(getattr(self, name)[-1].conv3.out_channels for name in layers)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen, BatchNorm statistics included
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        out = []
        for name in self.LAYERS[:self.depth]:
            x = getattr(self, name)(x)
            if name in self.layers:
                out.append(x)
        return tuple(out)


def torchvision_wide_resnet(name: str) -> ResNet:
    """A freshly initialised torchvision ResNet for the WideResNet backbone `name`."""
    from torchvision.models import resnet

    if name == "wide_resnet_tiny":
        # Same output channels as WRN-50-2 (512, 1024) with one narrow block per stage.
        return resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], width_per_group=8)
    return resnet.wide_resnet50_2(weights=None)


def _build_wrn(name: str, weights, seed: int, layers: tuple[str, ...]
               ) -> tuple[WideResNetFeatures, Path | None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision_wide_resnet(name)
    if weights == "random":
        return WideResNetFeatures(model, layers), None
    if name == "wide_resnet_tiny":
        raise DetectorConfigError(
            "backbone 'wide_resnet_tiny' is a test-only size: use weights='random'")
    path = _resolve(name, weights, _WRN_FILES, None)
    state = _read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise DetectorConfigError(
            f"{path}: not a {name} checkpoint ({str(error).splitlines()[0]})") from None
    return WideResNetFeatures(model, layers), path


# ---------------------------------------------------------------------------------- public


@dataclass
class Backbone:
    """A built backbone and the provenance a saved detector records."""

    name: str
    module: DinoV2Encoder | WideResNetFeatures
    weights: str  # the file or folder loaded, or "random"
    sha256: str  # of the weight file ("random:<seed>" for random weights)

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights, "sha256": self.sha256}

    @property
    def dino(self) -> DinoV2Encoder:
        """`module`, for a detector that runs on DINOv2 backbones only."""
        if not isinstance(self.module, DinoV2Encoder):
            raise TypeError(f"backbone {self.name!r} is not a DINOv2")
        return self.module

    @property
    def wide_resnet(self) -> WideResNetFeatures:
        """`module`, for a detector that runs on WideResNet backbones only."""
        if not isinstance(self.module, WideResNetFeatures):
            raise TypeError(f"backbone {self.name!r} is not a WideResNet")
        return self.module


def build_backbone(name: str, weights=None, *, seed: int = 0, pos_antialias: bool = True,
                   pos_offset: float = 0.0, layers: tuple[str, ...] = ("layer2", "layer3")
                   ) -> Backbone:
    """Build backbone `name` (one of BACKBONES) from `weights` (path, None = caches, "random").
    `layers`: the WideResNet layers `forward` returns (ignored for DINOv2)."""
    module: DinoV2Encoder | WideResNetFeatures
    if name in _DINO:
        module, path = _build_dino(name, weights, seed, pos_antialias, pos_offset)
    elif name in ("wide_resnet50_2", "wide_resnet_tiny"):
        module, path = _build_wrn(name, weights, seed, tuple(layers))
    else:
        raise DetectorConfigError(
            f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if path is None:
        return Backbone(name, module, "random", f"random:{seed}")
    file = path / "model.safetensors" if path.is_dir() else path
    return Backbone(name, module, str(path), file_sha256(file))
