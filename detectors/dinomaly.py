"""Dinomaly (Guo et al., CVPR 2025): reconstruct frozen DINOv2-R features through a noisy bottleneck.

The model, as docs/methods.md describes it (read off the paper and the authors' code):

- a frozen DINOv2-with-registers encoder sees the image resized to 448×448 and centre-cropped to
  392 (28×28 tokens); only blocks 0..9 (0..18 for ViT-L) are run;
- the bottleneck input is the mean of the 8 target-layer token sequences ([2..9]; ViT-L
  [4, 6, …, 18]), prefix tokens (CLS + 4 registers) included; the noisy bottleneck is
  Dropout(p) → Linear(d, 4d) → GELU → Dropout(p) → Linear(4d, d) → Dropout(p);
- the decoder is 8 pre-LN transformer blocks (LayerNorm eps 1e-8, MLP ratio 4, qkv bias) with
  linear attention φ(x) = elu(x) + 1 per head, no 1/√d scale, over all tokens, prefix included;
- loose reconstruction in 2 groups: encoder mean(target 0-3), mean(target 4-7) against the mean
  of the matching decoder outputs, the decoder list reversed (group 0 = decoder blocks 7..4);
- loss: global cosine with hard mining (below); map: per group 1 − cos per token, bilinear up to
  the crop (align_corners=True), mean of groups, bilinear to 256, Gaussian 5×5 σ=4 (zero
  padding); image score: mean of the top 1% of that map;
- training: StableAdamW with AMSGrad (lr 2e-3, betas (0.9, 0.999), wd 1e-4, eps 1e-10), the
  official warm-up/cosine schedule to 2e-4 (`warm_cosine_lr`: lr 0 at step 0, 2e-3 at step 99),
  grad-norm clip 0.1, batch 16, 10,000 iterations, hard-mining share ramped 0 → 0.9 over the
  first 1,000; the last state is kept.

The three linear steps of the map (upsampling to the crop, resampling to 256, the separable
Gaussian) are folded into one 256×28 matrix per axis, applied as ``L · A · Lᵀ``: the same numbers
as the official chain of interpolations and a convolution (to float rounding), at a tiny cost.

Tokens stay in their (B, tokens, C) layout throughout: the global cosine of the flattened
features does not depend on the flattening order, so nothing is permuted to B×C×h×w.

Deviations from the official code (none changes the numbers beyond float rounding, checked
side by side in benchmarks/detectors_dinomaly.py): linear attention adds `attn_eps` (1e-6) to
its denominator (NaN losses on custom data are a known complaint) and runs its core in float32
under bf16 autocast; the encoder is transformers' DINOv2-R with SDPA attention; the map's linear
steps are folded into matrices; training batches come from `Detector.endless` (the last batch
of an epoch may be smaller; the official loader drops it). `load_official_dinomaly` and
`Dinomaly.load_official` read the authors' ViTill checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .backbones import hub_to_transformers
from .base import Detector, Geometry, ImageLike
from .errors import DetectorConfigError
from .optim import StableAdamW

__all__ = ["Dinomaly", "LinearAttention", "hard_mining_cosine_loss", "load_official_dinomaly",
           "official_state_dict", "warm_cosine_lr"]


# ------------------------------------------------------------------------------------ modules


class NoisyBottleneck(nn.Module):
    """Dropout → Linear(d, 4d) → GELU → Dropout → Linear(4d, d) → Dropout (one dropout rate)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.drop(x))))))


class LinearAttention(nn.Module):
    """Multi-head linear attention with φ(x) = elu(x) + 1 and no 1/√d scale.

    Per head: ``out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j) + eps)`` — the
    kernelised form of normalising ``φ(q) φ(k)ᵀ`` over its rows, in O(N d²) instead of O(N² d).
    """

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.eps = heads, eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # 3, B, heads, N, d
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = qkv.float().unbind(0)
            q = F.elu(q) + 1.0
            k = F.elu(k) + 1.0
            kv = k.transpose(-2, -1) @ v  # B, heads, d, d
            denom = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # B, heads, N, 1
            out = (q @ kv) / (denom + self.eps)
        out = out.to(x.dtype).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DecoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)); LayerNorm eps 1e-8."""

    def __init__(self, dim: int, heads: int, attn_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = LinearAttention(dim, heads, attn_eps)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_weights(module: nn.Module) -> None:
    """The official initialisation: Linear weights N(0, 0.01²) truncated to ±0.03, biases 0,
    LayerNorms (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------- training


def hard_mining_cosine_loss(en: Sequence[torch.Tensor], de: Sequence[torch.Tensor], p: float,
                            factor: float = 0.1) -> torch.Tensor:
    """Global cosine loss with hard mining, for (B, tokens, C) encoder/decoder feature groups.

    Per group: ``mean_b (1 − cos(flatten(en_b), flatten(de_b)))`` with the encoder detached; the
    per-token distances ``d = 1 − cos(en, de)`` (no gradient) pick the easy tokens — those below
    the ⌊N(1 − p)⌋-th largest distance among all N tokens of the batch — whose decoder gradient
    is multiplied by `factor`. Returns the mean over groups.
    """
    total = torch.zeros((), device=en[0].device)
    for e, d in zip(en, de, strict=True):
        e = e.detach().float()
        d = d.float()
        with torch.no_grad():
            dist = 1.0 - F.cosine_similarity(e, d, dim=-1)  # B, tokens
            flat = dist.reshape(-1)
            keep = int(flat.numel() * (1.0 - p))
            scale = None
            if 0 < keep <= flat.numel():
                thresh = torch.topk(flat, keep).values[-1]
                scale = torch.where(dist < thresh, factor, 1.0).unsqueeze(-1).to(d.dtype)
        total = total + (1.0 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean()
        if scale is not None and d.requires_grad:
            d.register_hook(lambda grad, scale=scale: grad * scale)
    return total / len(en)


def warm_cosine_lr(step: int, total: int, warmup: int, base: float, final: float) -> float:
    """The official WarmCosineScheduler: ``linspace(0, base, warmup)`` (so step 0 has lr 0),
    then ``final + ½(base − final)(1 + cos(π i / (total − warmup)))``; `final` from `total` on."""
    if step >= total:
        return final
    if step < warmup:
        return 0.0 if warmup == 1 else base * step / (warmup - 1)
    i = step - warmup
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / (total - warmup)))


# ------------------------------------------------------------------------------------- maps


@lru_cache(maxsize=16)
def _axis_operator(tokens: int, crop: int, size: int, sigma: float, kernel: int) -> torch.Tensor:
    """(size × tokens) float64 matrix: bilinear tokens→crop (align_corners=True), bilinear
    crop→size (align_corners=False), then a 1-D Gaussian with zero padding."""
    eye = torch.eye(tokens, dtype=torch.float64).view(tokens, 1, tokens, 1)
    up = F.interpolate(eye, size=(crop, 1), mode="bilinear", align_corners=True)
    if size != crop:
        up = F.interpolate(up, size=(size, 1), mode="bilinear", align_corners=False)
    resample = up.view(tokens, size).T  # size × tokens
    x = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2.0
    g = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    g = g / g.sum()
    blur = torch.zeros(size, size, dtype=torch.float64)
    half = kernel // 2
    for offset in range(-half, half + 1):
        blur += torch.diag(torch.full((size - abs(offset),), float(g[offset + half]),
                                      dtype=torch.float64), offset)
    return blur @ resample


# ----------------------------------------------------------------------------------- detector


class Dinomaly(Detector):
    name: ClassVar[str] = "dinomaly"
    default_backbone: ClassVar[str] = "dinov2_vitb14_reg"
    backbones: ClassVar[tuple[str, ...]] = ("dinov2_vits14_reg", "dinov2_vitb14_reg",
                                            "dinov2_vitl14_reg", "dinov2_tiny_reg")
    defaults: ClassVar[dict[str, Any]] = {
        "image_size": 448,  # square resize
        "crop_size": 392,  # centre crop (a multiple of 14)
        "dropout": 0.2,  # noisy bottleneck (0.4 on Real-IAD)
        "iterations": 10000,
        "batch_size": 16,
        "lr": 2e-3,
        "final_lr": 2e-4,
        "warmup": 100,
        "weight_decay": 1e-4,
        "grad_clip": 0.1,
        "hard_mining": 0.9,  # final share of tokens whose gradient is scaled down
        "hard_mining_iters": 1000,  # ramp of that share from 0
        "hard_mining_factor": 0.1,
        "attn_eps": 1e-6,
        "map_size": 256,
        "map_sigma": 4.0,
        "map_kernel": 5,
        "score_ratio": 0.01,
    }

    def backbone_options(self) -> dict[str, Any]:
        return {"pos_antialias": False, "pos_offset": 0.1}

    @property
    def geometry(self) -> Geometry:
        size = int(self.options["image_size"])
        return Geometry(resize=(size, size), crop=int(self.options["crop_size"]))

    @property
    def target_layers(self) -> list[int]:
        if "vitl" in self.backbone.name:
            return list(range(4, 19, 2))
        return list(range(2, 10))

    def build(self) -> None:
        encoder = self.backbone.dino
        patch = encoder.patch_size
        if int(self.options["crop_size"]) % patch:
            raise DetectorConfigError(
                f"dinomaly: crop_size {self.options['crop_size']} is not a multiple "
                f"of the patch size {patch}")
        dim = encoder.embed_dim
        heads = encoder.model.config.num_attention_heads
        self.bottleneck = NoisyBottleneck(dim, float(self.options["dropout"]))
        self.decoder = nn.ModuleList(
            DecoderBlock(dim, heads, float(self.options["attn_eps"]))
            for _ in range(len(self.target_layers)))
        _init_weights(self.bottleneck)
        _init_weights(self.decoder)
        self.groups = ((0, 1, 2, 3), (4, 5, 6, 7))

    def modules(self) -> dict[str, nn.Module]:
        return {"bottleneck": self.bottleneck, "decoder": self.decoder}

    # ------------------------------------------------------------------------------ model

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, 3, H, W) → (encoder groups, decoder groups), each (B, h·w, C), prefix stripped."""
        encoder = self.backbone.dino
        layers = self.target_layers
        with torch.no_grad():
            hidden = encoder(x, depth=layers[-1] + 1)
        targets = [hidden[i] for i in layers]
        del hidden
        fused = torch.stack(targets, dim=1).mean(dim=1)
        y = self.bottleneck(fused)
        decoded = []
        for block in self.decoder:
            y = block(y)
            decoded.append(y)
        decoded.reverse()
        prefix = encoder.num_prefix_tokens

        def group(seq, idx):
            picked = [seq[i][:, prefix:] for i in idx]
            return picked[0] if len(picked) == 1 else torch.stack(picked, dim=1).mean(dim=1)

        return ([group(targets, g) for g in self.groups],
                [group(decoded, g) for g in self.groups])

    def anomaly_maps(self, en: Sequence[torch.Tensor], de: Sequence[torch.Tensor],
                     grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature groups → (scores (B,), maps (B, map_size, map_size)) over the crop."""
        h, w = grid
        dist = torch.stack([1.0 - F.cosine_similarity(e.float(), d.float(), dim=-1)
                            for e, d in zip(en, de, strict=True)]).mean(dim=0)
        dist = dist.view(-1, h, w)
        crop, size = int(self.options["crop_size"]), int(self.options["map_size"])
        sigma, kernel = float(self.options["map_sigma"]), int(self.options["map_kernel"])
        rows = _axis_operator(h, crop, size, sigma, kernel).to(dist.device, torch.float32)
        cols = rows if w == h else _axis_operator(w, crop, size, sigma, kernel).to(
            dist.device, torch.float32)
        maps = rows @ dist @ cols.T
        flat = maps.flatten(1)
        k = int(flat.shape[1] * float(self.options["score_ratio"]))
        scores = flat.topk(k, dim=1).values.mean(dim=1) if k > 0 else flat.amax(dim=1)
        return scores, maps

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch = self.backbone.dino.patch_size
        en, de = self.features(x)
        return self.anomaly_maps(en, de, (x.shape[-2] // patch, x.shape[-1] // patch))

    def load_official(self, source, *, check_encoder: bool = True) -> Dinomaly:
        """Load an official ViTill state dict (a path or a mapping) into this detector.

        The official scripts save ``ViTill.state_dict()``: ``encoder.*`` (the frozen DINOv2-R in
        the torch-hub layout, all of its blocks), ``bottleneck.0.*`` (the noisy MLP) and
        ``decoder.N.*``. Every key must be accounted for and every shape must match (strict);
        nothing is changed unless all do. The encoder's tensors must also equal this detector's
        backbone (it was frozen, so they do for a genuine checkpoint on the right DINOv2 file);
        `check_encoder=False` checks their names and shapes only. Pickles are read with
        ``torch.load(weights_only=True)``.
        """
        return _load_official(self, source, check_encoder)

    # --------------------------------------------------------------------------- training

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules().values() for p in module.parameters()]

    def make_optimizer(self) -> StableAdamW:
        o = self.options
        return StableAdamW(self.trainable_parameters(), lr=float(o["lr"]), betas=(0.9, 0.999), eps=1e-10,
                           weight_decay=float(o["weight_decay"]), amsgrad=True)

    def train_step(self, x: torch.Tensor, optimizer: torch.optim.Optimizer, step: int,
                   total: int) -> torch.Tensor:
        """One optimisation step at iteration `step` of `total`; returns the loss (a tensor)."""
        o = self.options
        lr = warm_cosine_lr(step, total, int(o["warmup"]), float(o["lr"]), float(o["final_lr"]))
        for group in optimizer.param_groups:
            group["lr"] = lr
        ramp = max(1, int(o["hard_mining_iters"]))
        p = min(float(o["hard_mining"]) * step / ramp, float(o["hard_mining"]))
        with self.autocast():
            en, de = self.features(self.input_tensor(x))
        loss = hard_mining_cosine_loss(en, de, p, float(o["hard_mining_factor"]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm=float(o["grad_clip"]))
        optimizer.step()
        return loss.detach()

    def fit(self, images: Sequence[ImageLike], categories: Sequence[str] | None = None, *,
            iterations: int | None = None, batch_size: int | None = None,
            progress: bool = True) -> list[float]:
        """Train the bottleneck and decoder on normal images (categories are not used: the
        model is one for all classes). Returns the loss of every iteration."""
        if not len(images):
            raise ValueError("dinomaly: fit needs at least one image")
        total = int(iterations if iterations is not None else self.options["iterations"])
        batch = int(batch_size if batch_size is not None else self.options["batch_size"])
        for module in self.modules().values():
            module.train()
        optimizer = self.make_optimizer()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)  # the bottleneck's dropout draws from here
            batches = self.endless(images, batch)
            losses = self.train_loop(
                total, lambda step: self.train_step(next(batches)[0], optimizer, step, total),
                progress)
        for module in self.modules().values():
            module.eval()
        return losses


# ------------------------------------------------------------------- official checkpoints


def _transformers_to_hub(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `hub_to_transformers`: transformers DINOv2-R keys → torch-hub keys."""
    fixed = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.mask_token": "mask_token",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    five = "encoder.layer.0.attention.q_proj.weight" in state
    q, k, v, o = (("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
                  if five else ("attention.attention.query", "attention.attention.key",
                                "attention.attention.value", "attention.output.dense"))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        parts = key.split(".")
        block, rest = parts[2], ".".join(parts[3:])
        prefix = f"blocks.{block}."
        head, kind = rest.rsplit(".", 1)
        if head == q:
            out[f"{prefix}attn.qkv.{kind}"] = torch.cat(
                [state[f"encoder.layer.{block}.{name}.{kind}"] for name in (q, k, v)], dim=0)
        elif head in (k, v):
            continue
        elif head == o:
            out[f"{prefix}attn.proj.{kind}"] = value
        elif head in ("layer_scale1", "layer_scale2"):
            out[f"{prefix}ls{head[-1]}.gamma"] = value
        else:
            out[f"{prefix}{head}.{kind}"] = value
    return out


def official_state_dict(detector: Dinomaly) -> dict[str, torch.Tensor]:
    """Our detector as the official ViTill state dict (encoder.*, bottleneck.0.*, decoder.*)."""
    encoder = detector.backbone.dino.model.state_dict()
    out = {f"encoder.{k}": v.detach().cpu() for k, v in _transformers_to_hub(encoder).items()}
    for key, value in detector.bottleneck.state_dict().items():
        out[f"bottleneck.0.{key}"] = value.detach().cpu()
    for key, value in detector.decoder.state_dict().items():
        out[f"decoder.{key}"] = value.detach().cpu()
    return out


def _read_official(source) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        state = torch.load(Path(source), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = dict(state[wrapper])
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_official_dinomaly(source, backbone: str = "dinov2_vitb14_reg", weights=None, *,
                           seed: int = 0, device=None, check_encoder: bool = True,
                           **options) -> Dinomaly:
    """Build a Dinomaly detector from an official ViTill checkpoint (a path or a state dict).

    `weights` is the DINOv2-R file the checkpoint's encoder came from (None = the usual caches);
    see `Dinomaly.load_official` for what is checked.
    """
    state = _read_official(source)
    detector = Dinomaly(backbone=backbone, weights=weights, seed=seed, device=device, **options)
    return detector.load_official(state, check_encoder=check_encoder)


def _load_official(detector: Dinomaly, source, check_encoder: bool) -> Dinomaly:
    state = _read_official(source)
    backbone = detector.backbone.name
    parts: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "bottleneck": {}, "decoder": {}}
    unknown = []
    for key, value in state.items():
        for prefix, part in (("encoder.", "encoder"), ("bottleneck.0.", "bottleneck"),
                             ("decoder.", "decoder")):
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"official Dinomaly checkpoint: unexpected keys {', '.join(unknown[:5])}")
    model = detector.backbone.dino.model
    try:
        encoder = hub_to_transformers(parts["encoder"], model)
    except (KeyError, ValueError) as error:
        raise ValueError(f"official Dinomaly checkpoint: {error}") from None
    # Validate everything before changing anything.
    for name, module, mapped in (("encoder", model, encoder),
                                 ("bottleneck", detector.bottleneck, parts["bottleneck"]),
                                 ("decoder", detector.decoder, parts["decoder"])):
        own = module.state_dict()
        missing = sorted(set(own) - set(mapped))
        extra = sorted(set(mapped) - set(own))
        if missing or extra:
            raise ValueError(f"official Dinomaly checkpoint does not fit {backbone}: {name} keys "
                             f"missing {missing[:5]}, unexpected {extra[:5]}")
        for key, value in mapped.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"official Dinomaly checkpoint: {name} {key} has shape "
                                 f"{tuple(value.shape)}, {backbone} expects "
                                 f"{tuple(own[key].shape)}")
            if (name == "encoder" and check_encoder
                    and not torch.equal(value.to(own[key].dtype).cpu(), own[key].cpu())):
                raise ValueError(
                    f"official Dinomaly checkpoint: its frozen encoder differs from the backbone "
                    f"weights {detector.backbone.weights} (first at {key}); pass the DINOv2 file "
                    "it was trained from, or check_encoder=False")
    detector.bottleneck.load_state_dict(parts["bottleneck"], strict=True)
    detector.decoder.load_state_dict(parts["decoder"], strict=True)
    detector.to(detector.device)
    for learned in detector.modules().values():
        learned.eval()
    return detector
