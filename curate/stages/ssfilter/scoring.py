"""SSFilter's scoring: how unlike the other images of its mini-batch each image looks, and the
lite filter that needs no training (../shared/papers/ssfilter.txt).

Every candidate image is scored by how unlike the other images of its mini-batch its patches
are, over ``kappa1`` random shufflings of the set (:func:`shufflings`); a sample is kept when it
was judged normal in more than ``kappa2`` of them (Sec. 3.6).

**lite** (:func:`run_lite`): the batch score is Algorithm 1, the patch comparison score
(:func:`mutual_scores`). In each batch every patch is compared (cosine) with every patch of the
*other* images of the batch (same-image blocks masked out); its patch score is 1 − the mean of
its top 0.1 % similarities (``sim_ratio``), and the image score the mean of its top 1 % patch
scores (``image_ratio``; 5 % of the weight-free descriptors' 8×8 grid, the same 2-3 patches).
*Judged normal* in a batch (:func:`select_normal`): the lower half of the batch's scores (Eq. 5,
``m = n // 2``), plus — the lite counterpart of Eq. 7's recall term, which needs the model's
uncertainty — the upper-half samples whose score is within ``recall_tau`` standard deviations
of the lower half's mean (μ₁ + τ·σ₁ of A′₁, the anchor Eq. 10 uses). With the median split alone
a sample above roughly the 55th percentile of the set rarely gets more than 5 of 20 votes, so
~40 % of a clean set would go; the recall keeps ordinary normal images and still drops outliers.
``recall_tau=None`` gives the literal lower-half rule.

The score of a sample is the mean of its batch scores over the shufflings; its votes the number
of shufflings in which it was judged normal (:class:`FilterResult`). Memory is bounded by the
batch: features are held per image (on disk above ``memory_limit``, :class:`FeatureBank`),
similarities only for one batch — B·P × B·P at most, computed in row chunks — never for the
whole set.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from curate.core.errors import CurateError
from curate.imaging.io import BadImage
from curate.stages.ssfilter.features import Descriptor, build_descriptor
from curate.stages.ssfilter.params import SSFilterParams

ImageSource = Callable[[int], np.ndarray]  # index -> decoded image (raises BadImage)
#: Called with (phase, done, total): "features", "training", "shufflings".
Progress = Callable[[str, int, int], None]


def mutual_scores(z: torch.Tensor, sim_ratio: float = 0.001, image_ratio: float = 0.01, *,
                  metric: str = "cosine", chunk_rows: int = 4096
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 on one mini-batch: (image scores (B,), patch scores (B, P)).

    ``z`` is (B, P, D). Each patch is compared with the batch's B·P patches, its own image's
    block masked out, ``chunk_rows`` patches at a time. ``metric="cosine"`` is the paper's:
    patch score = 1 − mean of the top ``sim_ratio`` similarities. ``"euclidean"`` (for the
    weight-free descriptors) z-scores every channel over the batch's patches and takes the mean
    distance to the ``sim_ratio`` nearest patches instead: centred features of an ordinary
    patch are close to zero, and the cosine of two such vectors is noise (a cosine after
    centring scores an ordinary patch of a homogeneous texture as an outlier).
    """
    batch, patches, dim = z.shape
    if batch < 2:
        raise ValueError("mutual scoring needs at least two images in a batch")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    z = z.float()
    flat = z.reshape(-1, dim)
    if metric == "cosine":
        z = F.normalize(z, dim=-1)
    else:
        z = (z - flat.mean(0)) / (flat.std(0) + 1e-6)
    flat = z.reshape(-1, dim)
    norms = (flat * flat).sum(-1)
    total = batch * patches
    k = min(max(1, int(total * sim_ratio)), total - patches)
    scores = torch.empty(batch, patches, device=z.device)
    step = max(1, chunk_rows // patches)
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        sims = z[start:stop] @ flat.T  # (images, P, B·P)
        if metric == "euclidean":  # negative distances: "most similar" is still the largest
            sims = -(norms[start * patches:stop * patches].view(stop - start, patches, 1)
                     + norms - 2 * sims).clamp_min(0).sqrt()
        for j in range(start, stop):
            sims[j - start, :, j * patches:(j + 1) * patches] = -math.inf
        best = sims.topk(k, dim=-1).values.mean(-1)
        scores[start:stop] = 1.0 - best if metric == "cosine" else -best
    top = max(1, int(patches * image_ratio))
    return scores.topk(top, dim=1).values.mean(1), scores


def select_normal(scores: np.ndarray, uncertainty: np.ndarray | None = None,
                  recall_tau: float | None = None, anchor: np.ndarray | None = None
                  ) -> np.ndarray:
    """Which samples of one batch are judged normal (bool array).

    Lower half of ``scores`` (Eq. 5, m = n // 2). With ``uncertainty`` (full mode, Eq. 7): plus
    the upper half whose uncertainty is at most μ₁, the mean uncertainty of the lower half of
    ``anchor`` (the raw patch scores: the split μ₁ comes from, Eq. 9's note; default ``scores``).
    Without it (lite): plus the upper half whose score is at most μ₁ + τ·σ₁ of the lower half's
    scores, τ = ``recall_tau`` (None: none recalled).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    m = max(1, n // 2)
    order = np.argsort(scores, kind="stable")
    lower = np.zeros(n, bool)
    lower[order[:m]] = True
    if uncertainty is not None:
        ref = np.argsort(np.asarray(anchor if anchor is not None else scores), kind="stable")[:m]
        return lower | (uncertainty <= np.asarray(uncertainty)[ref].mean())
    if recall_tau is None:
        return lower
    low = scores[lower]
    return lower | (scores <= low.mean() + recall_tau * low.std())


def minmax(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    return np.zeros_like(values) if span == 0 else (values - values.min()) / span


def shufflings(n: int, batch_size: int, kappa1: int, rng: np.random.Generator
               ) -> list[list[np.ndarray]]:
    """``kappa1`` random partitions of range(n) into batches of near-equal size (at most
    ``batch_size``, at least 2 when n >= 2: no image is ever scored alone)."""
    count = max(1, math.ceil(n / batch_size))
    return [np.array_split(rng.permutation(n), count) for _ in range(kappa1)]


class FeatureBank:
    """Per-image patch features, float16, in memory or (above ``memory_limit`` bytes) in a
    temporary memory-mapped file: the filter holds one batch of similarities at a time, and
    the features of 100k images need not fit in RAM."""

    def __init__(self, n: int, patches: int, dim: int, memory_limit: int = 2 << 30):
        shape = (n, patches, dim)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.data: np.ndarray
        if n * patches * dim * 2 > memory_limit:
            self._tmp = tempfile.TemporaryDirectory(prefix="ssfilter-")
            self.data = np.lib.format.open_memmap(os.path.join(self._tmp.name, "feat.npy"),
                                                  mode="w+", dtype=np.float16, shape=shape)
        else:
            self.data = np.empty(shape, np.float16)

    def batch(self, idx: np.ndarray, device: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.data[np.sort(idx)])[np.argsort(np.argsort(idx))]
                                ).to(device)

    def close(self) -> None:
        del self.data  # the memory map must be unmapped before its file is removed
        if self._tmp is not None:
            self._tmp.cleanup()


def describe_all(read: ImageSource, n: int, descriptor: Descriptor, batch_size: int,
                 progress: Callable[[int], None] | None = None,
                 memory_limit: int = 2 << 30) -> tuple[FeatureBank, dict[int, str]]:
    """Features of images 0..n-1 and {index: why} for those that could not be read."""
    bank: FeatureBank | None = None
    failed: dict[int, str] = {}
    for start in range(0, n, batch_size):
        images, idx = [], []
        for i in range(start, min(n, start + batch_size)):
            try:
                images.append(read(i))
                idx.append(i)
            except (BadImage, OSError, ValueError) as exc:
                failed[i] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BadImage) \
                    else str(exc)
        if images:
            feats = descriptor.describe(images).to("cpu", torch.float16).numpy()
            if bank is None:
                bank = FeatureBank(n, feats.shape[1], feats.shape[2], memory_limit)
            bank.data[idx] = feats
        if progress:
            progress(min(n, start + batch_size))
    if bank is None:
        raise CurateError("ssfilter: none of the images could be read")
    return bank, failed


@dataclass
class FilterResult:
    """Per-candidate results, in input order (NaN / 0 / False for unreadable images)."""

    scores: np.ndarray
    votes: np.ndarray
    kept: np.ndarray
    failed: dict[int, str]
    uncertainty: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def hard_normals(self, k: int, *, among_all: bool = False) -> np.ndarray:
        """Indices of the ``k`` kept samples (``among_all``: scored samples) with the highest
        scores, most anomalous first."""
        kept = np.flatnonzero((self.kept | among_all) & np.isfinite(self.scores))
        order = kept[np.argsort(-self.scores[kept], kind="stable")]
        return order[:k]

    def ranks(self) -> np.ndarray:
        """1 = most suspicious (highest score); unreadable images last."""
        s = np.where(np.isfinite(self.scores), self.scores, -np.inf)
        ranks = np.empty(len(s), int)
        ranks[np.argsort(-s, kind="stable")] = np.arange(1, len(s) + 1)
        return ranks


def describe_set(read: ImageSource, n: int, params: SSFilterParams, device: str,
                  progress: Progress | None, memory_limit: int
                  ) -> tuple[Descriptor, float, FeatureBank, dict[int, str]]:
    """The parameters' descriptor, its image ratio, the features of images 0..n-1 and the
    unreadable ones: what lite mode scores and weight-free full mode trains on."""
    descriptor = build_descriptor(params.backbone, params.weights, image_size=params.image_size,
                                  seed=0, device=device, border=params.border)
    tick = (lambda done: progress("features", done, n)) if progress else None
    bank, failed = describe_all(read, n, descriptor, params.batch_size, tick, memory_limit)
    return descriptor, params.image_ratio or descriptor.image_ratio, bank, failed


def run_lite(read: ImageSource, n: int, params: SSFilterParams, seed: int, *, device: str,
             progress: Progress | None = None, chunk_rows: int = 4096,
             memory_limit: int = 2 << 30) -> FilterResult:
    """Lite mode over images 0..n-1: every image described once, then Algorithm 1 on every
    batch of every shuffling (no training)."""
    descriptor, image_ratio, bank, failed = describe_set(read, n, params, device, progress,
                                                         memory_limit)
    try:
        good = np.array([i for i in range(n) if i not in failed], dtype=int)
        scores = np.full(n, np.nan)
        votes = np.zeros(n, int)
        if len(good) < 2:
            return FilterResult(scores, votes, np.isin(np.arange(n), good), failed)
        total = np.zeros(n)
        rng = np.random.default_rng(rng_seed(seed, "shufflings"))
        plan = shufflings(len(good), params.batch_size, params.kappa1, rng)
        batches = sum(len(p) for p in plan)
        done = 0
        for partition in plan:
            for members in partition:
                idx = good[members]
                batch_scores, _ = mutual_scores(bank.batch(idx, device), params.sim_ratio,
                                                image_ratio, metric=descriptor.metric,
                                                chunk_rows=chunk_rows)
                a = batch_scores.cpu().double().numpy()
                total[idx] += a
                votes[idx] += select_normal(a, recall_tau=params.recall_tau)
                done += 1
                if progress:
                    progress("shufflings", done, batches)
        scores[good] = total[good] / params.kappa1
        kept = votes > params.kappa2
        return FilterResult(scores, votes, kept, failed,
                            info={"descriptor": descriptor.provenance, "batches": batches})
    finally:
        bank.close()


def rng_seed(seed: int, *parts: str) -> int:
    digest = hashlib.sha256("\x00".join([str(seed), "ssfilter", *parts]).encode()).digest()
    return int.from_bytes(digest[:16], "little")
