"""sdas_sample and sdas_blend: banks of synthetic anomalies (RealNet's SDAS) and blended images.

**sdas_sample** draws ``n`` images from a diffusion checkpoint with the SDAS sampler
(:mod:`curate.stages.sdas.sampler`) and writes a *bank*: a manifest with one row per synthetic
image, the images in the workspace store. Unlike the official sampler (no seed, one strength
per batch, nothing recorded) every image has its own seed and strength, derived from
(``--seed``, category, index), and its row records them as measures: ``sdas.index``,
``sdas.seed``, ``sdas.strength``, ``sdas.steps``, ``sdas.sampler``, ``sdas.checkpoint`` (sha256
of the weights file). The header records the parameters with the checkpoint's hash in place of
its path.

**sdas_blend** makes inspectable training-style anomalies: each output takes a normal image I
of the category (kept, ``good``, train split) and an anomaly source P (a random image of a
bank, or a procedural texture when no bank is given), a Perlin mask M (DRAEM style) times the
image's foreground mask (artifact ``foreground`` when the foreground stage ran, the whole image
otherwise), δ ~ U(0.5, 1), and writes ``A = (1 − M)·I + (1 − δ)·M·I + δ·M·P`` with M as its
``mask`` artifact, so ``curate review push`` shows the anomaly as a segmentation.

Rows of both live in source ``sdas`` / ``sdas_blend`` whose root is the workspace store: a row's
``path`` is its image's store file, and its ``sample_id`` names its slot (category, index), not
the path, because two slots could in principle produce the same pixels. Banks and blends are
side products of the dataset (:func:`curate.engine.workspace.is_side_product`): saving one does not
move the workspace's HEAD. ``curate sdas export`` writes a bank where RealNet reads it
(:mod:`curate.export.sdas`).

Training (``curate sdas train``) reads its images with :func:`training_images`: a source file
removed or changed since ingest stops it with one sentence naming the file.

Resuming: sampling journals each finished batch (index, seed, strength, store key) under
``cache/sdas-<key>.jsonl``, keyed like the stage cache. A killed run started again skips the
batches already journaled and ends with the same files and the same manifest id as an
uninterrupted run (batches keep their composition, so batched kernels see the same inputs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curate.core.canonical import canonical_float
from curate.core.errors import CurateError
from curate.core.files import sha256_bytes, sha256_file
from curate.core.manifest import KEPT, Manifest, new_row, sample_id_for
from curate.core.measures import (
    SDAS_BLEND_ANGLE,
    SDAS_BLEND_BASE,
    SDAS_BLEND_DELTA,
    SDAS_BLEND_INDEX,
    SDAS_BLEND_MASK_FRACTION,
    SDAS_BLEND_SCALE_X,
    SDAS_BLEND_SCALE_Y,
    SDAS_BLEND_SOURCE,
    SDAS_CHECKPOINT,
    SDAS_INDEX,
    SDAS_SAMPLER,
    SDAS_SEED,
    SDAS_STEPS,
    SDAS_STRENGTH,
)
from curate.core.optional import require
from curate.engine.runner import Context, SampleEnv, Stage, params_dict, recorded_file
from curate.engine.workspace import BANK_KIND, BLEND_KIND

# Each source is named after its kind; the workspace knows the kinds (side products).
BANK_SOURCE, BLEND_SOURCE = BANK_KIND, BLEND_KIND
SYNTHETIC = "synthetic"
PRECISIONS = ("fp32", "bf16", "fp16")


def _derived_seed(*parts: Any) -> int:
    """A 52-bit seed from its parts (exact in JSON and in float64 readers)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 12


def image_seed(seed: int, category: str, index: int) -> int:
    return _derived_seed(seed, "sdas_sample", category, index)


def image_strength(image_seed_: int, low: float, high: float) -> float:
    """The strength s of one image: U(low, high) from its own seed, rounded as recorded."""
    return _recorded_draw(np.random.default_rng(image_seed_).uniform(low, high))


def _recorded_draw(value: float) -> float:
    """A drawn value rounded as the manifest records it (the bounds are finite, so is it)."""
    rounded = canonical_float(float(value))
    if rounded is None:
        raise CurateError(f"a random draw gave {value}: the bounds must be finite")
    return rounded


def _synthetic_row(source: str, category: str, index: int, key: str, store_root: Path,
                   shape: tuple[int, ...], **fields: Any) -> dict[str, Any]:
    """The row of slot ``index``, whose image is store file ``key`` of ``shape`` (H, W[, C])."""
    path = f"{key[:2]}/{key}"
    row = new_row(source=source, path=path, category=category,
                  sha256=sha256_file(store_root / path), format="png", width=int(shape[1]),
                  height=int(shape[0]), channels=1 if len(shape) == 2 else int(shape[2]),
                  split="train", label=SYNTHETIC, **fields)
    row["sample_id"] = sample_id_for(source, f"{category}/{index:06d}")
    return row


# ----------------------------------------------------------------------------- training
def training_images(workspace, manifest: Manifest, category: str) -> list[np.ndarray]:
    """The kept normal training images of ``category`` in ``manifest``, decoded.

    Raises one :class:`CurateError` naming the first file that was removed, changed (its
    sha256 is not the one ingest recorded) or no longer decodes since ingest, or saying that
    the category has no such image: training on what is left would change the model silently.
    """
    from curate.imaging.io import BadImage, decode

    rows = [r for r in manifest.rows() if r["status"] == KEPT and r["label"] == "good"
            and r["category"] == category and r["split"] in ("train", None)]
    if not rows:
        raise CurateError(f"manifest {manifest.id} has no kept normal training images of "
                          f"category {category!r}")
    again = "restore it or ingest its folder again"
    images = []
    for row in rows:
        path = workspace.source_file(manifest, row["source"], row["path"])
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CurateError(f"{path} was removed since ingest (image {row['path']} of "
                              f"manifest {manifest.id}): {again}") from None
        if row["sha256"] and sha256_bytes(data) != row["sha256"]:
            raise CurateError(f"{path} changed since ingest (sha256 {sha256_bytes(data)}, "
                              f"expected {row['sha256']}): {again}")
        try:
            images.append(decode(data))
        except BadImage as exc:
            raise CurateError(f"{path}: {exc}; expected the image ingest read: {again}") from None
    return images


# ----------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SdasSampleParams:
    category: str = field(metadata={"help": "Category the bank is for (names its rows)."})
    #: A `curate sdas train` folder or an official ADM checkpoint (.pt).
    checkpoint: str
    n: int = field(default=10000, metadata={
        "short": "-n", "min": 1, "help": "Synthetic images to make."})
    steps: int = field(default=20, metadata={"min": 1, "help": "Reverse steps (respaced)."})
    # The choices are the sampler's SPACINGS and METHODS, which need PyTorch to import (a test
    # checks they agree).
    spacing: str = field(default="ddim", metadata={
        "choices": ("ddim", "even"),
        "help": "ddim: 0, T/K, 2T/K, ... (RealNet's ddim20); even: rounded even spacing from "
                "0 to T-1."})
    sampler: str = field(default="ddpm", metadata={
        "choices": ("ddpm", "ddim"), "help": "Ancestral (1+s)·Σ, or DDIM plus s·Σ."})
    strength_min: float = 0.1
    strength_max: float = 0.2
    batch_size: int = field(default=16, metadata={"min": 1})
    class_label: int | None = field(default=None, metadata={
        "help": "Class index of a class-conditional checkpoint (RealNet: MVTec order)."})
    device: str = "cpu"
    precision: str = field(default="fp32", metadata={
        "choices": PRECISIONS, "help": "Model arithmetic (bf16/fp16 autocast on a GPU)."})

    def __post_init__(self):
        # Checked here, before any work: sampling needs PyTorch (the detectors extra).
        sampler = require("curate.stages.sdas.sampler", "stage sdas_sample")
        if self.sampler not in sampler.METHODS:
            raise ValueError(f"sampler must be one of {sampler.METHODS}, got {self.sampler!r}")
        if self.spacing not in sampler.SPACINGS:
            raise ValueError(f"spacing must be one of {sampler.SPACINGS}, "
                             f"got {self.spacing!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 <= self.strength_min <= self.strength_max:
            raise ValueError("need 0 <= strength_min <= strength_max, got "
                             f"{self.strength_min}, {self.strength_max}")
        if self.n < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("n, steps and batch_size must be at least 1")


class SdasSample(Stage[SdasSampleParams]):
    name = "sdas_sample"
    version = "1"
    Params = SdasSampleParams
    uses_seed = True

    def __init__(self, on_batch: Callable[[list[int]], None] | None = None):
        #: Called after each batch is journaled, with its indices (tests interrupt here).
        self.on_batch = on_batch
        self.store_root: Path | None = None

    def recorded_params(self, params: SdasSampleParams) -> dict[str, Any]:
        recorded = params_dict(params)
        recorded["checkpoint"] = recorded_file(checkpoint_file(params.checkpoint))
        return recorded

    # The rows' root is the workspace store. The runner asks for the cache key first (with the
    # context) and for the roots later (without it), so the store is learnt here.
    def cache_key(self, inputs: list[Manifest], params: SdasSampleParams, ctx: Context
                  ) -> str | None:
        self.store_root = ctx.workspace.store.root.absolute()
        return super().cache_key(inputs, params, ctx)

    def roots(self, inputs: list[Manifest], params: SdasSampleParams) -> dict[str, str]:
        return {BANK_SOURCE: str(self.store_root)}

    def gpus(self, params: SdasSampleParams) -> float:
        return 1 if params.device.startswith("cuda") else 0

    def run(self, inputs: list[Manifest], params: SdasSampleParams, ctx: Context) -> Manifest:
        store = ctx.workspace.store
        journal = ctx.workspace.cache_dir / f"sdas-{self.cache_key(inputs, params, ctx)}.jsonl"
        done = _read_journal(journal, store)
        seeds = [image_seed(ctx.seed, params.category, i) for i in range(params.n)]
        strengths = [image_strength(s, params.strength_min, params.strength_max) for s in seeds]
        batches = [list(range(b, min(params.n, b + params.batch_size)))
                   for b in range(0, params.n, params.batch_size)]
        jobs = [SampleJob(params, str(store.root.absolute()), tuple(batch),
                          tuple(seeds[i] for i in batch), tuple(strengths[i] for i in batch))
                for batch in batches if not all(i in done for i in batch)]
        model_info: dict[str, Any] | None = None
        with ctx.progress(f"sdas sample {params.category}", params.n) as bar:
            bar.update(completed=params.n - sum(len(job.indices) for job in jobs))
            # One task per batch: under --executor ray each asks for a GPU when the device is
            # one, and every worker loads the model once (sample_batch caches it).
            for job, (entries, info) in zip(
                    jobs, ctx.tasks(sample_batch, jobs, num_gpus=self.gpus(params),
                                    desc=f"sdas sample {params.category}"), strict=True):
                model_info = info
                for entry in entries:
                    done[entry["index"]] = entry["key"]
                _append_journal(journal, entries)
                bar.update(advance=len(entries))
                if self.on_batch is not None:
                    self.on_batch(list(job.indices))
        if model_info is None:  # every batch was journaled by an earlier, interrupted run
            model_info = _model_info(_cached_model(params.checkpoint, "cpu"))
        size = model_info["image_size"]
        rows = []
        for i in range(params.n):
            measures = {SDAS_INDEX: i, SDAS_SEED: seeds[i], SDAS_STRENGTH: strengths[i],
                        SDAS_STEPS: params.steps, SDAS_SAMPLER: params.sampler,
                        SDAS_CHECKPOINT: model_info["sha256"]}
            rows.append(_synthetic_row(BANK_SOURCE, params.category, i, done[i], store.root,
                                       (size, size, 3), artifacts={"image": done[i]},
                                       measures=measures))
        options = {"category": params.category, "checkpoint": f"sha256:{model_info['sha256']}",
                   "arch": model_info["arch"], "image_size": size}
        return Manifest.build(rows, stage=self.name, stage_version=self.version,
                              params=self.recorded_params(params),
                              parents=[m.id for m in inputs],
                              sources={BANK_SOURCE: {"kind": BANK_KIND, "options": options}},
                              seed=ctx.seed, roots=self.roots(inputs, params))


@dataclass(frozen=True)
class SampleJob:
    """One batch of a bank: what a worker needs to sample it and store the images."""

    params: SdasSampleParams
    store_root: str
    indices: tuple[int, ...]
    seeds: tuple[int, ...]
    strengths: tuple[float, ...]


def sample_batch(job: SampleJob) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample one batch and put its images in the store: ([{index, key}], model info).

    Runs wherever the executor puts it (this process, or a Ray worker with its own GPU); the
    images depend only on the job, never on the worker.
    """
    import torch

    from curate.engine.store import Store
    from curate.stages.sdas.sampler import RespacedSchedule, base_betas, sample, to_uint8

    params = job.params
    loaded = _cached_model(params.checkpoint, params.device)
    labels = _labels(loaded.num_classes, params)
    schedule = RespacedSchedule.build(base_betas(loaded.schedule), params.steps, params.spacing)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[params.precision]
    with torch.no_grad():
        images = sample(loaded.model, schedule, list(job.seeds), list(job.strengths),
                        shape=(3, loaded.image_size, loaded.image_size), method=params.sampler,
                        autocast=autocast,
                        labels=None if labels is None else labels[:len(job.indices)])
    store = Store(job.store_root)
    entries = [{"index": i, "key": store.put_pixels(pixels)}
               for i, pixels in zip(job.indices, to_uint8(images), strict=True)]
    return entries, _model_info(loaded)


def _cached_model(checkpoint: str, device: str):
    """The loaded model, once per process and weights version (a Ray worker keeps it between
    its batches; a checkpoint rewritten by training is loaded again)."""
    return _load_model_once(checkpoint, recorded_file(checkpoint_file(checkpoint)), device)


@functools.lru_cache(maxsize=2)
def _load_model_once(checkpoint: str, version: str, device: str):
    from curate.stages.sdas.models import load_model

    return load_model(checkpoint, device)


def _model_info(loaded) -> dict[str, Any]:
    return {"sha256": loaded.sha256, "arch": loaded.arch, "image_size": loaded.image_size}


def checkpoint_file(checkpoint: str) -> Path:
    """A checkpoint's weights file (``ema.safetensors`` of a training folder, or the file)."""
    path = Path(checkpoint)
    weights = path / "ema.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise CurateError(f"diffusion checkpoint not found: {weights} (give a folder written "
                          "by `curate sdas train` or an official ADM .pt file)")
    return weights


def _labels(num_classes: int | None, params: SdasSampleParams):
    import torch

    if num_classes is None:
        if params.class_label is not None:
            raise CurateError("the checkpoint is unconditional: drop --class-label")
        return None
    if params.class_label is None or not 0 <= params.class_label < num_classes:
        raise CurateError(f"the checkpoint is class-conditional with {num_classes} classes: "
                          f"pass --class-label 0..{num_classes - 1} (got {params.class_label})")
    return torch.full((params.batch_size,), params.class_label, dtype=torch.long,
                      device=params.device)


def _read_journal(path: Path, store) -> dict[int, str]:
    """index -> store key of the images a previous run finished (and that are still there)."""
    done: dict[int, str] = {}
    try:
        lines = path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        return done
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if store.has(entry["key"]):
            done[int(entry["index"])] = entry["key"]
    return done


def _append_journal(path: Path, entries: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
        fh.flush()
        os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- blending
@dataclass(frozen=True)
class SdasBlendParams:
    category: str = field(metadata={"help": "Blend into this category's normal images."})
    #: Id of a bank manifest (sdas_sample); empty: procedural textures as the anomaly source.
    bank: str = ""
    n: int = field(default=0, metadata={
        "short": "-n", "min": 0,
        "help": "Blended images to make (0: one per normal training image)."})
    size: int = field(default=256, metadata={
        "min": 8, "help": "Square size of the blended images."})
    delta_min: float = 0.5
    delta_max: float = 1.0
    min_scale: int = 0
    max_scale: int = 6
    threshold: float = 0.5

    def __post_init__(self):
        if not 0 <= self.delta_min <= self.delta_max <= 1:
            raise ValueError("need 0 <= delta_min <= delta_max <= 1")
        if not 0 <= self.min_scale < self.max_scale:
            raise ValueError("need 0 <= min_scale < max_scale")
        if self.n < 0 or self.size < 8:
            raise ValueError("n must be >= 0 and size >= 8")


#: Perlin draws per image before accepting an empty mask (M × foreground can be empty).
MASK_TRIES = 16


def blend_sample(job: dict[str, Any], env: SampleEnv) -> dict[str, Any]:
    """One blended image: ``job`` names the base row, its foreground and the source image."""
    import cv2

    from curate.imaging.io import decode
    from detectors.synthesis import blend, perlin_mask, procedural_texture

    p: SdasBlendParams = env.params
    rng = env.rng(job)
    size = (p.size, p.size)
    image = cv2.resize(decode(env.read_source(job["base"])), size, interpolation=cv2.INTER_AREA)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if job["foreground"]:
        fg = cv2.resize(env.store.read_mask(job["foreground"]).astype(np.uint8), size,
                        interpolation=cv2.INTER_NEAREST) > 0
    else:
        fg = np.ones(size, bool)
    for _ in range(MASK_TRIES):
        mask, drawn = perlin_mask(size, rng, min_scale=p.min_scale, max_scale=p.max_scale,
                                  threshold=p.threshold)
        mask &= fg
        if mask.any():
            break
    delta = _recorded_draw(rng.uniform(p.delta_min, p.delta_max))
    if job["source_key"]:
        source = cv2.resize(env.store.read_pixels(job["source_key"]), size,
                            interpolation=cv2.INTER_AREA)
    else:
        source = procedural_texture(size, rng)
    if image.ndim == 2 and source.ndim == 3:
        source = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)
    elif image.ndim == 3 and source.ndim == 2:
        source = cv2.cvtColor(source, cv2.COLOR_GRAY2RGB)
    out = blend(image, source, mask, delta)
    return {"image": env.store.put_pixels(out), "mask": env.store.put_mask(mask),
            "shape": list(out.shape), "delta": delta, "mask_fraction": float(mask.mean()),
            **drawn}


class SdasBlend(Stage[SdasBlendParams]):
    name = "sdas_blend"
    version = "1"
    Params = SdasBlendParams
    uses_seed = True

    store_root: Path | None = None

    def cache_key(self, inputs: list[Manifest], params: SdasBlendParams, ctx: Context
                  ) -> str | None:
        self.store_root = ctx.workspace.store.root.absolute()  # see SdasSample.cache_key
        return super().cache_key(inputs, params, ctx)

    def roots(self, inputs: list[Manifest], params: SdasBlendParams) -> dict[str, str]:
        return {BLEND_SOURCE: str(self.store_root)}

    def run(self, inputs: list[Manifest], params: SdasBlendParams, ctx: Context) -> Manifest:
        manifest, *bank = inputs
        bases = [r for r in manifest.rows() if r["status"] == KEPT and r["label"] == "good"
                 and r["category"] == params.category and r["split"] in ("train", None)]
        if not bases:
            raise CurateError(f"manifest {manifest.id} has no kept normal (good) training "
                              f"images of category {params.category!r} to blend into")
        sources = []
        if bank:
            sources = [r["artifacts"]["image"] for r in bank[0].rows()
                       if r["status"] == KEPT and "image" in r["artifacts"]]
            if not sources:
                raise CurateError(f"bank {bank[0].id} holds no synthetic images")
        n = params.n or len(bases)
        rng = np.random.default_rng(_derived_seed(ctx.seed, self.name, params.category))
        base_idx = np.arange(n) % len(bases) if not params.n else rng.integers(len(bases), size=n)
        source_keys = ([sources[int(k)] for k in rng.integers(len(sources), size=n)]
                       if sources else [""] * n)
        jobs = []
        for i in range(n):
            base = bases[int(base_idx[i])]
            jobs.append({
                "sample_id": sample_id_for(BLEND_SOURCE, f"{params.category}/{i:06d}"),
                "path": base["path"], "base": base,
                "foreground": base["artifacts"].get("foreground", ""),
                "source_key": source_keys[i],
            })
        env = ctx.env(self.name, params, manifest.roots, seed=True)
        results = ctx.map(blend_sample, jobs, env, f"sdas blend {params.category}")
        rows = []
        for i, (job, res) in enumerate(zip(jobs, results, strict=True)):
            if "drop" in res:
                removed = any(code == "missing_file" for code, _ in res["drop"])
                raise CurateError(f"blending into {job['path']} failed: "
                                  f"{'; '.join(d for _, d in res['drop'])}" +
                                  ("; it was removed since ingest: restore it or ingest its "
                                   "folder again" if removed else ""))
            measures = {SDAS_BLEND_INDEX: i, SDAS_BLEND_DELTA: res["delta"],
                        SDAS_BLEND_MASK_FRACTION: res["mask_fraction"],
                        SDAS_BLEND_SCALE_X: res["scale_x"], SDAS_BLEND_SCALE_Y: res["scale_y"],
                        SDAS_BLEND_ANGLE: res["angle"],
                        SDAS_BLEND_BASE: job["base"]["sample_id"],
                        SDAS_BLEND_SOURCE: job["source_key"] or "procedural"}
            artifacts = {"mask": res["mask"], "image": res["image"]}
            if job["source_key"]:
                artifacts["anomaly_source"] = job["source_key"]
            rows.append(_synthetic_row(BLEND_SOURCE, params.category, i, res["image"],
                                       ctx.workspace.store.root.absolute(),
                                       tuple(res["shape"]),
                                       artifacts=artifacts, measures=measures,
                                       defect_classes=[SYNTHETIC]))
        return Manifest.build(
            rows, stage=self.name, stage_version=self.version, params=params_dict(params),
            parents=[m.id for m in inputs],
            sources={BLEND_SOURCE: {"kind": BLEND_KIND, "options": {
                "category": params.category, "bank": params.bank or "procedural"}}},
            seed=ctx.seed, roots=self.roots(inputs, params))
