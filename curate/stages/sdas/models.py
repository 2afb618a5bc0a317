"""Model presets, one call shape for every UNet, and our checkpoint folders.

Two architectures, both predicting epsilon and a learned-range variance (``out_channels = 2 × 3``):

- ``unet2d`` (the default): diffusers' ``UNet2DModel``, the DDPM-256 layout of Ho et al.;
- ``adm``: guided-diffusion's ADM UNet (:mod:`curate.stages.sdas.adm`), the architecture of
  RealNet's released checkpoints.

A checkpoint folder written by ``curate sdas train`` holds ``model.json`` (format, architecture,
configuration, diffusion schedule, what it was trained on), ``ema.safetensors`` (the EMA weights,
used for sampling) and ``last/`` (the training state to resume from). :func:`load_model` reads
such a folder, or an official ADM ``.pt`` / ``.pth`` file (through the restricted loader).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curate.core.errors import stable_text
from curate.core.files import sha256_file
from curate.stages.sdas.adm import tiny_config
from curate.stages.sdas.checkpoints import CheckpointError, load_adm_checkpoint, load_strict

FORMAT = "curate-diffusion/1"

#: The base schedule of the issue and of RealNet: T = 1000 linear betas, learned-range variance.
DEFAULT_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear",
                    "beta_start": 1e-4, "beta_end": 0.02, "variance_type": "learned_range"}

_UNET2D_BASE = {"in_channels": 3, "out_channels": 6}
#: name -> (architecture, configuration without the image size).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # DDPM's 256 px layout (google/ddpm-*-256): attention at 16 x 16 only.
    "unet2d": ("unet2d", _UNET2D_BASE | {
        "block_out_channels": [128, 128, 256, 256, 512, 512], "layers_per_block": 2,
        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}),
    "unet2d-small": ("unet2d", _UNET2D_BASE | {
        "block_out_channels": [64, 128, 128, 256], "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}),
    "unet2d-tiny": ("unet2d", _UNET2D_BASE | {
        "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "attention_head_dim": 8,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}),
    # RealNet's ADM, unconditional (one model per category).
    "adm": ("adm", {"num_classes": None}),
    "adm-tiny": ("adm", {k: v for k, v in tiny_config().to_dict().items() if k != "image_size"}),
}


def build_model(arch: str, config: dict[str, Any], image_size: int) -> torch.nn.Module:
    """A freshly initialised UNet of ``arch`` ('unet2d' or 'adm')."""
    if arch == "unet2d":
        # diffusers.models, not diffusers: type checkers read the top-level name as the
        # placeholder diffusers defines for installs without torch.
        from diffusers.models import UNet2DModel

        return UNet2DModel(sample_size=image_size, **config)
    if arch == "adm":
        from curate.stages.sdas.adm import ADMConfig, ADMUNet

        return ADMUNet(ADMConfig.from_dict({**config, "image_size": image_size}))
    raise CheckpointError(f"unknown architecture {arch!r}; expected 'unet2d' or 'adm'")


def preset(name: str) -> tuple[str, dict[str, Any]]:
    try:
        arch, config = PRESETS[name]
    except KeyError:
        raise CheckpointError(f"unknown model preset {name!r}; presets: "
                              f"{', '.join(PRESETS)}") from None
    return arch, json.loads(json.dumps(config))


def predict(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """The raw output (epsilon | variance term) of any of our UNets."""
    from curate.stages.sdas.adm import ADMUNet

    if isinstance(model, ADMUNet):
        return model(x, t, labels)
    return model(x, t, class_labels=labels, return_dict=False)[0]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: str
    image_size: int
    num_classes: int | None
    #: sha256 of the weights file (ema.safetensors, or the official .pt).
    sha256: str
    schedule: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))
    path: str = ""


def write_model_json(folder: Path, arch: str, config: dict[str, Any], image_size: int,
                     extra: dict[str, Any] | None = None) -> None:
    from curate.core.files import atomic_write_text

    doc = {"format": FORMAT, "arch": arch, "config": config, "image_size": image_size,
           "schedule": DEFAULT_SCHEDULE, **(extra or {})}
    atomic_write_text(folder / "model.json", json.dumps(doc, indent=1, sort_keys=True) + "\n")


def read_model_json(folder: Path) -> dict[str, Any]:
    path = folder / "model.json"
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a curate diffusion checkpoint (no "
                              "model.json)") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable ({stable_text(exc)})") from exc
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A model ready to sample: a ``curate sdas train`` folder or an official ADM file."""
    path = Path(path)
    if path.is_dir():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        doc = read_model_json(path)
        weights = path / "ema.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing: the training run has not saved a "
                                  "checkpoint yet")
        model = build_model(doc["arch"], doc["config"], doc["image_size"])
        try:
            state = load_file(weights)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{weights}: not a readable safetensors file "
                                  f"({stable_text(exc)}); "
                                  "expected the EMA weights `curate sdas train` saves") from None
        load_strict(model, state, str(weights))
        return LoadedModel(model.to(device).eval(), doc["arch"], doc["image_size"],
                           doc["config"].get("num_classes"), sha256_file(weights),
                           doc.get("schedule", dict(DEFAULT_SCHEDULE)), str(path))
    if path.suffix in (".pt", ".pth"):
        model, info = load_adm_checkpoint(path)
        cfg = info["config"]
        return LoadedModel(model.to(device), "adm", cfg["image_size"], cfg["num_classes"],
                           info["sha256"], dict(DEFAULT_SCHEDULE), str(path))
    raise CheckpointError(f"{path}: expected a folder written by `curate sdas train` or an "
                          "official ADM checkpoint (.pt / .pth)")
