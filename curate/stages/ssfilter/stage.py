"""ssfilter: take anomalies out of a "normal" training set (SSFilter, ../shared/papers/ssfilter.txt).

Every candidate image is scored by how unlike the other images of its mini-batch its patches
are, over ``kappa1`` random shufflings of the set; a sample is kept when it was judged normal in
more than ``kappa2`` of them (Sec. 3.6). Two modes:

- **lite** (no training): the batch score is Algorithm 1, the patch comparison score. In each
  batch every patch is compared (cosine) with every patch of the *other* images of the batch
  (same-image blocks masked out); its patch score is 1 − the mean of its top 0.1 % similarities
  (``sim_ratio``), and the image score the mean of its top 1 % patch scores (``image_ratio``;
  5 % of the weight-free descriptors' 8×8 grid, the same 2-3 patches).
  *Judged normal* in a batch: the lower half of the batch's scores (Eq. 5, ``m = n // 2``),
  plus — the lite counterpart of Eq. 7's recall term, which needs the model's uncertainty — the
  upper-half samples whose score is within ``recall_tau`` standard deviations of the lower
  half's mean (μ₁ + τ·σ₁ of A′₁, the anchor Eq. 10 uses). With the median split alone a sample
  above roughly the 55th percentile of the set rarely gets more than 5 of 20 votes, so ~40 % of a
  clean set would go; the recall keeps ordinary normal images and still drops outliers.
  ``recall_tau=None`` gives the literal lower-half rule.
- **full**: the Dinomaly-style model of ``detectors.dinomaly`` (frozen DINOv2-R encoder, noisy
  bottleneck, linear-attention decoder) is trained on the set with synergy selection: each
  iteration scores its batch (patch comparison a, uncertainty u = std of the top-1 % map means
  over ``passes`` dropout passes of the bottleneck), selects per Eq. 7 and trains on the selected
  samples; after ``cold_start`` iterations the score is ½(minmax(a) + minmax(u)) (Eq. 9), μ₁ still
  from the split of the raw scores. The trained filter then votes over ``kappa1`` shufflings with
  the same rule. With a DINOv2 backbone (real weights to be meaningful) that is the paper's
  model; with a weight-free descriptor (``randconv``, ``texture``) the frozen encoder is the
  descriptor and the model a Dinomaly-shaped decoder over its stored patch features
  (``curate.stages.ssfilter.decoder``).

The score of a sample is the mean of its batch scores over the shufflings; its votes the number
of shufflings in which it was judged normal. Memory is bounded by the batch: features are held
per image (on disk above ``memory_limit``), similarities only for one batch — B·P × B·P at most,
computed in row chunks — never for the whole set.

In a manifest, the candidates are the kept normal (``good``) samples not already in test, per
category. A sample that fails is dropped with reason ``noise_filter`` (its votes, the needed
count, score and rank in the detail); every scored sample records ``ssfilter.score`` and
``ssfilter.votes`` (``ssfilter.uncertainty`` in full mode). With ``hard_normals=K`` the K kept
candidates of each category with the highest scores are flagged ``hard_normal`` ("normal
samples with confusing attached elements", HSS-IAD III-A): the split stage puts them in test and
review shows the flag. ``drop=False`` only scores and flags (the K flagged are then the K
highest-scoring of all candidates). For a plain folder of images see
:func:`filter_folder` (``curate filter-noise``).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from curate.core.errors import CurateError
from curate.core.files import walk_files
from curate.core.manifest import GOOD, KEPT, Manifest
from curate.engine.runner import Context, SampleEnv, Stage, apply_update, params_dict
from curate.imaging.io import BadImage, decode, is_image_name
from curate.stages.ssfilter.decoder import PatchDecoder, channel_stats, patch_errors
from curate.stages.ssfilter.features import (
    DEFAULT_DESCRIPTOR,
    WEIGHT_FREE,
    Descriptor,
    build_descriptor,
)

NOISE_FILTER = "noise_filter"
HARD_NORMAL = "hard_normal"
REPORT = "ssfilter-report.csv"
REMOVED_SHEET = "removed.png"
HARD_SHEET = "hard-normals.png"


@dataclass(frozen=True)
class SSFilterParams:
    mode: str = field(default="lite", metadata={
        "choices": ("lite", "full"),
        "help": "lite: patch comparison only (no training); full: a Dinomaly-style model with "
                "dropout uncertainty, trained on the set (a DINOv2 backbone, or a decoder over "
                "the randconv / texture descriptor)."})
    kappa1: int = field(default=20, metadata={
        "min": 1, "help": "Random shufflings of the set (voting rounds)."})
    kappa2: int = field(default=5, metadata={
        "min": 0, "help": "Keep a sample judged normal in more than this many shufflings."})
    batch_size: int = field(default=32, metadata={"min": 2})
    backbone: str = field(default=DEFAULT_DESCRIPTOR, metadata={
        "help": "Patch descriptor: randconv or texture (no weights), or a bundled backbone "
                "(dinov2_vits14_reg, wide_resnet50_2, ...)."})
    weights: str | None = field(default=None, metadata={
        "help": "Backbone weight file or folder (default: local caches; 'random' for tests)."})
    image_size: int | None = field(default=None, metadata={
        "min": 16, "help": "Square size images are resized to  [default: 256, 224 for DINOv2]"})
    sim_ratio: float = 0.001
    #: Share of an image's patch scores averaged into its score; None: the descriptor's
    #: (1 % of the 16×16 backbone grid as in the paper, 5 % of randconv's 8×8 grid).
    image_ratio: float | None = None
    border: float = field(default=0.04, metadata={
        "min": 0, "max": 0.5, "max_open": True,
        "help": "randconv: share of each side of an image left out of its patches (fixture "
                "edges and dark strips along a side outrank real defects)."})
    #: None: the lower half only (on the command line: a negative number).
    recall_tau: float | None = field(default=3.0, metadata={
        "help": "Lite: also judge normal the upper-half samples within this many standard "
                "deviations of the lower half's mean (negative: lower half only)."})
    hard_normals: int = field(default=0, metadata={
        "min": 0,
        "help": "Flag the K kept normal images that look most anomalous (per category)."})
    drop: bool = field(default=True, metadata={"help": "Manifest mode: score and flag only."})
    # full mode
    iterations: int = field(default=2000, metadata={
        "min": 1, "help": "Full mode: training iterations."})
    cold_start: int = field(default=1000, metadata={
        "min": 0, "help": "Full mode: iterations before uncertainty joins the score."})
    passes: int = 10
    dropout: float = 0.2
    device: str | None = field(default=None, metadata={
        "help": "torch device (default: cuda if present). With --executor ray, 'cuda' makes "
                "each category a Ray task that asks for one GPU."})

    def __post_init__(self):
        if self.mode not in ("lite", "full"):
            raise ValueError(f"mode must be 'lite' or 'full', got {self.mode!r}")
        if self.kappa1 < 1 or not 0 <= self.kappa2 < self.kappa1:
            raise ValueError(f"need kappa1 >= 1 and 0 <= kappa2 < kappa1, got {self.kappa1}, "
                             f"{self.kappa2}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")
        if not (0 < self.sim_ratio <= 1 and 0 < (self.image_ratio or 1) <= 1):
            raise ValueError("sim_ratio and image_ratio must be in (0, 1]")
        if not 0 <= self.border < 0.5:
            raise ValueError(f"border must be in [0, 0.5), got {self.border}")
        if self.hard_normals < 0:
            raise ValueError(f"hard_normals must be >= 0, got {self.hard_normals}")
        if self.mode == "full":
            if not (self.backbone.startswith("dinov2") or self.backbone in WEIGHT_FREE):
                raise ValueError("mode 'full' trains a Dinomaly-style model: it needs a DINOv2 "
                                 "backbone (e.g. dinov2_vits14_reg with --weights) or a "
                                 f"weight-free descriptor ({', '.join(WEIGHT_FREE)}), not "
                                 f"{self.backbone!r}")
            if self.passes < 2:
                raise ValueError(f"passes must be at least 2, got {self.passes}")


# ------------------------------------------------------------------------------ scoring
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


# ------------------------------------------------------------------------------ features
class FeatureBank:
    """Per-image patch features, float16, in memory or (above ``memory_limit`` bytes) in a
    temporary memory-mapped file: the filter holds one batch of similarities at a time, and
    the features of 100k images need not fit in RAM."""

    def __init__(self, n: int, patches: int, dim: int, memory_limit: int = 2 << 30):
        shape = (n, patches, dim)
        self._tmp = None
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
        self.data = None
        if self._tmp is not None:
            self._tmp.cleanup()


ImageSource = Callable[[int], np.ndarray]  # index -> decoded image (raises BadImage)


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


def _describe_set(read: ImageSource, n: int, params: SSFilterParams, device: str,
                  progress: Callable[[str, int, int], None] | None, memory_limit: int
                  ) -> tuple[Descriptor, float, FeatureBank, dict[int, str]]:
    """The parameters' descriptor, its image ratio, the features of images 0..n-1 and the
    unreadable ones: what lite mode scores and weight-free full mode trains on."""
    descriptor = build_descriptor(params.backbone, params.weights, image_size=params.image_size,
                                  seed=0, device=device, border=params.border)
    tick = (lambda done: progress("features", done, n)) if progress else None
    bank, failed = describe_all(read, n, descriptor, params.batch_size, tick, memory_limit)
    return descriptor, params.image_ratio or descriptor.image_ratio, bank, failed


def run_filter(read: ImageSource, n: int, params: SSFilterParams, seed: int, *,
               device: str | None = None, progress: Callable[[str, int, int], None] | None = None,
               memory_limit: int = 2 << 30, chunk_rows: int = 4096) -> FilterResult:
    """SSFilter over images 0..n-1 (``read(i)`` decodes image i): scores, votes, kept."""
    if n == 0:
        raise CurateError("ssfilter: there are no images to filter")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if params.mode == "full":
        return run_full(read, n, params, seed, device=device, progress=progress,
                        chunk_rows=chunk_rows, memory_limit=memory_limit)
    descriptor, image_ratio, bank, failed = _describe_set(read, n, params, device, progress,
                                                         memory_limit)
    try:
        good = np.array([i for i in range(n) if i not in failed], dtype=int)
        scores = np.full(n, np.nan)
        votes = np.zeros(n, int)
        if len(good) < 2:
            return FilterResult(scores, votes, np.isin(np.arange(n), good), failed)
        total = np.zeros(n)
        rng = np.random.default_rng(_rng_seed(seed, "shufflings"))
        plan = shufflings(len(good), params.batch_size, params.kappa1, rng)
        batches = sum(len(p) for p in plan)
        done = 0
        for partition in plan:
            for members in partition:
                idx = good[members]
                a, _ = mutual_scores(bank.batch(idx, device), params.sim_ratio,
                                     image_ratio, metric=descriptor.metric,
                                     chunk_rows=chunk_rows)
                a = a.cpu().double().numpy()
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


def _rng_seed(seed: int, *parts: str) -> int:
    digest = hashlib.sha256("\x00".join([str(seed), "ssfilter", *parts]).encode()).digest()
    return int.from_bytes(digest[:16], "little")


# ------------------------------------------------------------------------------ full mode
def _pass_spread(per_pass: list[torch.Tensor]) -> np.ndarray:
    """u of Sec. 3.3: the std over the dropout passes of each image's score, the mean of the
    top share of its anomaly map (one (B,) tensor per pass)."""
    return torch.stack(per_pass).float().std(dim=0).cpu().double().numpy()


class _DinomalyFilter:
    """Full mode on a DINOv2 encoder (``detectors.dinomaly``): every batch is read and encoded
    again, as the paper does."""

    def __init__(self, read: ImageSource, n: int, params: SSFilterParams, seed: int,
                 device: str, chunk_rows: int):
        from detectors.dinomaly import Dinomaly

        size = params.image_size or 224
        self.det = Dinomaly(params.backbone, params.weights, seed=seed, device=device,
                            image_size=size, crop_size=size, map_size=size,
                            dropout=params.dropout, batch_size=params.batch_size,
                            iterations=params.iterations)
        self.read, self.params, self.chunk_rows = read, params, chunk_rows
        self.device = self.det.device
        self.failed: dict[int, str] = {}
        for i in range(n):  # one decoding pass: unreadable images are reported, not trained on
            try:
                read(i)
            except (BadImage, OSError, ValueError) as exc:
                self.failed[i] = str(exc)
        self.info = {"backbone": self.det.backbone.describe()}

    def start(self) -> None:
        self.optimizer = self.det.make_optimizer()

    def batch(self, idx: np.ndarray) -> torch.Tensor:
        det = self.det
        return det.input_tensor(torch.stack([det.geometry.to_input(self.read(int(i)))
                                             for i in idx]))

    def scores(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(patch comparison scores a, uncertainty u): a from the frozen encoder's Eq. 1
        features, u over ``passes`` dropout passes of the bottleneck."""
        from curate.stages.ssfilter.features import vit_patch_features

        det, params = self.det, self.params
        encoder = det.backbone.module
        with torch.no_grad(), det.autocast():
            z = vit_patch_features(encoder(x, depth=8), encoder.num_prefix_tokens)
            a, _ = mutual_scores(z, params.sim_ratio, params.image_ratio or 0.01,
                                 chunk_rows=self.chunk_rows)
            det.bottleneck.train()  # dropout on: each pass is one masked model (Eq. 2)
            grid = (x.shape[-2] // encoder.patch_size, x.shape[-1] // encoder.patch_size)
            passes = [det.anomaly_maps(*det.features(x), grid)[0] for _ in range(params.passes)]
        return a.float().cpu().double().numpy(), _pass_spread(passes)

    def train(self, x: torch.Tensor, chosen: np.ndarray, step: int) -> None:
        self.det.decoder.train()
        self.det.train_step(x[torch.from_numpy(np.flatnonzero(chosen)).to(x.device)],
                            self.optimizer, step, self.params.iterations)

    def finish(self) -> None:
        self.det.decoder.eval()

    def close(self) -> None:
        """Nothing is stored: every batch is read again."""


class _DescriptorFilter:
    """Full mode on a weight-free descriptor (``curate.stages.ssfilter.decoder``): the encoder is fixed,
    so every image is described once and the decoder trains on the stored features."""

    #: AdamW, not Dinomaly's StableAdamW at 2e-3: the decoder is small and starts from scratch.
    lr = 1e-3
    weight_decay = 1e-4

    def __init__(self, read: ImageSource, n: int, params: SSFilterParams, device: str,
                 chunk_rows: int, progress, memory_limit: int):
        self.descriptor, self.image_ratio, self.bank, self.failed = _describe_set(
            read, n, params, device, progress, memory_limit)
        good = np.array([i for i in range(n) if i not in self.failed], dtype=int)
        # The decoder's input is standardised with the statistics of the candidates it filters.
        self.mean, self.std = (t.to(device) for t in channel_stats(self.bank.data, good))
        self.params, self.chunk_rows = params, chunk_rows
        self.device = torch.device(device)
        self.info = {"descriptor": self.descriptor.provenance,
                     "decoder": {"width": PatchDecoder.width, "depth": PatchDecoder.depth,
                                 "optimizer": "AdamW", "lr": self.lr,
                                 "weight_decay": self.weight_decay}}

    def start(self) -> None:
        # Called inside the filter's seeded torch RNG: the initial weights follow the seed.
        _, patches, dim = self.bank.data.shape
        self.model = PatchDecoder(patches, dim, dropout=self.params.dropout).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr,
                                           weight_decay=self.weight_decay)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.bank.batch(idx, str(self.device)).float()
        return raw, (raw - self.mean) / self.std

    def scores(self, x: tuple[torch.Tensor, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        raw, z = x
        params = self.params
        with torch.no_grad():
            a, _ = mutual_scores(raw, params.sim_ratio, self.image_ratio,
                                 metric=self.descriptor.metric, chunk_rows=self.chunk_rows)
            self.model.train()  # dropout on: each pass is one masked model (Eq. 2)
            top = max(1, int(z.shape[1] * self.image_ratio))
            passes = [patch_errors(self.model, z).topk(top, dim=1).values.mean(1)
                      for _ in range(params.passes)]
        return a.cpu().double().numpy(), _pass_spread(passes)

    def train(self, x: tuple[torch.Tensor, torch.Tensor], chosen: np.ndarray, step: int) -> None:
        z = x[1][torch.from_numpy(np.flatnonzero(chosen)).to(self.device)]
        self.model.train()
        loss = patch_errors(self.model, z).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def finish(self) -> None:
        self.model.eval()

    def close(self) -> None:
        self.bank.close()


def _synergy(a: np.ndarray, u: np.ndarray, combine: bool) -> tuple[np.ndarray, np.ndarray]:
    """(score, judged normal) of one batch: Eq. 9 when ``combine`` (after the cold start), then
    Eq. 7 with μ₁ from the split of the raw scores."""
    score = 0.5 * (minmax(a) + minmax(u)) if combine else a
    return score, select_normal(score, u, anchor=a)


def run_full(read: ImageSource, n: int, params: SSFilterParams, seed: int, *, device: str,
             progress: Callable[[str, int, int], None] | None = None,
             chunk_rows: int = 4096, memory_limit: int = 2 << 30) -> FilterResult:
    """Train the filter model with synergy selection, then vote over the shufflings: the
    Dinomaly model on a DINOv2 encoder, or the patch decoder on a weight-free descriptor."""
    if params.backbone in WEIGHT_FREE:
        model = _DescriptorFilter(read, n, params, device, chunk_rows, progress, memory_limit)
    else:
        model = _DinomalyFilter(read, n, params, seed, device, chunk_rows)
    try:
        return _train_and_vote(model, n, params, seed, progress)
    finally:
        model.close()


def _train_and_vote(model, n: int, params: SSFilterParams, seed: int,
                    progress: Callable[[str, int, int], None] | None) -> FilterResult:
    failed = model.failed
    good = np.array([i for i in range(n) if i not in failed], dtype=int)
    scores, votes = np.full(n, np.nan), np.zeros(n, int)
    if len(good) < 2:
        return FilterResult(scores, votes, np.isin(np.arange(n), good), failed)
    rng = np.random.default_rng(_rng_seed(seed, "full-train"))
    batch = min(params.batch_size, len(good))
    order: list[int] = []
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_rng_seed(seed, "dropout") % (2 ** 63))
        model.start()
        for step in range(params.iterations):
            if len(order) < batch:
                order += rng.permutation(good).tolist()
            idx, order = np.array(order[:batch]), order[batch:]
            x = model.batch(idx)
            a, u = model.scores(x)
            _, chosen = _synergy(a, u, step >= params.cold_start)
            model.train(x, chosen, step)
            if progress:
                progress("training", step + 1, params.iterations)
        model.finish()
        total, unc = np.zeros(n), np.zeros(n)
        plan = shufflings(len(good), params.batch_size, params.kappa1,
                          np.random.default_rng(_rng_seed(seed, "shufflings")))
        batches, done = sum(len(p) for p in plan), 0
        for partition in plan:
            for members in partition:
                idx = good[members]
                a, u = model.scores(model.batch(idx))
                score, normal = _synergy(a, u, params.iterations > params.cold_start)
                total[idx] += score
                unc[idx] += u
                votes[idx] += normal
                done += 1
                if progress:
                    progress("shufflings", done, batches)
    scores[good] = total[good] / params.kappa1
    uncertainty = np.full(n, np.nan)
    uncertainty[good] = unc[good] / params.kappa1
    return FilterResult(scores, votes, votes > params.kappa2, failed, uncertainty,
                        info=model.info | {"batches": batches})


# ------------------------------------------------------------------------------ manifest stage
def _round(value: float) -> float:
    """Six significant digits: a recorded score must not carry float noise into the id."""
    return float(f"{value:.6g}")


class SSFilter(Stage):
    name = "ssfilter"
    version = "2"
    Params = SSFilterParams
    uses_seed = True

    def recorded_params(self, params: SSFilterParams) -> dict[str, Any]:
        recorded = params_dict(params)
        weights = params.weights
        if weights not in (None, "random") and Path(weights).exists():
            from detectors.backbones import file_sha256

            path = Path(weights)
            file = path / "model.safetensors" if path.is_dir() else path
            recorded["weights"] = f"sha256:{file_sha256(file)}"
        return recorded

    def gpus(self, params: SSFilterParams) -> float:
        return 1 if (params.device or "").startswith("cuda") else 0

    def run(self, inputs: list[Manifest], params: SSFilterParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        rows = manifest.row_list()
        env = ctx.env(self.name, params, manifest.roots, seed=True)
        by_category: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if row["status"] == KEPT and row["label"] == GOOD and row["split"] != "test":
                by_category.setdefault(row["category"], []).append(i)
        categories = sorted(by_category)
        with ctx._progress_bar() as bar:
            # One job per category (categories are filtered independently): under
            # --executor ray each is a task, on a GPU of the cluster when the device is one.
            jobs = []
            for category in categories:
                tick = None
                if ctx.executor != "ray":  # a progress callback cannot travel to a worker
                    task = bar.add_task(f"ssfilter {category}", total=None)

                    def tick(what, done, total, task=task, category=category):
                        bar.update(task, description=f"ssfilter {category}: {what}",
                                   completed=done, total=total)

                jobs.append(CategoryJob(env, tuple(rows[i] for i in by_category[category]),
                                        _rng_seed(ctx.seed, category) % (2 ** 63), tick))
            results = ctx.tasks(filter_category, jobs, num_gpus=self.gpus(params),
                                desc="ssfilter")
            for category, result in zip(categories, results, strict=True):
                members = by_category[category]
                updates = _updates(result, [rows[i] for i in members], params)
                for i, update in zip(members, updates, strict=True):
                    rows[i] = apply_update(rows[i], update, self.name)
        return self.output(manifest, rows, params, ctx)


@dataclass(frozen=True)
class CategoryJob:
    """One category's candidates to filter: picklable (but for the optional progress
    callback, which only the in-process executors pass)."""

    env: SampleEnv
    rows: tuple[dict[str, Any], ...]
    seed: int
    progress: Callable[[str, int, int], None] | None = None


def filter_category(job: CategoryJob) -> FilterResult:
    def read(k: int) -> np.ndarray:
        return decode(job.env.read_source(job.rows[k]))

    return run_filter(read, len(job.rows), job.env.params, job.seed,
                      device=job.env.params.device, progress=job.progress)


def _updates(result: FilterResult, rows: list[dict], params: SSFilterParams
             ) -> list[dict[str, Any]]:
    n = len(rows)
    ranks = result.ranks()
    # Without dropping, nothing leaves the set: the K most anomalous of all are flagged.
    hard = set(result.hard_normals(params.hard_normals, among_all=not params.drop).tolist()) \
        if params.hard_normals else set()
    out = []
    for k, row in enumerate(rows):
        if k in result.failed:
            out.append({"drop": [("unreadable_image", f"{row['path']}: {result.failed[k]}")]})
            continue
        update: dict[str, Any] = {"measures": {"ssfilter.score": _round(result.scores[k]),
                                               "ssfilter.votes": int(result.votes[k])}}
        if result.uncertainty is not None:
            update["measures"]["ssfilter.uncertainty"] = _round(result.uncertainty[k])
        if params.drop and not result.kept[k]:
            update["drop"] = [(NOISE_FILTER, (
                f"{row['path']}: judged normal in {result.votes[k]} of {params.kappa1} "
                f"shufflings (needs more than {params.kappa2}); score {result.scores[k]:.4f}, "
                f"rank {ranks[k]} of {n} in category {row['category']!r}"))]
        elif k in hard:
            update["flags"] = [(HARD_NORMAL, (
                f"{row['path']}: one of the {params.hard_normals} normal images of category "
                f"{row['category']!r} that look most anomalous (score {result.scores[k]:.4f}, "
                f"rank {ranks[k]} of {n}); for the test set"))]
        out.append(update)
    return out


# ------------------------------------------------------------------------------ folder mode
@dataclass
class FolderReport:
    images: int
    kept: int
    removed: int
    unreadable: int
    hard_normals: int
    out: Path
    report: Path
    sheet: Path | None
    hard_sheet: Path | None
    link_kind: str

    def summary(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def filter_folder(folder: str | os.PathLike, out: str | os.PathLike, params: SSFilterParams,
                  seed: int = 0, *, device: str | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> FolderReport:
    """Filter the images under ``folder`` (read only) into ``out``: links to the kept images
    at their relative paths, ``ssfilter-report.csv`` and a contact sheet of the removed ones."""
    folder, out = Path(folder).resolve(), Path(out).absolute()
    if not folder.is_dir():
        raise CurateError(f"{folder}: not a folder of images")
    if out.resolve() == folder or folder in out.resolve().parents:
        raise CurateError(f"{out}: the output folder must not be inside the input folder "
                          f"{folder} (the input is never modified)")
    if out.exists() and any(out.iterdir()):
        if not (out / REPORT).is_file():
            raise CurateError(f"{out}: exists and is not an earlier filter-noise output "
                              f"(no {REPORT}); choose an empty or new folder")
        shutil.rmtree(out)
    paths = [rel for rel in walk_files(folder) if is_image_name(rel)]
    if not paths:
        raise CurateError(f"{folder}: no images found (looked for "
                          f"{', '.join(('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff'))})")

    def read(k: int) -> np.ndarray:
        return decode((folder / paths[k]).read_bytes())

    result = run_filter(read, len(paths), params, seed, device=device or params.device,
                        progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    ranks = result.ranks()
    hard = set(result.hard_normals(params.hard_normals).tolist()) if params.hard_normals else set()
    link_kind = ""
    with open(out / REPORT, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "votes", "kept", "rank", "hard_normal", "reason"])
        for k, rel in enumerate(paths):
            if k in result.failed:
                reason = f"unreadable_image: {result.failed[k]}"
            elif not result.kept[k]:
                reason = (f"{NOISE_FILTER}: judged normal in {result.votes[k]} of "
                          f"{params.kappa1} shufflings (needs more than {params.kappa2})")
            else:
                reason = ""
                link_kind = _link(folder / rel, out / rel) or link_kind
            score = "" if not np.isfinite(result.scores[k]) else f"{result.scores[k]:.6g}"
            writer.writerow([rel, score, int(result.votes[k]), bool(result.kept[k] and k not in
                             result.failed), int(ranks[k]), k in hard, reason])
    removed = [k for k in np.argsort(-np.nan_to_num(result.scores, nan=-np.inf), kind="stable")
               if not result.kept[k] and k not in result.failed]
    sheet = _contact_sheet(read, removed, paths, result, out / REMOVED_SHEET) if removed else None
    hard_order = [k for k in result.hard_normals(params.hard_normals)] if hard else []
    hard_sheet = _contact_sheet(read, hard_order, paths, result, out / HARD_SHEET) \
        if hard_order else None
    kept = int(sum(result.kept[k] and k not in result.failed for k in range(len(paths))))
    return FolderReport(len(paths), kept, len(removed), len(result.failed), len(hard_order), out,
                        out / REPORT, sheet, hard_sheet, link_kind or "none")


def _link(src: Path, dst: Path) -> str:
    """Symlink ``dst`` -> ``src``; a hard link or a copy where symlinks are not allowed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src, dst)
        return "symlink"
    except OSError:
        pass
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _contact_sheet(read: ImageSource, order: Sequence[int], paths: list[str],
                   result: FilterResult, path: Path, *, limit: int = 100, tile: int = 160,
                   columns: int = 8) -> Path:
    """A grid of thumbnails in ``order`` (most suspicious first), each labelled with its rank,
    score and votes; at most ``limit`` images (the CSV lists all)."""
    order = list(order)[:limit]
    ranks = result.ranks()
    label_h = 34
    rows = math.ceil(len(order) / columns)
    sheet = np.full((rows * (tile + label_h), columns * tile, 3), 255, np.uint8)
    for n, k in enumerate(order):
        image = read(k)
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        image = image[:, :, :3]
        scale = tile / max(image.shape[:2])
        thumb = cv2.resize(image, (max(1, int(image.shape[1] * scale)),
                                   max(1, int(image.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
        r, c = divmod(n, columns)
        y, x = r * (tile + label_h), c * tile
        sheet[y:y + thumb.shape[0], x:x + thumb.shape[1]] = thumb
        text = [f"#{ranks[k]} s={result.scores[k]:.3f} v={result.votes[k]}",
                Path(paths[k]).name[:24]]
        for line, t in enumerate(text):
            cv2.putText(sheet, t, (x + 3, y + tile + 13 + 14 * line), cv2.FONT_HERSHEY_SIMPLEX,
                        0.38, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


__all__ = ["FilterResult", "FolderReport", "SSFilter", "SSFilterParams", "WEIGHT_FREE",
           "filter_folder", "minmax", "mutual_scores", "run_filter", "select_normal",
           "shufflings"]
