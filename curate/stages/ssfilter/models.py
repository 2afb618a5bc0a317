"""SSFilter's full mode: a filter model trained on the set with synergy selection.

The Dinomaly-style model of ``detectors.dinomaly`` (frozen DINOv2-R encoder, noisy bottleneck,
linear-attention decoder) is trained on the set with synergy selection: each iteration scores
its batch (patch comparison a, uncertainty u = std of the top-1 % map means over ``passes``
dropout passes of the bottleneck), selects per Eq. 7 and trains on the selected samples; after
``cold_start`` iterations the score is ½(minmax(a) + minmax(u)) (Eq. 9), μ₁ still from the split
of the raw scores. The trained filter then votes over ``kappa1`` shufflings with the same rule
(:mod:`curate.stages.ssfilter.scoring`). With a DINOv2 backbone (real weights to be meaningful)
that is the paper's model; with a weight-free descriptor (``randconv``, ``texture``) the frozen
encoder is the descriptor and the model a Dinomaly-shaped decoder over its stored patch
features (``curate.stages.ssfilter.decoder``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from curate.imaging.io import BadImage
from curate.stages.ssfilter.decoder import PatchDecoder, channel_stats, patch_errors
from curate.stages.ssfilter.features import vit_layout, vit_patch_features
from curate.stages.ssfilter.params import WEIGHT_FREE, SSFilterParams
from curate.stages.ssfilter.scoring import (
    FilterResult,
    ImageSource,
    Progress,
    describe_set,
    minmax,
    mutual_scores,
    rng_seed,
    select_normal,
    shufflings,
)


def _pass_spread(per_pass: list[torch.Tensor]) -> np.ndarray:
    """u of Sec. 3.3: the std over the dropout passes of each image's score, the mean of the
    top share of its anomaly map (one (B,) tensor per pass)."""
    return torch.stack(per_pass).float().std(dim=0).cpu().double().numpy()


class FilterModel(Protocol):
    """What synergy training needs of a full-mode model (:func:`_train_and_vote`): a batch is
    whatever :meth:`batch` returns (a tensor of images, or stored features)."""

    device: torch.device
    #: {index: why} of the images that could not be read (never trained on or scored).
    failed: dict[int, str]
    #: Provenance of the model, recorded with the result.
    info: dict[str, Any]

    def start(self) -> None: ...
    def batch(self, idx: np.ndarray) -> Any: ...
    def scores(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """(patch comparison scores a, uncertainty u) of one batch."""
        ...
    def train(self, x: Any, chosen: np.ndarray, step: int) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


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
        det, params = self.det, self.params
        encoder = det.backbone.module
        patch, prefix = vit_layout(encoder)
        with torch.no_grad(), det.autocast():
            z = vit_patch_features(encoder(x, depth=8), prefix)
            a, _ = mutual_scores(z, params.sim_ratio, params.image_ratio or 0.01,
                                 chunk_rows=self.chunk_rows)
            det.bottleneck.train()  # dropout on: each pass is one masked model (Eq. 2)
            grid = (x.shape[-2] // patch, x.shape[-1] // patch)
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
                 chunk_rows: int, progress: Progress | None, memory_limit: int):
        self.descriptor, self.image_ratio, self.bank, self.failed = describe_set(
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
             progress: Progress | None = None,
             chunk_rows: int = 4096, memory_limit: int = 2 << 30) -> FilterResult:
    """Train the filter model with synergy selection, then vote over the shufflings: the
    Dinomaly model on a DINOv2 encoder, or the patch decoder on a weight-free descriptor."""
    model: FilterModel
    if params.backbone in WEIGHT_FREE:
        model = _DescriptorFilter(read, n, params, device, chunk_rows, progress, memory_limit)
    else:
        model = _DinomalyFilter(read, n, params, seed, device, chunk_rows)
    try:
        return _train_and_vote(model, n, params, seed, progress)
    finally:
        model.close()


def _train_and_vote(model: FilterModel, n: int, params: SSFilterParams, seed: int,
                    progress: Progress | None) -> FilterResult:
    failed = model.failed
    good = np.array([i for i in range(n) if i not in failed], dtype=int)
    scores, votes = np.full(n, np.nan), np.zeros(n, int)
    if len(good) < 2:
        return FilterResult(scores, votes, np.isin(np.arange(n), good), failed)
    rng = np.random.default_rng(rng_seed(seed, "full-train"))
    batch = min(params.batch_size, len(good))
    order: list[int] = []
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(rng_seed(seed, "dropout") % (2 ** 63))
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
                          np.random.default_rng(rng_seed(seed, "shufflings")))
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
