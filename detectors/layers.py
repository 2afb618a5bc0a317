"""Network blocks shared by the detectors and by curate's SDAS diffusion UNet.

RealNet's reconstruction networks (`detectors.realnet`) and guided-diffusion's ADM UNet
(`curate.stages.sdas.adm`) are built from the same blocks, with the official module names so
that the released checkpoints load strictly: residual blocks (`in_layers`, `h_upd` / `x_upd`,
`skip_connection`) and self-attention blocks (`norm`, `qkv`, `proj_out`). Each network chooses
its normalisation (a `Norm`) and its up-sampling; everything else is here once.
`fuse_batchnorm` folds a frozen backbone's BatchNorms into its convolutions (CRAS, RealNet).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F

#: Makes the normalisation layer of a block for its number of channels.
Norm = Callable[[int], nn.Module]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as guided-diffusion does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def group_norm(channels: int, groups: int, *, in_float32: bool = False) -> nn.GroupNorm:
    """A GroupNorm of `groups` groups over `channels`, with a message naming the option to
    change when they do not divide; `in_float32` gives guided-diffusion's `GroupNorm32`."""
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} norm groups "
                         "(set norm_groups or the channel sizes)")
    return GroupNorm32(groups, channels) if in_float32 else nn.GroupNorm(groups, channels)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def zero_module(module: ModuleT) -> ModuleT:
    """`module` with every parameter set to zero: an output layer that starts as a no-op."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def skip_connection(channels: int, out_channels: int) -> nn.Module:
    """A residual block's skip path: the identity, or a 1×1 convolution when the width changes."""
    return nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)


class ResBlockBase(nn.Module):
    """What the residual blocks of guided-diffusion's UNet family share: the input half
    `in_layers` (norm → SiLU → 3×3 convolution to `out_channels`) and, in an up- or
    down-sampling block, `h_upd` (between the activation and the convolution) and `x_upd` (on
    the skip path), two modules from `resample`.

    A subclass adds its own layers and then `skip_connection`: modules are created in the
    official order, which fixes both the state-dict order and what a seeded initialisation
    draws."""

    def __init__(self, channels: int, out_channels: int, norm: Norm,
                 resample: Callable[[], nn.Module] | None = None):
        super().__init__()
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = resample is not None
        if resample is not None:
            self.h_upd, self.x_upd = resample(), resample()

    def input_half(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`in_layers` of x, resampled in a resampling block; x as the skip path takes it)."""
        if not self.updown:
            return self.in_layers(x), x
        h = self.in_layers[2](self.h_upd(self.in_layers[1](self.in_layers[0](x))))
        return h, self.x_upd(x)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the positions of a map: a norm, a 1×1 `qkv` projection,
    scaled dot-product attention, a zero-initialised 1×1 `proj_out`, and the residual connection.

    The heads are `channels / num_head_channels`, or `num_heads` when `num_head_channels` is -1.
    The `qkv` channels are grouped by head first, then q/k/v within each head (the "legacy"
    order of guided-diffusion, which RealNet keeps). Attention runs through
    `F.scaled_dot_product_attention` (flash or memory-efficient kernels on a GPU)."""

    def __init__(self, channels: int, norm: Norm, *, num_heads: int = 1,
                 num_head_channels: int = -1):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"attention width {channels} is not a multiple of "
                                 f"num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        flat = x.reshape(batch, channels, -1)
        qkv = self.qkv(self.norm(flat))
        length = qkv.shape[-1]
        width = channels // self.num_heads
        # [B, heads, 3·width, T] -> q, k, v of [B, heads, T, width]
        q, k, v = qkv.reshape(batch, self.num_heads, 3 * width, length).transpose(-1, -2) \
            .split(width, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(batch, channels, length)
        return (flat + self.proj_out(out)).reshape(batch, channels, *spatial)


def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into it, in place (a
    Sequential's consecutive pair, or a ResNet block's convN/bnN); the BatchNorm becomes an
    Identity. Only for frozen modules: the result computes the same function, faster."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in list(module.modules()):
        pairs = []
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            pairs = list(zip(names, names[1:], strict=False))
        else:
            pairs = [(f"conv{i}", f"bn{i}") for i in range(1, 4)]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(parent, bn_name, nn.Identity())
    return module
