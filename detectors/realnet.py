"""RealNet — feature reconstruction with anomaly-aware features selection (see docs/methods.md,
"RealNet's SDAS", and the paper, Sections 3.2–3.4).

Frozen WideResNet-50-2 layers 1–4 (strides 4, 8, 16, 32: 64², 32², 16², 8² at 256 px).

- AFS (anomaly-aware features selection): once, before training, `afs_batches` batches of
  synthetic anomalies A (with their normal originals I and masks M) are run through the
  backbone; for every channel i of layer k, L = mean over pixels of (F([φ_ki(A) − φ_ki(I)]²) −
  M)², F a min–max normalisation per channel over the batch and M brought to the layer's grid
  (nearest). The m_k channels with the smallest L, summed over the batches, are kept (sorted
  indices, stored as buffers: save/load keep them). Defaults m = (256, 512, 512, 256).
- One reconstruction network per layer (architecture A: no alignment across layers), a UNet of
  GroupNorm–SiLU–conv residual blocks with self-attention at the lower resolutions, maps the
  selected features of A to those of I: L_recon = Σ_k MSE(G_k(φ_k(A)), φ_k(I)).
- RRS (reconstruction residuals selection): residuals E_k = (φ_k(A) − G_k(φ_k(A)))², upsampled
  to the finest grid (bilinear, corners aligned) and concatenated; a BatchNorm without affine
  ranks them; per image the r/2 channels with the largest spatial maximum and the r/2 with the
  largest spatial mean (of the normalised residuals) are gathered from the raw residuals
  (r = 512, a third of 1536).
- The discriminator (residual stack, convolutions, ×2 upsampling, then up to the image) gives two
  logits per pixel; L_seg = cross entropy with M. Loss = L_recon + L_seg, Adam (lr 1e-4).
- Training batches: half the images stay normal, half get a synthetic anomaly — a Perlin mask
  (scales 2^k, k ∈ 0..5 per axis, rotation, threshold 0.5) times the foreground mask, blended
  A = (1 − M)·I + (1 − δ)·M·I + δ·M·P with δ ~ U(0.5, 1) and P a random image of the `bank`
  folder (SDAS / SIA images) or, with no bank, a procedural texture (`detectors.synthesis`).
- Anomaly map: softmax probability of the anomalous class at the input resolution; image score:
  maximum of the map after a 16×16 mean filter (stride 1), as the official evaluation does.

What differs from the authors' code, and why (their code is only read, nothing is copied):

- Blending is done on the normalised input tensor (the blend is affine and the normalisation is
  per channel, so it is the same formula) and is not rounded to uint8 in between; the official
  code truncates the blended image to uint8 before normalising.
- AFS makes one pass over `afs_batches` batches for all layers; the official code draws fresh
  batches for each block. Layers whose every channel is kept (layers 1 and 2 at the defaults)
  need no statistics and are skipped (the result, all channels in order, is the same).
- Every random draw comes from seeded generators (one numpy generator per sample, keyed by seed,
  epoch and index); the official code uses global RNGs and imgaug.
- The residual-stack and attention arithmetic are the same functions written with PyTorch's
  fused attention; residuals and the RRS BatchNorm are computed in float32 under bf16 autocast.
- The frozen backbone's BatchNorms are folded into its convolutions (same function, faster), and
  the features of the normal images of a batch are reused for its unchanged (normal) samples.
- No checkpoint is selected on test metrics: the last state is kept (the official trainer
  validates on the test set every 5 epochs and keeps the best).
- The official backbone is timm's `wide_resnet50_2`; here torchvision's layout is used (the same
  parameter names). `load_official_realnet` loads the checkpoint's own backbone tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    WideResNetFeatures,
    file_sha256,
    torchvision_wide_resnet,
)
from .base import Detector, Geometry, ImageLike, _as_array
from .errors import DetectorConfigError
from .layers import (
    AttentionBlock,
    ResBlockBase,
    fuse_batchnorm,
    group_norm,
    skip_connection,
    zero_module,
)
from .synthesis import anomaly_mask, list_bank, procedural_texture

LAYERS = ("layer1", "layer2", "layer3", "layer4")
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}

# --------------------------------------------------------------------- reconstruction UNet


class _ConvUp(nn.Module):
    """×2 upsampling by a 4×4 transposed convolution (stride 2, padding 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResBlock(ResBlockBase):
    """GroupNorm → SiLU → 3×3 conv, plus a skip (identity, or a 1×1 conv when the width
    changes). `up` / `down` resample both paths between the activation and the convolution
    (transposed conv / 2×2 average pooling)."""

    def __init__(self, channels: int, out_channels: int | None = None, *, up: bool = False,
                 down: bool = False, groups: int = 32):
        out_channels = out_channels or channels
        resample: Callable[[], nn.Module] | None = None
        if up:
            resample = partial(_ConvUp, channels)
        elif down:
            resample = partial(nn.AvgPool2d, 2)
        super().__init__(channels, out_channels, partial(group_norm, groups=groups), resample)
        self.skip_connection = skip_connection(channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, x = self.input_half(x)
        return self.skip_connection(x) + h


class ReconstructionUNet(nn.Module):
    """One layer's reconstruction network G_k: in_channels → in_channels at the same grid.

    Base width `model_channels`, `num_res_blocks` residual blocks per level at widths
    `channel_mult`·base, a down-sampling residual block between levels, attention at the
    down-sampling factors in `attention_mult`, a middle block (res, attention, res), the mirrored
    decoder with skip connections, and GroupNorm → SiLU → zero-initialised 3×3 conv out.
    """

    def __init__(self, in_channels: int, model_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, attention_mult: Sequence[int], head_channels: int,
                 groups: int):
        super().__init__()

        def attention(width: int) -> AttentionBlock:
            return AttentionBlock(width, partial(group_norm, groups=groups),
                                  num_head_channels=head_channels)

        ch = first = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([nn.Conv2d(in_channels, ch, 3, padding=1)])
        skips = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, int(mult * model_channels), groups=groups)]
                ch = int(mult * model_channels)
                if ds in attention_mult:
                    layers.append(attention(ch))
                self.input_blocks.append(nn.Sequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(ResBlock(ch, ch, down=True, groups=groups))
                skips.append(ch)
                ds *= 2
        self.middle_block = nn.Sequential(ResBlock(ch, groups=groups),
                                          attention(ch),
                                          ResBlock(ch, groups=groups))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), int(model_channels * mult), groups=groups)]
                ch = int(model_channels * mult)
                if ds in attention_mult:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, ch, up=True, groups=groups))
                    ds //= 2
                self.output_blocks.append(nn.Sequential(*layers))
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(first, in_channels, 3, padding=1)))
        self.levels = len(channel_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h)
            skips.append(h)
        h = self.middle_block(h)
        for module in self.output_blocks:
            h = module(torch.cat((h, skips.pop()), dim=1))
        return self.out(h)


# --------------------------------------------------------------------------- RRS + head


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self._block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1,
                                                         bias=False),
                                    nn.ReLU(), nn.Conv2d(channels, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._block(x)


class _ResidualStack(nn.Module):
    def __init__(self, channels: int, layers: int):
        super().__init__()
        self._layers = nn.ModuleList(_Residual(channels) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._layers:
            x = layer(x)
        return F.relu(x)


class RRS(nn.Module):
    """Reconstruction residuals selection and the segmentation head (the "discriminator")."""

    def __init__(self, channels: int, modes: Sequence[str], numbers: Sequence[int],
                 residual_layers: int):
        super().__init__()
        for mode in modes:
            if mode not in ("max", "mean"):
                raise DetectorConfigError(f"realnet: RRS modes are 'max' and 'mean', not {mode!r}")
        if len(modes) != len(numbers) or not modes:
            raise DetectorConfigError("realnet: rrs_modes and rrs_numbers must have one entry each")
        if sum(numbers) > channels:
            raise DetectorConfigError(
                f"realnet: RRS keeps {sum(numbers)} residuals of only {channels}")
        self.modes, self.numbers = tuple(modes), tuple(int(n) for n in numbers)
        total = sum(self.numbers)
        self.bn_idx = nn.BatchNorm2d(channels, momentum=0.9, affine=False)
        self.decoder1 = nn.Sequential(_ResidualStack(total, residual_layers),
                                      nn.Conv2d(total, 128, 3, padding=1), nn.BatchNorm2d(128),
                                      nn.ReLU())
        self.decoder2 = nn.Sequential(nn.Conv2d(128, 32, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 8, 3, padding=1), nn.ReLU())
        self.decoder3 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 2, 3, padding=1))

    def select(self, residual: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) global residual → per image the channel indices kept (B, r): for each
        mode the largest spatial max / mean of the BatchNorm-normalised residuals."""
        normed = self.bn_idx(residual)
        with torch.no_grad():
            flat = normed.detach().flatten(2)
            picks = []
            for mode, k in zip(self.modes, self.numbers, strict=True):
                stat = flat.amax(dim=-1) if mode == "max" else flat.mean(dim=-1)
                picks.append(stat.topk(k, dim=1, largest=True, sorted=True).indices)
        return torch.cat(picks, dim=1)

    def forward(self, residuals: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Per-layer residuals (B, C_k, H_k, W_k) → logits (B, 2, *size)."""
        grid = residuals[0].shape[-2:]
        residual = torch.cat([r if r.shape[-2:] == grid else
                              F.interpolate(r, size=grid, mode="bilinear", align_corners=True)
                              for r in residuals], dim=1).float()
        index = self.select(residual)
        height, width = grid
        chosen = residual.gather(1, index[:, :, None, None].expand(-1, -1, height, width))
        h = self.decoder2(self.decoder1(chosen))
        h = F.interpolate(h, size=(2 * height, 2 * width), mode="bilinear", align_corners=True)
        logits = self.decoder3(h)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


class FeatureSelection(nn.Module):
    """AFS state: the kept channel indices of every layer (sorted) and whether they were chosen
    (before that, the first m_k channels)."""

    selected: torch.Tensor  # a boolean buffer, like the per-layer index buffers

    def __init__(self, layers: Sequence[str], channels: Sequence[int], kept: Sequence[int]):
        super().__init__()
        self.layers = tuple(layers)
        for layer, c, m in zip(layers, channels, kept, strict=True):
            if not 0 < m <= c:
                raise DetectorConfigError(f"realnet: AFS keeps {m} of the {c} channels of {layer}")
            self.register_buffer(layer, torch.arange(int(m)))
        self.register_buffer("selected", torch.tensor(False))
        self.all_channels = [m == c for c, m in zip(channels, kept, strict=True)]

    def indices(self) -> list[torch.Tensor]:
        return [getattr(self, layer) for layer in self.layers]

    def select(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every layer's features reduced to its kept channels."""
        return [f if full else f.index_select(1, index)
                for f, index, full in zip(features, self.indices(), self.all_channels,
                                          strict=True)]


def feature_grid(size: int, layer: str) -> int:
    """Side of a WRN layer's grid for a size×size input."""
    side = (size + 2 * 3 - 7) // 2 + 1  # conv1, stride 2
    side = (side + 2 - 3) // 2 + 1  # max-pool, stride 2 (layer 1 keeps it)
    for _ in range(LAYERS.index(layer)):  # layers 2..4 halve it
        side = (side + 2 - 3) // 2 + 1
    return side


# ------------------------------------------------------------------------- training data


def _normalise(image: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 3×H×W ImageNet-normalised float."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def _foreground_at(mask, geometry: Geometry, height: int, width: int) -> np.ndarray | None:
    """A foreground mask (array or image path; None = everything) → bool over the crop."""
    import cv2

    from .data import read_mask

    if mask is None:
        return None
    mask = read_mask(mask) if isinstance(mask, (str, Path)) else np.asarray(mask) > 0
    if mask.shape != (height, width):
        raise ValueError(f"foreground mask {mask.shape} does not match its image "
                         f"{(height, width)}")
    top, left, rh, rw = geometry.crop_box(height, width)
    if (rh, rw) != (height, width):
        mask = cv2.resize(mask.astype(np.uint8), (rw, rh), interpolation=cv2.INTER_NEAREST) > 0
    return mask[top:top + geometry.crop, left:left + geometry.crop]


class SyntheticAnomalies(torch.utils.data.Dataset):
    """Normal images and their synthetic-anomaly versions (RealNet's training samples).

    Item `index` → (I, A, M, anomalous): I the normalised image, A = I with a blended anomaly
    (or I itself for a normal sample, chosen with probability 1 − `anomaly_ratio`), M the mask
    (1, S, S) float, anomalous whether M has any pixel. Every draw comes from a numpy generator
    keyed by (seed, stream, epoch, index), so results do not depend on workers or order.
    """

    def __init__(self, images: Sequence[ImageLike], geometry: Geometry, options: Mapping,
                 *, seed: int, stream: int, foregrounds: Sequence | None = None,
                 bank: Sequence[Path] | None = None, anomaly_ratio: float | None = None):
        self.images, self.geometry, self.options = images, geometry, dict(options)
        self.seed, self.stream, self.epoch = int(seed), int(stream), 0
        self.foregrounds = foregrounds
        self.bank = list(bank or [])
        self.anomaly_ratio = float(options["anomaly_ratio"] if anomaly_ratio is None
                                   else anomaly_ratio)

    def __len__(self) -> int:
        return len(self.images)

    def source(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """The anomaly source P: a random bank image resized to size×size, or a texture."""
        import cv2

        from .data import read_image

        if self.bank:
            image = read_image(self.bank[int(rng.integers(len(self.bank)))])
            return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        return procedural_texture((size, size), rng)

    def __getitem__(self, index: int):
        o = self.options
        rng = np.random.default_rng([self.seed, self.stream, self.epoch, int(index)])
        array = _as_array(self.images[index])
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        x = self.geometry.to_input(array)
        size = self.geometry.crop
        mask = np.zeros((size, size), bool)
        a = x
        if rng.random() < self.anomaly_ratio:
            fg = None
            if self.foregrounds is not None:
                fg = _foreground_at(self.foregrounds[index], self.geometry, *array.shape[:2])
            mask = anomaly_mask((size, size), rng, fg, min_scale=int(o["min_perlin_scale"]),
                                max_scale=int(o["perlin_scale"]),
                                threshold=float(o["perlin_threshold"]))
            delta = float(rng.uniform(*o["delta_range"]))
            p = _normalise(self.source(rng, size))
            m = torch.from_numpy(mask.astype(np.float32))[None]
            # (1 − M)·I + (1 − δ)·M·I + δ·M·P, on the normalised tensors (same formula)
            a = x + (delta * m) * (p - x)
        return x, a, torch.from_numpy(mask.astype(np.float32))[None], bool(mask.any())


# ------------------------------------------------------------------------------ detector


def build_modules(options: Mapping[str, Any], channels: Sequence[int]
                  ) -> tuple[FeatureSelection, nn.ModuleDict, RRS]:
    """RealNet's learned state for `options` over backbone layers of `channels`: the AFS
    indices, one reconstruction UNet per layer (`block1`, …) and the RRS head."""
    o = options
    kept = [int(m) for m in o["afs_channels"]]
    afs = FeatureSelection(tuple(o["layers"]), channels, kept)
    groups = int(o["norm_groups"])
    recon = nn.ModuleDict({
        f"block{i + 1}": ReconstructionUNet(
            m, int(float(o["hide_channels_ratio"]) * m), [int(c) for c in o["channel_mult"]],
            int(o["num_res_blocks"]), [int(a) for a in o["attention_mult"]],
            int(o["num_head_channels"]), groups)
        for i, m in enumerate(kept)})
    rrs = RRS(sum(kept), o["rrs_modes"], o["rrs_numbers"], int(o["rrs_residual_layers"]))
    return afs, recon, rrs


class RealNet(Detector):
    name = "realnet"
    default_backbone = "wide_resnet50_2"
    backbones = ("wide_resnet50_2", "wide_resnet_tiny")
    defaults = {
        "image_size": 256,  # resize to a square, no crop (paper / official config)
        "layers": list(LAYERS),
        "afs_channels": [256, 512, 512, 256],  # m_k, channels kept per layer
        "afs_batches": 64,  # batches of synthetic anomalies for AFS
        "hide_channels_ratio": 0.5,  # UNet base width = ratio · m_k
        "channel_mult": [1, 2, 4],
        "num_res_blocks": 2,
        "attention_mult": [2, 4],  # down-sampling factors with self-attention
        "num_head_channels": 64,
        "norm_groups": 32,  # GroupNorm groups in the UNets
        "rrs_modes": ["max", "mean"],
        "rrs_numbers": [256, 256],  # r/2 each: 512 of 1536 residuals kept
        "rrs_residual_layers": 2,
        "bank": None,  # folder of anomaly-source images (SDAS / SIA); None: procedural textures
        "anomaly_ratio": 0.5,  # share of training samples given a synthetic anomaly
        "delta_range": [0.5, 1.0],  # blending opacity δ ~ U
        "min_perlin_scale": 0,  # k ∈ min .. perlin_scale − 1, scale 2^k per axis
        "perlin_scale": 6,
        "perlin_threshold": 0.5,
        "epochs": 1000,  # when fit gets no `iterations`
        "batch_size": 16,
        "lr": 1e-4,  # Adam
        "betas": [0.9, 0.999],
        "recon_weight": 1.0,
        "seg_weight": 1.0,
        "image_score": "avgpool",  # "avgpool": max of the 16×16-mean-filtered map; "max"
        "avgpool_size": 16,
        "workers": 0,  # data-loading processes for training
    }

    # --------------------------------------------------------------------------- model

    @property
    def geometry(self) -> Geometry:
        size = int(self.options["image_size"])
        return Geometry(resize=(size, size), crop=size)

    def backbone_options(self) -> dict[str, Any]:
        layers = tuple(self.options["layers"])
        if not layers or any(layer not in LAYERS for layer in layers):
            raise DetectorConfigError(f"realnet: layers must be taken from {LAYERS}, not {layers}")
        return {"layers": layers}

    def build(self) -> None:
        o = self.options
        if o["image_score"] not in ("avgpool", "max"):
            raise DetectorConfigError(f"realnet: image_score must be 'avgpool' or 'max', "
                             f"not {o['image_score']!r}")
        layers = tuple(o["layers"])
        kept = [int(m) for m in o["afs_channels"]]
        if len(kept) != len(layers):
            raise DetectorConfigError(f"realnet: {len(layers)} layers but {len(kept)} afs_channels")
        size = int(o["image_size"])
        levels = len(o["channel_mult"])
        for layer in layers:
            side = feature_grid(size, layer)
            if side % 2 ** (levels - 1):
                raise DetectorConfigError(
                    f"realnet: {layer}'s {side}×{side} grid at image_size {size} does not halve "
                    f"{levels - 1} times (channel_mult has {levels} levels); use an image size "
                    f"that is a multiple of {STRIDES[layer] * 2 ** (levels - 1)}")
        self._prepare_backbone()
        self.afs, self.recon, self.rrs = build_modules(o, self.backbone.wide_resnet.channels)

    def _prepare_backbone(self) -> None:
        # Frozen: its BatchNorms are folded into the convolutions (same function, faster).
        fuse_batchnorm(self.backbone.wide_resnet)

    def modules(self) -> dict[str, nn.Module]:
        return {"afs": self.afs, "recon": self.recon, "rrs": self.rrs}

    def to(self, device) -> RealNet:
        super().to(device)
        # channels-last convolutions are faster on a CPU too (oneDNN)
        self.backbone.wide_resnet.to(memory_format=torch.channels_last)
        return self

    def input_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------ features

    def backbone_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) → every used layer's full features (frozen)."""
        with torch.no_grad():
            return [f.contiguous() for f in self.backbone.wide_resnet(self.input_tensor(x))]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) → the AFS-selected features of every layer."""
        return self.afs.select(self.backbone_features(x))

    def reconstruct(self, feats: Sequence[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Selected features → (reconstructions, squared residuals in float32)."""
        recons, residuals = [], []
        for f, net in zip(feats, self.recon.values(), strict=True):
            r = net(f)
            recons.append(r)
            residuals.append((f.float() - r.float()) ** 2)
        return recons, residuals

    # ----------------------------------------------------------------------- training

    def _stream(self, dataset: SyntheticAnomalies, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Seeded shuffled batches of `dataset` for ever; epoch e reshuffles with seed + e."""
        epoch = 0
        while True:
            dataset.epoch = epoch
            generator = torch.Generator().manual_seed(self.seed + 7919 * dataset.stream + epoch)
            yield from torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, shuffle=True, generator=generator,
                num_workers=int(self.options["workers"]), drop_last=False,
                pin_memory=self.device.type == "cuda")
            epoch += 1

    @torch.no_grad()
    def select_features(self, dataset: SyntheticAnomalies, batch_size: int,
                        progress: bool) -> None:
        """AFS: keep the m_k channels of every layer whose normalised squared difference
        between anomalous and normal features best matches the anomaly masks."""
        todo = [i for i, full in enumerate(self.afs.all_channels) if not full]
        batches = int(self.options["afs_batches"])
        if todo and batches > 0:
            sums = {i: torch.zeros(self.backbone.wide_resnet.channels[i], dtype=torch.float64,
                                   device=self.device) for i in todo}
            stream = self._stream(dataset, batch_size)
            bar = self.progress(batches, f"{self.name} AFS", progress)
            for _ in range(batches):
                x, a, m, _ = next(stream)
                with self.autocast():
                    both = self.backbone_features(torch.cat((a, x)))
                mask = m.to(self.device)
                for i in todo:
                    fa, fx = both[i].float().chunk(2)
                    diff = (fa - fx) ** 2
                    channels = diff.shape[1]
                    diff = diff.transpose(0, 1).reshape(channels, -1)
                    low = diff.amin(dim=1, keepdim=True)
                    high = diff.amax(dim=1, keepdim=True)
                    diff = (diff - low) / (high - low + 1e-4)
                    label = F.interpolate(mask, size=fa.shape[-2:], mode="nearest")
                    label = label.transpose(0, 1).reshape(1, -1)
                    sums[i] += ((diff - label) ** 2).mean(dim=1).double()
                bar.update(1)
            bar.close()
            for i in todo:
                loss = sums[i]
                bad = torch.isnan(loss)
                if bad.any():
                    loss[bad] = loss[~bad].max() if (~bad).any() else 0.0
                kept = len(getattr(self.afs, self.afs.layers[i]))
                index = loss.topk(kept, largest=False).indices.sort().values
                getattr(self.afs, self.afs.layers[i]).copy_(index)
        self.afs.selected.fill_(True)

    def train_step(self, batch, optimizer) -> float:
        x, a, m, anomalous = batch
        o = self.options
        with self.autocast():
            clean = self.features(x)
            if bool(anomalous.any()):
                which = anomalous.nonzero().squeeze(1)
                changed = self.features(a[which])
                feats = []
                for c, f in zip(clean, changed, strict=True):
                    f_a = c.clone()
                    f_a[which.to(c.device)] = f
                    feats.append(f_a)
            else:
                feats = clean
            recons, residuals = self.reconstruct(feats)
            logits = self.rrs(residuals, tuple(x.shape[-2:]))
        loss_recon = sum(F.mse_loss(r.float(), c.float()) for r, c in zip(recons, clean,
                                                                         strict=True))
        target = m.to(self.device).squeeze(1).long()
        loss_seg = F.cross_entropy(logits.float(), target)
        loss = float(o["recon_weight"]) * loss_recon + float(o["seg_weight"]) * loss_seg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def fit(self, images: Sequence[ImageLike], categories: Sequence[str] | None = None, *,
            iterations: int | None = None, batch_size: int | None = None,
            progress: bool = True, foregrounds: Sequence | None = None) -> list[float]:
        """Train on normal images. AFS runs on the first fit (its indices are kept after).
        `foregrounds`: one foreground mask per image (H×W array or mask image path, None for
        "everywhere"); anomalies are only blended inside it. `categories` are not used (one
        model; the bank is shared). Default length: `epochs` passes over the images."""
        if not len(images):
            raise ValueError("realnet: fit needs at least one image")
        if foregrounds is not None and len(foregrounds) != len(images):
            raise ValueError(f"realnet: {len(images)} images but {len(foregrounds)} foregrounds")
        o = self.options
        batch = int(batch_size if batch_size is not None else o["batch_size"])
        bank = list_bank(o["bank"]) if o["bank"] else None
        start = self.iterations_done
        if not bool(self.afs.selected):
            afs_data = SyntheticAnomalies(images, self.geometry, o, seed=self.seed,
                                          stream=2 * start + 1, foregrounds=foregrounds,
                                          bank=bank, anomaly_ratio=1.0)
            self.select_features(afs_data, batch, progress)
        data = SyntheticAnomalies(images, self.geometry, o, seed=self.seed, stream=2 * start + 2,
                                  foregrounds=foregrounds, bank=bank)
        total = int(iterations if iterations is not None
                    else o["epochs"] * math.ceil(len(images) / batch))
        optimizer = torch.optim.Adam([*self.recon.parameters(), *self.rrs.parameters()],
                                     lr=float(o["lr"]), betas=tuple(o["betas"]))
        self.recon.train()
        self.rrs.train()
        stream = self._stream(data, batch)
        losses = self.train_loop(total, lambda _: self.train_step(next(stream), optimizer),
                                 progress)
        self.recon.eval()
        self.rrs.eval()
        return losses

    # ---------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.recon.eval()
        self.rrs.eval()
        _, residuals = self.reconstruct(self.features(x))
        logits = self.rrs(residuals, tuple(x.shape[-2:]))
        maps = torch.softmax(logits.float(), dim=1)[:, 1]
        if self.options["image_score"] == "avgpool":
            k = min(int(self.options["avgpool_size"]), *maps.shape[-2:])
            scores = F.avg_pool2d(maps[:, None], k, stride=1).flatten(1).amax(dim=1)
        else:
            scores = maps.flatten(1).amax(dim=1)
        return scores, maps


# ------------------------------------------------------------------- official checkpoints


def read_official_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) of an official RealNet `ckpt_best.pth.tar`. The only extra
    global allowed is easydict.EasyDict (the pickled config), rebuilt as an OrderedDict (the
    safe unpickler fills only dict types; its attribute copy lands in the OrderedDict's
    __dict__). Nothing else is allowed."""
    from collections import OrderedDict

    with torch.serialization.safe_globals([(OrderedDict, "easydict.EasyDict")]):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def official_to_ours(state: Mapping[str, torch.Tensor], layers: Sequence[str] = LAYERS
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """An official RealNet state dict (ModelHelper: backbone / afs / recon / rrs; a `module.`
    prefix is dropped) → our state dicts {"backbone", "afs", "recon", "rrs"}. Every key must
    map; an unknown key is an error. Block i of the official structure is our layers[i − 1]."""
    out: dict[str, dict[str, torch.Tensor]] = {"backbone": {}, "afs": {}, "recon": {}, "rrs": {}}
    blocks = {f"block{i + 1}": layer for i, layer in enumerate(layers)}
    for key, value in state.items():
        name = key.removeprefix("module.")
        part, _, rest = name.partition(".")
        if part == "backbone" and rest.startswith("feature_extractor."):
            rest = rest.removeprefix("feature_extractor.")
            head, _, tail = rest.partition(".")
            if head in ("conv1", "bn1"):
                rest = f"stem.{0 if head == 'conv1' else 1}.{tail}"
            elif head not in LAYERS:
                raise KeyError(f"unexpected key in the official RealNet backbone: {key}")
            out["backbone"][rest] = value
        elif part == "afs" and rest.startswith("indexes."):
            block, _, layer = rest.removeprefix("indexes.").partition("_")
            if blocks.get(block) != layer:
                raise KeyError(f"official AFS index {key} does not fit layers {tuple(layers)}")
            out["afs"][layer] = value.long()
        elif part == "recon" and rest.partition(".")[0].endswith("_recon"):
            block, _, tail = rest.partition(".")
            block = block.removesuffix("_recon")
            if block not in blocks:
                raise KeyError(f"unexpected reconstruction block in the official RealNet: {key}")
            out["recon"][f"{block}.{tail}"] = value
        elif part == "rrs":
            out["rrs"][rest] = value
        else:
            raise KeyError(f"unexpected key in the official RealNet checkpoint: {key}")
    return out


def load_official_realnet(checkpoint, *, backbone: str = "wide_resnet50_2", weights=None,
                          load_backbone: bool = True, device=None, seed: int = 0,
                          **options) -> RealNet:
    """Build a RealNet detector from the official `ckpt_best.pth.tar` (a path, or its loaded
    dict with a `state_dict` entry, or the state dict itself).

    The AFS indices, the reconstruction UNets and the RRS head load strictly (every key must map
    and every tensor fit). The checkpoint also holds the backbone it was trained with (timm's
    WideResNet-50-2 weights): with `load_backbone` (default) those tensors replace the ones from
    `weights` (strictly, for the layers used) and the provenance names the checkpoint; such a
    detector predicts and saves, but `Detector.load` of its file needs `weights=` a torchvision
    WideResNet file holding the same tensors. Options (image_size, …) default to the paper's;
    `afs_channels` and `rrs_numbers` are read off the checkpoint.
    """
    path = None
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"official RealNet checkpoint not found: {path}")
        state = read_official_checkpoint(path)
    else:
        state = checkpoint
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    layers = tuple(options.get("layers", LAYERS))
    mapped = official_to_ours(state, layers)
    if len(mapped["afs"]) != len(layers):
        raise KeyError(f"official RealNet checkpoint has AFS indices for "
                       f"{sorted(mapped['afs'])}, expected {list(layers)}")
    kept = [int(mapped["afs"][layer].numel()) for layer in layers]
    options = {"afs_channels": kept, "layers": list(layers), **options}
    detector = RealNet(backbone=backbone, weights="random" if load_backbone and
                       mapped["backbone"] and weights is None else weights,
                       seed=seed, device="cpu", **options)
    if load_backbone and mapped["backbone"]:
        _load_backbone(detector, mapped["backbone"], path)
    detector.afs.load_state_dict({**mapped["afs"], "selected": torch.tensor(True)}, strict=True)
    detector.recon.load_state_dict(mapped["recon"], strict=True)
    detector.rrs.load_state_dict(mapped["rrs"], strict=True)
    detector.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    detector.recon.eval()
    detector.rrs.eval()
    return detector


def _load_backbone(detector: RealNet, tensors: dict[str, torch.Tensor], path: Path | None) -> None:
    """Put an official checkpoint's backbone tensors into a fresh (unfused) backbone."""
    name = detector.backbone.name
    module = WideResNetFeatures(torchvision_wide_resnet(name),
                                tuple(detector.options["layers"]))
    result = module.load_state_dict(tensors, strict=False)
    if result.unexpected_keys or result.missing_keys:
        raise RuntimeError(f"official RealNet backbone does not fit {name}: missing "
                           f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    digest = file_sha256(path) if path is not None else "official-checkpoint"
    detector.backbone = Backbone(name, module, str(path) if path else "official-checkpoint",
                                 digest)
    detector._prepare_backbone()
