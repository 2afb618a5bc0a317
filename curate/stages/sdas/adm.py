"""The ADM UNet of guided-diffusion (Dhariwal & Nichol 2021), as RealNet's SDAS uses it.

Module names and parameter shapes follow the official layout exactly (``time_embed``,
``label_emb``, ``input_blocks.N.M``, ``middle_block``, ``output_blocks``, ``out``; ResBlocks with
``in_layers`` / ``emb_layers`` / ``out_layers`` / ``skip_connection``; attention blocks with
``norm`` / ``qkv`` / ``proj_out``), so the released checkpoints load with ``strict=True``
(:func:`curate.stages.sdas.checkpoints.load_adm_checkpoint`). The RealNet MVTec configuration
(:func:`realnet_config`) has 567 keys and 552.8M parameters.

The attention blocks and the input half of the ResBlocks are :mod:`detectors.layers`', shared
with RealNet's reconstruction networks; attention runs through
:func:`torch.nn.functional.scaled_dot_product_attention` (flash or memory-efficient kernels on a
GPU) on the "legacy" head split of the official code: the ``qkv`` projection's channels are
grouped by head first, then q/k/v within each head.

``attention_ds`` holds *downsample factors* (1 = full resolution), as RealNet's configuration
passes them; OpenAI's scripts convert resolutions with ``image_size // res`` instead, and the two
agree only at 256 px.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from detectors.layers import (
    AttentionBlock,
    Norm,
    ResBlockBase,
    group_norm,
    skip_connection,
    zero_module,
)


@dataclass(frozen=True)
class ADMConfig:
    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    #: 6 = epsilon and the learned-range variance interpolation (learn_sigma).
    out_channels: int = 6
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (8, 16, 32)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    #: None: unconditional (no ``label_emb``).
    num_classes: int | None = None
    num_heads: int = 4
    #: Channels per attention head; -1 means use ``num_heads`` heads.
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    dropout: float = 0.0
    norm_groups: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ADMConfig:
        d = dict(d)
        for key in ("attention_ds", "channel_mult"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def realnet_config(num_classes: int | None = 15) -> ADMConfig:
    """RealNet's MVTec-AD SDAS UNet (``experiments/MVTec-AD/sample.yaml``)."""
    return ADMConfig(num_classes=num_classes)


def tiny_config(**overrides) -> ADMConfig:
    """A small (0.36M-parameter) ADM with every kind of block, for tests on a CPU."""
    base: dict[str, Any] = dict(image_size=32, model_channels=16, num_res_blocks=1, attention_ds=(2, 4),
                channel_mult=(1, 2, 2), num_head_channels=8, norm_groups=8)
    return ADMConfig(**(base | overrides))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepSequential(nn.Sequential):
    """A sequence of layers; those that take the embedding (ResBlocks) get it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Resample(nn.Module):
    """Nearest 2x upsampling or 2x downsampling, optionally with a 3x3 convolution.

    The convolution lives under ``conv`` (up) or ``op`` (down), the official names.
    """

    def __init__(self, channels: int, up: bool, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.up = up
        out_channels = out_channels or channels
        self.op: nn.Module  # down: a strided convolution or an average pooling
        if up:
            if use_conv:
                self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        elif use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if hasattr(self, "conv") else x
        return self.op(x)


class ResBlock(ResBlockBase):
    """The shared input half, then the timestep embedding (added, or as a scale and shift of
    the second norm), norm → SiLU → dropout → zero-initialised 3×3 conv, and the skip."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 *, scale_shift: bool, norm: Norm, up: bool = False, down: bool = False):
        resample = partial(Resample, channels, up=up, use_conv=False) if up or down else None
        super().__init__(channels, out_channels, norm, resample)
        self.scale_shift = scale_shift
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels))
        self.out_layers = nn.Sequential(
            norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = skip_connection(channels, out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h, x = self.input_half(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class ADMUNet(nn.Module):
    """``forward(x, t, y=None)`` -> [B, out_channels, H, W] (epsilon, then the variance term)."""

    def __init__(self, config: ADMConfig):
        super().__init__()
        self.config = cfg = config
        mc = cfg.model_channels
        norm = partial(group_norm, groups=cfg.norm_groups, in_float32=True)
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def res(cin, cout, **kw):
            return ResBlock(cin, emb_dim, cfg.dropout, cout, scale_shift=cfg.use_scale_shift_norm,
                            norm=norm, **kw)

        def attn(ch):
            return AttentionBlock(ch, norm, num_heads=cfg.num_heads,
                                  num_head_channels=cfg.num_head_channels)

        ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != last:
                down = res(ch, ch, down=True) if cfg.resblock_updown else \
                    Resample(ch, up=False, use_conv=True)
                self.input_blocks.append(TimestepSequential(down))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else
                                  Resample(ch, up=True, use_conv=True))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        if (y is None) != (self.config.num_classes is None):
            raise ValueError("pass class labels y exactly when the model is class-conditional "
                             f"(num_classes={self.config.num_classes})")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
