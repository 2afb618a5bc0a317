"""Patch descriptors for SSFilter's mutual scoring: weight-free ones, and bundled backbones.

A descriptor turns a batch of images into one feature vector per patch of a fixed grid:
``describe(images) -> (B, P, D)`` float32, with ``images`` a list of H×W (grey) or H×W×3 (RGB)
uint8 arrays. Every image is first resized to ``image_size`` × ``image_size`` (aspect ratio not
kept: patches are compared by content, not shape).

- ``randconv`` (default, needs no weights): a fixed random convolutional network (seed 0):
  3×3 convolutions with He-normal weights, ReLU and 2×2 average pooling, 32-64-128 channels,
  reflection padding (zero padding marks every border patch as unlike the rest), on the grey
  image with its slowly varying illumination divided out (log(I + 8) − log(blur₈(I) + 8)) and
  normalised to zero mean and unit variance. Each stage's output, less a ``border`` of 4 % on
  every side, is max-pooled onto an 8×8 grid (32-px cells at 256 px) and the stages are
  concatenated: 224 dimensions. Random convolutional features are a known baseline for texture
  statistics and need no weights. On MTD the illumination division and max pooling raise the
  image AUROC from 0.59 to 0.74, and the border to 0.78 (docs/ssfilter.md has the figures).
- ``texture``: a hand-crafted filter bank (band-pass differences of Gaussians at σ 1-8, gradient
  magnitude and horizontal/vertical balance at each scale, the normalised grey level), pooled per
  cell of the same 8×8 grid as mean, standard deviation, minimum and maximum: 52 dimensions.
- any name of ``detectors.backbones.BACKBONES`` with ``weights`` (a local file or folder, or
  ``"random"`` for tests): DINOv2-R per the paper's Eq. 1 — blocks {0, 3} concatenated with the
  mean of blocks {0, 3, 7}, prefix tokens dropped (16×16 patches at 224 px); WideResNet —
  layer2 and layer3 (upsampled to layer2's grid) concatenated, as PatchCore does.

An 8×8 grid for the weight-free descriptors, not 16×16: on MTD both score the same (image AUROC
0.64 vs 0.63) and the batch similarity matrix is 16 times smaller (a CPU runs 20 shufflings of
1,000 images in about a minute instead of half an hour). Backbone features are compared by
cosine, as in the paper; the weight-free ones by Euclidean distance after z-scoring each channel
over the batch (``metric``; see ``curate.stages.ssfilter.scoring.mutual_scores`` for why).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from curate.stages.ssfilter.params import DEFAULT_DESCRIPTOR

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_RGB2GRAY)
    return image


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3]


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def _standard_grey(images: Sequence[np.ndarray], size: int, flatten_sigma: float = 0
                   ) -> torch.Tensor:
    """(B, 1, size, size) grey images, each with zero mean and unit variance.

    ``flatten_sigma`` > 0 first divides out the slowly varying illumination: log(I + 8) −
    log(blur_σ(I) + 8). Exposure series and shading gradients then stop looking unusual,
    while anything smaller than about σ (cracks, holes, frayed edges) stays."""
    grey = np.stack([_resized(_grey(im), size) for im in images]).astype(np.float32)
    if flatten_sigma > 0:
        grey = np.stack([np.log(g + 8.0) - np.log(cv2.GaussianBlur(g, (0, 0), flatten_sigma) + 8.0)
                         for g in grey])
    grey -= grey.mean(axis=(1, 2), keepdims=True)
    grey /= grey.std(axis=(1, 2), keepdims=True) + 1e-6
    return torch.from_numpy(grey)[:, None]


@dataclass
class Descriptor(abc.ABC):
    """A patch descriptor; ``describe(images)`` gives (B, P, D) float32 on ``device``."""

    name: str
    image_size: int
    metric: str  # how the scorer compares patches: "cosine" or "euclidean" (see mutual_scores)
    seed: int = 0
    device: str = "cpu"
    provenance: dict[str, Any] = field(default_factory=dict)
    #: Share of an image's patches whose scores make its score, unless the user sets one: the
    #: paper's 1 % of a 16×16 grid is 2-3 patches; 5 % of the 8×8 grid is 3.
    image_ratio: float = 0.01

    @abc.abstractmethod
    def describe(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, P, D) float32 patch features of ``images``."""


class RandomConvDescriptor(Descriptor):
    widths = (32, 64, 128)
    grid = 8
    flatten_sigma = 8.0

    def __init__(self, image_size: int = 256, seed: int = 0, device: str = "cpu",
                 border: float = 0.04):
        if not 0 <= border < 0.5:
            raise ValueError(f"border must be in [0, 0.5), got {border}")
        self.border = border
        super().__init__("randconv", image_size, "euclidean", seed, device,
                         {"name": "randconv", "version": 2, "weights": "none", "seed": seed,
                          "flatten_sigma": self.flatten_sigma, "pool": "max",
                          "border": border}, image_ratio=0.05)
        gen = torch.Generator().manual_seed(seed)
        self.kernels, cin = [], 1
        for width in self.widths:
            std = (2.0 / (cin * 9)) ** 0.5
            self.kernels.append((torch.randn(width, cin, 3, 3, generator=gen) * std).to(device))
            cin = width

    @torch.no_grad()
    def describe(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        h = _standard_grey(images, self.image_size, self.flatten_sigma).to(self.device)
        outs = []
        for kernel in self.kernels:
            h = F.avg_pool2d(F.relu(F.conv2d(F.pad(h, (1, 1, 1, 1), mode="reflect"), kernel)), 2)
            # The frame is left out: crops of parts and tiles often carry a fixture edge or a
            # dark strip along one side, which is rare within a batch and outranks real defects.
            cut_h, cut_w = int(h.shape[2] * self.border), int(h.shape[3] * self.border)
            inner = h[:, :, cut_h:h.shape[2] - cut_h, cut_w:h.shape[3] - cut_w]
            # Max, not mean: a defect a few pixels wide moves a cell's maximum, not its mean.
            outs.append(F.adaptive_max_pool2d(inner, self.grid))
        feats = torch.cat(outs, dim=1)
        return feats.flatten(2).transpose(1, 2).contiguous()


class TextureDescriptor(Descriptor):
    grid = 8
    sigmas = (1, 2, 4, 8)

    def __init__(self, image_size: int = 256, seed: int = 0, device: str = "cpu"):
        super().__init__("texture", image_size, "euclidean", seed, device,
                         {"name": "texture", "weights": "none"}, image_ratio=0.05)

    def _maps(self, grey: np.ndarray) -> np.ndarray:
        maps, prev = [grey], grey
        for sigma in self.sigmas:
            blurred = cv2.GaussianBlur(grey, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
            gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, borderType=cv2.BORDER_REFLECT)
            gy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, borderType=cv2.BORDER_REFLECT)
            maps += [prev - blurred, np.sqrt(gx * gx + gy * gy), np.abs(gx) - np.abs(gy)]
            prev = blurred
        return np.stack(maps)

    @torch.no_grad()
    def describe(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        grey = _standard_grey(images, self.image_size)[:, 0].numpy()
        cells, cell = self.grid, self.image_size // self.grid
        out = []
        for image in grey:
            maps = self._maps(image)[:, :cells * cell, :cells * cell]
            c = maps.reshape(len(maps), cells, cell, cells, cell)
            out.append(np.concatenate([c.mean((2, 4)), c.std((2, 4)), c.min((2, 4)),
                                       c.max((2, 4))]))
        feats = torch.from_numpy(np.stack(out).astype(np.float32))
        return feats.flatten(2).transpose(1, 2).contiguous().to(self.device)


class BackboneDescriptor(Descriptor):
    """Patch features of a bundled backbone (detectors.backbones), frozen, in eval mode."""

    def __init__(self, name: str, weights, image_size: int = 224, seed: int = 0,
                 device: str = "cpu"):
        from detectors.backbones import build_backbone

        backbone = build_backbone(name, weights, seed=seed)
        super().__init__(name, image_size, "cosine", seed, device, backbone.describe())
        self.module = backbone.module.to(device).eval()
        self.is_vit = name.startswith("dinov2")
        if self.is_vit and image_size % vit_layout(self.module)[0]:
            raise ValueError(f"ssfilter: image_size {image_size} is not a multiple of the "
                             f"patch size {vit_layout(self.module)[0]} of {name}")

    def tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        rgb = np.stack([_resized(_rgb(im), self.image_size) for im in images])
        x = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(self.device)

    @torch.no_grad()
    def describe(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.from_tensor(self.tensor(images))

    @torch.no_grad()
    def from_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_vit:
            return vit_patch_features(self.module(x, depth=8), vit_layout(self.module)[1])
        f2, f3 = self.module(x)
        f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([f2, f3], dim=1).flatten(2).transpose(1, 2).contiguous()


def vit_layout(module: nn.Module) -> tuple[int, int]:
    """(patch size, prefix tokens: class and registers) of a DINOv2 encoder of
    ``detectors.backbones``. Checked here because a module's attributes are untyped (mypy
    sees any ``nn.Module`` attribute as a tensor or a module)."""
    patch, prefix = module.patch_size, module.num_prefix_tokens
    if not isinstance(patch, int) or not isinstance(prefix, int):
        raise TypeError(f"{type(module).__name__} is not a ViT encoder of detectors.backbones")
    return patch, prefix


def vit_patch_features(hidden: Sequence[torch.Tensor], prefix: int,
                       single: Sequence[int] = (0, 3), averaged: Sequence[int] = (0, 3, 7)
                       ) -> torch.Tensor:
    """The paper's Eq. 1: blocks ``single`` concatenated with the mean of blocks ``averaged``,
    patch tokens only: (B, P, C·(len(single) + 1))."""
    tokens = [h[:, prefix:].float() for h in hidden]
    mean = torch.stack([tokens[i] for i in averaged]).mean(dim=0)
    return torch.cat([*(tokens[i] for i in single), mean], dim=-1)


def build_descriptor(name: str = DEFAULT_DESCRIPTOR, weights=None, *, image_size: int | None = None,
                     seed: int = 0, device: str = "cpu", border: float = 0.04) -> Descriptor:
    """The descriptor ``name``: ``randconv`` / ``texture`` (no weights) or a bundled backbone.
    ``border`` (randconv): the share of each side left out of the patches."""
    if name == "randconv":
        return RandomConvDescriptor(image_size or 256, seed, device, border)
    if name == "texture":
        return TextureDescriptor(image_size or 256, seed, device)
    return BackboneDescriptor(name, weights, image_size or 224, seed, device)
