"""A Dinomaly-style reconstruction model over fixed patch descriptors.

SSFilter's full mode (``curate.stages.ssfilter.models``) trains a decoder to rebuild a frozen
encoder's patch features through a noisy bottleneck, and reads its uncertainty off K dropout
passes. The paper's encoder is a pretrained DINOv2; where no pretrained weights exist the
frozen encoder is one of the weight-free descriptors of ``curate.stages.ssfilter.features``. Because such
an encoder is fixed, its features are computed once per image and the model here works on them
directly: it never sees pixels, so training costs a small fraction of a ViT's.

The shape follows Dinomaly: dropout on the input features (the noisy bottleneck: the same
dropout gives the K masked models of the uncertainty estimate), a two-layer MLP into the
model width, a few pre-norm self-attention blocks over the image's patches (with a learned
position embedding), and a linear map back to the descriptor's channels. The loss and the
anomaly map are per-patch squared errors of channel-standardised features: the weight-free
descriptors are compared by Euclidean distance after standardising, and their patches near
zero after centring make a cosine loss meaningless (see
``curate.stages.ssfilter.scoring.mutual_scores``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PatchDecoder(nn.Module):
    """(B, P, D) standardised patch features → their reconstruction, through dropout."""

    width = 128  # model channels and attention blocks of the default decoder
    depth = 2

    def __init__(self, patches: int, dim: int, width: int | None = None,
                 depth: int | None = None, heads: int = 4, dropout: float = 0.2):
        super().__init__()
        width, depth = width or self.width, depth or self.depth
        self.bottleneck = nn.Dropout(dropout)
        self.embed = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width))
        self.position = nn.Parameter(torch.zeros(1, patches, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(depth))
        self.head = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.bottleneck(x)) + self.position
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def patch_errors(model: PatchDecoder, x: torch.Tensor) -> torch.Tensor:
    """(B, P) mean squared reconstruction error of every patch: the anomaly map."""
    return (model(x) - x).pow(2).mean(dim=-1)


def channel_stats(data: np.ndarray, rows: np.ndarray, chunk: int = 1024
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of every channel over all patches of the images ``rows`` of
    ``data`` (N, P, D), read ``chunk`` images at a time (``data`` may be a memory-mapped file),
    in float64 so that the result does not depend on the chunking."""
    total = np.zeros(data.shape[-1])
    squares = np.zeros(data.shape[-1])
    count = 0
    rows = np.sort(np.asarray(rows, dtype=int))
    for start in range(0, len(rows), chunk):
        part = np.asarray(data[rows[start:start + chunk]], dtype=np.float64)
        part = part.reshape(-1, data.shape[-1])
        total += part.sum(axis=0)
        squares += (part * part).sum(axis=0)
        count += len(part)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean * mean, 0.0)) + 1e-6
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()
