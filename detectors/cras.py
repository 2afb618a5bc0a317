"""CRAS — center-aware residual anomaly synthesis (see docs/methods.md, "CRAS").

Frozen WideResNet-50-2 layers 2 and 3 → 3×3 neighbourhood features pooled to 1536 dimensions on
layer 2's grid (36×36 at 288 px) → a Linear adapter gives the patch features u. One fixed centre
map c_k per training class (the per-position mean of u over the class's images, taken with the
initial adapter before training). Each image is matched to a centre by its features alone
(global: cosine of the flattened maps), and every patch to the most similar vector of that
centre (local), which gives the recomposed centre p. A discriminator scores [u, u − p]; it is
trained against distance-aware synthetic anomalies v = u + α·g.

What differs from the authors' code, and why (their code is only read, nothing is copied):

- Class matching never uses labels: the official trainer looks the class up from the image path
  and the official tester replaces every image's match by the batch's mode. Here every image is
  matched by its own features, in training and at test time.
- The mean in α's normalisation is per image (Eq. 5 of the paper); the code takes it over the
  whole batch. r is clamped to `min_distance` (the code divides by zero for an exact match).
- Centres are the exact per-class mean (the code averages per-batch means, which weights a
  smaller last batch more).
- The image score is the maximum of the smoothed map (Eq. 10); the code takes the maximum of the
  raw patch scores — `image_score="patch"` gives that.
- Same mathematics, computed differently (tests check equality with the plain formulation):
  the WRN stops after layer 3; unfold + adaptive pooling + the aggregator's pooling are one fixed
  grouped convolution per layer, applied before layer 3 is upsampled (all are linear, so they
  commute); the discriminator's first layer W·[u, u − p] is computed as (W_u + W_r)·u − W_r·p
  with W_r·p taken once per centre vector, and for the synthetic half as the normal half plus
  (W_u + W_r)·(αg); the loss uses BCE on logits (the code's sigmoid + BCELoss clamps instead).
- No checkpoint is selected on test metrics: the last state is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import Detector, Geometry, ImageLike
from .errors import DetectorConfigError
from .layers import fuse_batchnorm

DEFAULT_CLASS = "all"


# ------------------------------------------------------------------------ feature aggregation


def adaptive_pool_matrix(length: int, out: int):
    """The (out, length) sparse matrix of `F.adaptive_avg_pool1d(·, out)` on a length-vector."""
    from scipy import sparse

    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i in range(out):
        start = (i * length) // out
        end = -((-(i + 1) * length) // out)
        rows.extend([i] * (end - start))
        cols.extend(range(start, end))
        vals.extend([1.0 / (end - start)] * (end - start))
    return sparse.csr_matrix((vals, (rows, cols)), shape=(out, length))


def _grouped_weight(matrix, channels: int, taps: int, patch: int) -> tuple[torch.Tensor, int]:
    """A (rows, channels·taps) sparse map → a grouped conv weight (rows, channels/G, p, p), G.

    Picks the most groups G for which row block g reads only channel block g (block-diagonal);
    G = 1 (a dense convolution) always works.
    """
    coo = matrix.tocoo()
    nrows = matrix.shape[0]
    chan = coo.col // taps
    for size in range(1, channels + 1):
        if channels % size or nrows % (channels // size):
            continue
        groups = channels // size
        per_group = nrows // groups
        if np.all(chan // size == coo.row // per_group):
            break
    weight = np.zeros((nrows, size, taps), np.float64)
    weight[coo.row, chan % size, coo.col % taps] = coo.data
    return torch.from_numpy(weight.reshape(nrows, size, patch, patch)).float(), groups


class PatchFeatures(nn.Module):
    """PatchCore-style neighbourhood aggregation with fixed weights (nothing here is learned).

    Equals, for every position: unfold each layer with a p×p window (zero padding, stride 1),
    upsample the unfolded later layers to the first layer's grid (bilinear), pool each layer's
    flattened C·p·p vector to `embed_dim` (adaptive average), then pool the concatenation of the
    layers to `out_dim` (adaptive average). All of it is linear, so it is done as one grouped
    convolution per layer on its own grid, followed by the upsampling.
    """

    def __init__(self, channels: Sequence[int], embed_dim: int, out_dim: int, patch_size: int):
        super().__init__()
        from scipy import sparse

        if patch_size % 2 != 1:
            raise DetectorConfigError(f"patch_size must be odd, not {patch_size}")
        self.patch_size = patch_size
        taps = patch_size * patch_size
        combine = adaptive_pool_matrix(len(channels) * embed_dim, out_dim)
        self.rows: list[torch.Tensor] = []
        self.groups: list[int] = []
        for j, c in enumerate(channels):
            per_layer = combine[:, j * embed_dim:(j + 1) * embed_dim] @ adaptive_pool_matrix(
                c * taps, embed_dim)
            per_layer = sparse.csr_matrix(per_layer)
            rows = np.flatnonzero(per_layer.getnnz(axis=1))
            weight, groups = _grouped_weight(per_layer[rows], c, taps, patch_size)
            self.register_buffer(f"weight{j}", weight, persistent=False)
            self.rows.append(torch.from_numpy(rows))
            self.groups.append(groups)
        order = torch.cat(self.rows)
        self.concatenated = bool(torch.equal(order, torch.arange(out_dim)))
        self.out_dim = out_dim

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Layer maps (B, C_j, H_j, W_j) → (B, out_dim, H_0, W_0)."""
        size = features[0].shape[-2:]
        parts = []
        for j, feature in enumerate(features):
            weight = getattr(self, f"weight{j}").to(feature.dtype)
            part = F.conv2d(feature, weight, padding=self.patch_size // 2, groups=self.groups[j])
            if part.shape[-2:] != size:
                part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
            parts.append(part)
        if self.concatenated:
            return torch.cat(parts, dim=1)
        out = parts[0].new_zeros(parts[0].shape[0], self.out_dim, *size)
        for rows, part in zip(self.rows, parts, strict=True):
            out.index_add_(1, rows.to(out.device), part)
        return out


def gaussian_smooth(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(map, sigma) for every (H, W) map of (B, H, W), in torch.

    Same kernel (radius int(truncate·σ + 0.5)) and the same 'reflect' border (d c b a | a b c d).
    """
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=maps.device, dtype=torch.float32)

    def reflect(n: int) -> torch.Tensor:
        i = torch.arange(-radius, n + radius, device=maps.device) % (2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)

    height, width = maps.shape[-2:]
    out = maps.float().unsqueeze(1)
    out = F.conv2d(out.index_select(3, reflect(width)), kernel.view(1, 1, 1, -1))
    out = F.conv2d(out.index_select(2, reflect(height)), kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


# --------------------------------------------------------------------------- learned modules


class _Block(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.norm = nn.BatchNorm1d(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.linear(x)), 0.2)


class Discriminator(nn.Module):
    """MLP on [u, u − p]: (Linear → BatchNorm → LeakyReLU(0.2)) × (layers − 1), each halving the
    width (2·dim → dim → dim/2), then Linear(·, 1, no bias) and a sigmoid. Xavier-normal weights."""

    def __init__(self, dim: int, layers: int = 3):
        super().__init__()
        if layers < 2:
            raise ValueError("the discriminator needs at least 2 layers")
        widths = [2 * dim]
        for _ in range(layers - 1):
            widths.append(widths[-1] // 2)
        self.dim = dim
        self.hidden = nn.ModuleList(_Block(a, b) for a, b in zip(widths[:-1], widths[1:],
                                                                    strict=True))
        self.head = nn.Linear(widths[-1], 1, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)

    @property
    def first(self) -> _Block:
        """The first hidden block: its linear layer reads [u, u − p]."""
        block = self.hidden[0]
        assert isinstance(block, _Block)
        return block

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """First layer's pre-activation → logits (N,)."""
        x = F.leaky_relu(self.first.norm(h), 0.2)
        for block in self.hidden[1:]:
            x = block(x)
        return self.head(x).squeeze(-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The plain formulation: x = [u, u − p] (N, 2·dim) → logits (N,)."""
        return self.tail(self.first.linear(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def residual_logits(self, u: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of [u, u − p] with p = bank[rows], and of [v, v − p] with v = u + noise.

        u (N, dim), bank (M, dim), rows (N,) → logits (N,) or, with noise, (2N,): normal first.
        W·[u, u − p] = (W_u + W_r)·u − W_r·p; W_r·p is computed once per bank vector; the
        synthetic half adds (W_u + W_r)·noise. BatchNorm sees both halves together.
        """
        linear = self.first.linear
        w_u, w_r = linear.weight[:, :self.dim], linear.weight[:, self.dim:]
        w_sum = w_u + w_r
        h = F.linear(u, w_sum, linear.bias) - F.linear(bank, w_r)[rows]
        if noise is not None:
            h = torch.cat((h, h + F.linear(noise, w_sum)))
        return self.tail(h)


class CentreBank(nn.Module):
    """The fixed class centres (classes, positions, dim); loading takes the stored shape."""

    def __init__(self, positions: int, dim: int):
        super().__init__()
        self.register_buffer("vectors", torch.zeros(0, positions, dim))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "vectors"
        if key in state_dict:
            self.vectors = torch.empty(state_dict[key].shape, dtype=self.vectors.dtype,
                                       device=self.vectors.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _feature_grid(crop: int) -> int:
    """Side of WRN layer 2's grid for a crop (conv1 s2, max-pool s2, layer 2 s2)."""
    side = (crop + 2 * 3 - 7) // 2 + 1
    side = (side + 2 - 3) // 2 + 1
    return (side + 2 - 3) // 2 + 1


# --------------------------------------------------------------------------------- detector


class CRAS(Detector):
    name = "cras"
    default_backbone = "wide_resnet50_2"
    backbones = ("wide_resnet50_2", "wide_resnet_tiny")
    defaults = {
        "resize": 329,  # shorter side, then centre crop
        "crop": 288,
        "patch_size": 3,  # neighbourhood aggregation window (stride 1)
        "embed_dim": 1536,  # pooled per-layer and final patch-feature size
        "discriminator_layers": 3,  # 3072 → 1536 → 768 → 1
        "noise_std": 0.015,  # σ of g (a standard deviation)
        "beta": 0.3,  # α = β(s − 1) + 1
        "min_distance": 1e-6,  # r is clamped to this
        "epochs": 100,  # when fit gets no `iterations`
        "batch_size": 32,
        "adapter_lr": 1e-4,  # AdamW, torch's default weight decay as the official code
        "adapter_weight_decay": 1e-2,
        "discriminator_lr": 2e-4,  # Adam
        "discriminator_weight_decay": 1e-5,
        "smoothing_sigma": 4.0,
        "image_score": "map",  # "map": max of the smoothed map (paper); "patch": max patch score
    }

    # --------------------------------------------------------------------------- model

    @property
    def geometry(self) -> Geometry:
        return Geometry(resize=self.options["resize"], crop=self.options["crop"])

    def build(self) -> None:
        o = self.options
        if o["image_score"] not in ("map", "patch"):
            raise DetectorConfigError(
                f"cras: image_score must be 'map' or 'patch', not {o['image_score']!r}")
        dim = int(o["embed_dim"])
        self.grid = _feature_grid(int(o["crop"]))
        # The backbone is frozen: its BatchNorms are folded into the convolutions (same function)
        fuse_batchnorm(self.backbone.wide_resnet)
        self.patch_features = PatchFeatures(self.backbone.wide_resnet.channels, dim, dim,
                                            int(o["patch_size"]))
        self.adapter = nn.Linear(dim, dim)
        nn.init.xavier_normal_(self.adapter.weight)
        self.discriminator = Discriminator(dim, int(o["discriminator_layers"]))
        self.centres = CentreBank(self.grid * self.grid, dim)
        self.classes: list[str] = []
        self._normed: tuple[Any, torch.Tensor] | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"adapter": self.adapter, "discriminator": self.discriminator,
                "centres": self.centres}

    def to(self, device) -> CRAS:
        super().to(device)
        self.patch_features.to(self.device)
        # channels-last convolutions are about twice as fast on a CPU too (oneDNN)
        self.backbone.wide_resnet.to(memory_format=torch.channels_last)
        return self

    def input_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def header(self) -> dict[str, Any]:
        return {**super().header(), "classes": list(self.classes)}

    def loaded_from(self, header: dict[str, Any]) -> None:
        self.classes = list(header.get("classes") or [])
        if len(self.classes) != len(self.centres.vectors):
            raise ValueError(f"cras: {len(self.centres.vectors)} centres but "
                             f"{len(self.classes)} class names in the header")

    # ------------------------------------------------------------------------ features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, crop, crop) → frozen patch features (B, positions, embed_dim)."""
        with torch.no_grad():
            maps = self.patch_features(self.backbone.wide_resnet(x))
            return maps.flatten(2).transpose(1, 2).contiguous()

    def normed_centres(self) -> torch.Tensor:
        """Unit-length centre vectors (classes, positions, dim), cached while they are unchanged."""
        vectors = self.centres.vectors
        key = (vectors.data_ptr(), vectors._version, vectors.device, tuple(vectors.shape))
        if self._normed is None or self._normed[0] != key:
            self._normed = (key, F.normalize(vectors.float(), dim=-1))
        return self._normed[1]

    @torch.no_grad()
    def match(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, by its features alone: u (B, P, D) → class (B,), centre position (B, P).

        Global: the centre whose flattened map is most cosine-similar to the flattened u. Local:
        for each patch, the most cosine-similar vector among all positions of that centre.
        """
        if not len(self.centres.vectors):
            raise RuntimeError("cras: no class centres yet — call fit first")
        vectors = self.centres.vectors.float()
        u = u.float()
        flat = F.normalize(u.flatten(1), dim=1)
        classes = (flat @ F.normalize(vectors.flatten(1), dim=1).T).argmax(dim=1)
        unit = F.normalize(u, dim=-1)
        normed = self.normed_centres()
        positions = torch.empty(u.shape[:2], dtype=torch.long, device=u.device)
        for k in classes.unique().tolist():
            members = (classes == k).nonzero().squeeze(1)
            sims = unit[members] @ normed[k].T  # (n, P, P)
            positions[members] = sims.argmax(dim=-1)
        return classes, positions

    def _bank_rows(self, classes: torch.Tensor, positions: torch.Tensor):
        """The centre vectors of the matched classes (M, D) and each patch's row in them."""
        used, slot = classes.unique(return_inverse=True)
        positions_per_class = self.centres.vectors.shape[1]
        bank = self.centres.vectors[used].reshape(-1, self.centres.vectors.shape[-1])
        rows = (slot[:, None] * positions_per_class + positions).reshape(-1)
        return bank, rows

    def synthesize(self, u: torch.Tensor, p: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Distance-aware noise α·g for u, p (B, P, D): r = ‖u − p‖ (clamped), g ~ N(0, σ²I),
        s = (‖g‖/r) / mean over the image's positions, α = β(s − 1) + 1."""
        o = self.options
        r = (u.float() - p.float()).norm(dim=-1).clamp_min(float(o["min_distance"]))
        g = torch.randn(u.shape, generator=generator, device=u.device) * float(o["noise_std"])
        s = g.norm(dim=-1) / r
        s = s / s.mean(dim=1, keepdim=True)
        alpha = float(o["beta"]) * (s - 1) + 1
        return alpha.unsqueeze(-1) * g

    # ----------------------------------------------------------------------- training

    @torch.no_grad()
    def compute_centres(self, images: Sequence[ImageLike], labels: Sequence[str],
                        classes: Sequence[str], batch_size: int, progress: bool) -> None:
        """c_k = mean over class k's images of the adapter's output, per position."""
        self.adapter.eval()
        dim = self.adapter.out_features
        bank = torch.zeros(len(classes), self.grid * self.grid, dim, dtype=torch.float64,
                           device=self.device)
        bar = self.progress(len(images), f"{self.name} centres", progress)
        for k, name in enumerate(classes):
            members = [img for img, label in zip(images, labels, strict=True) if label == name]
            for x, _ in self.loader(members, batch_size, shuffle=False):
                with self.autocast():
                    u = self.adapter(self.features(self.input_tensor(x)))
                bank[k] += u.double().sum(dim=0)
                bar.update(len(x))
            bank[k] /= len(members)
        bar.close()
        self.centres.vectors = bank.float()
        self.classes = list(classes)

    def train_step(self, x: torch.Tensor, optimizers, generator: torch.Generator) -> float:
        x = self.input_tensor(x)
        with self.autocast():
            u = self.adapter(self.features(x))  # (B, P, D)
        batch, positions, dim = u.shape
        classes, where = self.match(u.detach())
        bank, rows = self._bank_rows(classes, where)
        p = bank[rows].view(batch, positions, dim)
        noise = self.synthesize(u.detach(), p, generator)
        with self.autocast():
            logits = self.discriminator.residual_logits(
                u.reshape(-1, dim), bank, rows, noise.reshape(-1, dim).to(u.dtype))
        logits = logits.float()
        n = batch * positions
        loss = (F.binary_cross_entropy_with_logits(logits[:n], torch.zeros_like(logits[:n]))
                + F.binary_cross_entropy_with_logits(logits[n:], torch.ones_like(logits[n:])))
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        return float(loss.detach())

    def fit(self, images: Sequence[ImageLike], categories: Sequence[str] | None = None, *,
            iterations: int | None = None, batch_size: int | None = None,
            progress: bool = True) -> list[float]:
        """Train on normal images. `categories` (one name per image) defines the class centres,
        computed on the first fit and kept fixed after; nothing else uses the labels (matching
        is by features). Optimiser states start afresh on every call.
        Default length: `epochs` passes over the images. Returns every iteration's loss."""
        if not len(images):
            raise ValueError("cras: fit needs at least one image")
        labels = [DEFAULT_CLASS] * len(images) if categories is None else [str(c) for c in
                                                                           categories]
        if len(labels) != len(images):
            raise ValueError(f"cras: {len(images)} images but {len(labels)} categories")
        batch = int(batch_size if batch_size is not None else self.options["batch_size"])
        if not len(self.centres.vectors):  # later fits keep them (and ignore the labels)
            classes = list(dict.fromkeys(labels))
            self.compute_centres(images, labels, classes, batch, progress)
        total = int(iterations if iterations is not None
                    else self.options["epochs"] * math.ceil(len(images) / batch))
        o = self.options
        optimizers = [
            torch.optim.AdamW(self.adapter.parameters(), lr=o["adapter_lr"],
                              weight_decay=o["adapter_weight_decay"]),
            torch.optim.Adam(self.discriminator.parameters(), lr=o["discriminator_lr"],
                             weight_decay=o["discriminator_weight_decay"]),
        ]
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.seed * 1_000_003 + self.iterations_done) % (2 ** 63))
        self.adapter.train()
        self.discriminator.train()
        batches = self.endless(images, batch)
        losses = self.train_loop(
            total, lambda _: self.train_step(next(batches)[0], optimizers, generator), progress)
        self.adapter.eval()
        self.discriminator.eval()
        return losses

    # ---------------------------------------------------------------------- inference

    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, crop, crop) → discriminator scores on [u, u − p] (B, grid, grid)."""
        u = self.adapter(self.features(x))
        batch, positions, dim = u.shape
        classes, where = self.match(u)
        bank, rows = self._bank_rows(classes, where)
        logits = self.discriminator.residual_logits(u.reshape(-1, dim), bank.to(u.dtype), rows)
        return torch.sigmoid(logits.float()).view(batch, self.grid, self.grid)

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.adapter.eval()
        self.discriminator.eval()
        patches = self.patch_scores(x)
        crop = self.options["crop"]
        maps = F.interpolate(patches.unsqueeze(1), size=(crop, crop), mode="bilinear",
                             align_corners=False).squeeze(1)
        maps = gaussian_smooth(maps, float(self.options["smoothing_sigma"]))
        if self.options["image_score"] == "patch":
            scores = patches.flatten(1).amax(dim=1)
        else:
            scores = maps.flatten(1).amax(dim=1)
        return scores, maps

    @torch.no_grad()
    def predict_classes(self, images: Sequence[ImageLike], *, batch_size: int = 8) -> list[str]:
        """The class each image's features match (global matching), by name."""
        self.adapter.eval()
        out: list[str] = []
        for x, _ in self.loader(images, batch_size, shuffle=False):
            with self.autocast():
                u = self.adapter(self.features(self.input_tensor(x)))
            out.extend(self.classes[k] for k in self.match(u)[0].tolist())
        return out


# ------------------------------------------------------------------- official checkpoints


def _read(source) -> Any:
    if isinstance(source, (str, Path)):
        return torch.load(str(source), map_location="cpu", weights_only=True)
    return source


def official_to_ours(state: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict]:
    """The official `{"discriminator": …, "pre_projection": …}` → our adapter / discriminator
    state dicts. Every official key must map; an unknown key is an error."""
    if "discriminator" not in state:
        raise KeyError("not an official CRAS checkpoint: no 'discriminator' state dict")
    if "pre_projection" not in state:
        raise KeyError("official CRAS checkpoint without 'pre_projection' (pre_proj=0 runs have "
                       "no adapter; only pre_proj=1 is supported)")
    adapter: dict[str, torch.Tensor] = {}
    for key, value in state["pre_projection"].items():
        if key not in ("layers.0fc.weight", "layers.0fc.bias"):
            raise KeyError(f"unexpected key in the official pre_projection: {key}")
        adapter[key.rsplit(".", 1)[1]] = value
    disc: dict[str, torch.Tensor] = {}
    parts = {"0": "linear", "1": "norm"}
    names = {"0": ("weight", "bias"),
             "1": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    for key, value in state["discriminator"].items():
        fields = key.split(".")
        if key == "tail.0.weight":
            disc["head.weight"] = value
        elif (len(fields) == 4 and fields[0] == "body" and fields[1].startswith("block")
              and fields[1][5:].isdigit() and fields[2] in parts
              and fields[3] in names[fields[2]]):
            disc[f"hidden.{int(fields[1][5:]) - 1}.{parts[fields[2]]}.{fields[3]}"] = value
        else:
            raise KeyError(f"unexpected key in the official discriminator: {key}")
    return {"adapter": adapter, "discriminator": disc}


def load_official_cras(checkpoint, centers=None, *, backbone: str = "wide_resnet50_2",
                       weights=None, categories: Sequence[str] | None = None, device=None,
                       seed: int = 0, **options) -> CRAS:
    """Build a CRAS detector from what the official code saves.

    `checkpoint`: `ckpt_best_<epoch>.pth` (a dict with the `discriminator` and `pre_projection`
    state dicts), the folder holding it and `center.pth`, or that dict itself (a `center` entry
    is accepted too). `centers`: `center.pth` (tensor classes × positions × dim) or the tensor;
    by default `center.pth` beside the checkpoint. `categories` names the centres in order (the
    official `-d` order); default class0, class1, …. Pickles are read with weights_only=True.
    Loading is strict: every key must map and every tensor must fit.
    """
    folder = None
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if path.is_dir():
            found = sorted(path.glob("ckpt_best*.pth")) or sorted(path.glob("ckpt*.pth"))
            if not found:
                raise FileNotFoundError(f"{path}: no ckpt_best_<epoch>.pth in this folder")
            folder, path = path, found[0]
        else:
            folder = path.parent
        if not path.is_file():
            raise FileNotFoundError(f"official CRAS checkpoint not found: {path}")
        state = _read(path)
    else:
        state = dict(checkpoint)
    if centers is None:
        if "center" in state or "centers" in state:
            centers = state.get("center", state.get("centers"))
        elif folder is not None and (folder / "center.pth").is_file():
            centers = folder / "center.pth"
        else:
            raise FileNotFoundError("official CRAS centres not found: pass centers=<center.pth> "
                                    + (f"(looked for {folder / 'center.pth'})" if folder else ""))
    centers = _read(centers)
    if not isinstance(centers, torch.Tensor) or centers.dim() != 3:
        raise ValueError("official CRAS centres must be a tensor (classes, positions, dim)")
    mapped = official_to_ours(state)
    dim = mapped["adapter"]["weight"].shape[0]
    layers = 1 + sum(1 for k in mapped["discriminator"] if k.endswith(".linear.weight"))
    options = {"embed_dim": int(dim), "discriminator_layers": layers, **options}
    detector = CRAS(backbone=backbone, weights=weights, seed=seed, device="cpu", **options)
    if centers.shape[1] != detector.grid ** 2 or centers.shape[2] != dim:
        raise ValueError(f"official centres {tuple(centers.shape)} do not fit a "
                         f"{detector.grid}×{detector.grid} grid of {dim}-d features "
                         f"(crop {detector.options['crop']})")
    detector.adapter.load_state_dict(mapped["adapter"], strict=True)
    detector.discriminator.load_state_dict(mapped["discriminator"], strict=True)
    detector.centres.load_state_dict({"vectors": centers.float()}, strict=True)
    names = list(categories) if categories is not None else [f"class{i}" for i in
                                                            range(len(centers))]
    if len(names) != len(centers):
        raise ValueError(f"{len(names)} categories for {len(centers)} official centres")
    detector.classes = names
    detector.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    detector.adapter.eval()
    detector.discriminator.eval()
    return detector
