"""ssfilter: take anomalies out of a "normal" training set (SSFilter, ../shared/papers/ssfilter.txt).

Every candidate image is scored by how unlike the other images of its mini-batch its patches
are, over ``kappa1`` random shufflings of the set; a sample is kept when it was judged normal in
more than ``kappa2`` of them (Sec. 3.6). Two modes, one entry (:func:`run_filter`):

- **lite** (no training; :mod:`curate.stages.ssfilter.scoring`): the batch score is Algorithm 1,
  the patch comparison score, with a recall rule in place of the model's uncertainty.
- **full** (:mod:`curate.stages.ssfilter.models`): a Dinomaly-style model trained on the set
  with synergy selection votes over the shufflings.

The package: ``scoring`` (the scores, the votes, lite mode), ``models`` (full mode),
``features`` and ``decoder`` (the descriptors and the weight-free decoder), this module (the
parameters and the manifest stage) and ``folder`` (a plain folder of images,
``curate filter-noise --out``).

In a manifest, the candidates are the kept normal (``good``) samples not already in test, per
category. A sample that fails is dropped with reason ``noise_filter`` (its votes, the needed
count, score and rank in the detail); every scored sample records ``ssfilter.score`` and
``ssfilter.votes`` (``ssfilter.uncertainty`` in full mode). With ``hard_normals=K`` the K kept
candidates of each category with the highest scores are flagged ``hard_normal`` ("normal
samples with confusing attached elements", HSS-IAD III-A): the split stage puts them in test and
review shows the flag. ``drop=False`` only scores and flags (the K flagged are then the K
highest-scoring of all candidates).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curate.core.errors import CurateError
from curate.core.manifest import GOOD, KEPT, Manifest
from curate.core.measures import SSFILTER_SCORE, SSFILTER_UNCERTAINTY, SSFILTER_VOTES
from curate.engine.runner import (
    Context,
    SampleEnv,
    Stage,
    params_dict,
    recorded_file,
)
from curate.imaging.io import decode
from curate.stages.ssfilter.models import run_full
from curate.stages.ssfilter.params import SSFilterParams
from curate.stages.ssfilter.scoring import FilterResult, ImageSource, Progress, rng_seed, run_lite

NOISE_FILTER = "noise_filter"
HARD_NORMAL = "hard_normal"


def run_filter(read: ImageSource, n: int, params: SSFilterParams, seed: int, *,
               device: str | None = None, progress: Progress | None = None,
               memory_limit: int = 2 << 30, chunk_rows: int = 4096) -> FilterResult:
    """SSFilter over images 0..n-1 (``read(i)`` decodes image i): scores, votes, kept; lite or
    full mode as ``params.mode`` says. ``device`` None: cuda when present."""
    if n == 0:
        raise CurateError("ssfilter: there are no images to filter")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = run_full if params.mode == "full" else run_lite
    return run(read, n, params, seed, device=device, progress=progress,
               chunk_rows=chunk_rows, memory_limit=memory_limit)


# ------------------------------------------------------------------------------ manifest stage
def _round(value: float) -> float:
    """Six significant digits: a recorded score must not carry float noise into the id."""
    return float(f"{value:.6g}")


class SSFilter(Stage[SSFilterParams]):
    name = "ssfilter"
    version = "2"
    Params = SSFilterParams
    uses_seed = True

    def recorded_params(self, params: SSFilterParams) -> dict[str, Any]:
        recorded = params_dict(params)
        weights = params.weights
        if weights not in (None, "random") and Path(weights).exists():
            path = Path(weights)
            recorded["weights"] = recorded_file(path / "model.safetensors" if path.is_dir()
                                                else path)
        return recorded

    def gpus(self, params: SSFilterParams) -> float:
        return 1 if (params.device or "").startswith("cuda") else 0

    def run(self, inputs: list[Manifest], params: SSFilterParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        rows = manifest.row_list()
        changes: list[tuple[int, dict[str, Any]]] = []  # (row index, update)
        env = ctx.env(self.name, params, manifest.roots, seed=True)
        by_category: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if row["status"] == KEPT and row["label"] == GOOD and row["split"] != "test":
                by_category.setdefault(row["category"], []).append(i)
        categories = sorted(by_category)
        with ctx.progress("ssfilter", len(categories)) as bar:
            # One job per category (categories are filtered independently): under
            # --executor ray each is a task, on a GPU of the cluster when the device is one.
            jobs = []
            for category in categories:
                tick = None
                if ctx.in_process:  # a progress callback cannot travel to a worker

                    def tick(what, done, total, category=category):
                        bar.update(description=f"ssfilter {category}: {what}",
                                   completed=done, total=total)

                jobs.append(CategoryJob(env, tuple(rows[i] for i in by_category[category]),
                                        rng_seed(ctx.seed, category) % (2 ** 63), tick))
            results = ctx.tasks(filter_category, jobs, num_gpus=self.gpus(params),
                                desc="ssfilter")
            for done, (category, result) in enumerate(zip(categories, results, strict=True)):
                members = by_category[category]
                updates = _updates(result, [rows[i] for i in members], params)
                changes += zip(members, updates, strict=True)
                bar.update(description="ssfilter", completed=done + 1, total=len(categories))
        return self.output_updates(manifest, changes, params, ctx)


@dataclass(frozen=True)
class CategoryJob:
    """One category's candidates to filter: picklable (but for the optional progress
    callback, which only the in-process executors pass)."""

    env: SampleEnv
    rows: tuple[dict[str, Any], ...]
    seed: int
    progress: Progress | None = None


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
        update: dict[str, Any] = {"measures": {SSFILTER_SCORE: _round(result.scores[k]),
                                               SSFILTER_VOTES: int(result.votes[k])}}
        if result.uncertainty is not None:
            update["measures"][SSFILTER_UNCERTAINTY] = _round(result.uncertainty[k])
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
