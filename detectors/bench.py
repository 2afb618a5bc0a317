"""Benchmark a bundled detector on an MVTec-layout export: HSS-IAD Tables III/IV, all metrics.

Protocols (HSS-IAD Sec. IV):
- ``multi-class``: one model trained on the normal training images of every category together,
  then evaluated on each category's test set;
- ``class-separated``: one model per category, trained and evaluated on that category alone.

Every category is evaluated with the one metric suite (`detectors.metrics`) on maps and masks
brought to a common ``eval_size`` square (maps bilinear; masks by area, a pixel anomalous when at
least half of it was), so detectors with different input geometries are scored on the same
pixels. Training never sees test data and the last state is the one evaluated.

The result is written as Markdown, CSV and JSON, each recording the curate version and commit,
the detector and its options, the backbone weights' sha256, the seed and the device.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import CategorySplit, DatasetError, read_mvtec
from .errors import DetectorConfigError

PROTOCOLS = ("multi-class", "class-separated")
# Keys of `metrics.evaluate`, in the column order of the tables, and their column titles.
METRIC_KEYS = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro")
METRIC_LABELS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
# HSS-IAD paper order; categories an export names differently follow in alphabetical order.
PAPER_ORDER = ("MTD", "Magnetic-tile-defect", "STEEL", "KolektorSDD", "KolektorSDD2",
               "Casting_C1", "Casting_C2", "Casting_C3")


def _metrics():
    from . import metrics

    return metrics


def _ordered(names) -> list[str]:
    rank = {name: i for i, name in enumerate(PAPER_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _resize_map(amap: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(amap.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    import cv2

    area = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return area >= 0.5


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _curate_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("curate")
    except PackageNotFoundError:
        return None


def _device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@dataclass
class BenchResult:
    detector: str
    protocol: str
    categories: dict[str, dict[str, float]]  # category → metric → value (fraction)
    mean: dict[str, float]
    counts: dict[str, dict[str, int]]
    provenance: dict[str, Any] = field(default_factory=dict)

    def table_rows(self) -> list[tuple[str, dict[str, float]]]:
        return [*self.categories.items(), ("Average", self.mean)]

    def markdown(self) -> str:
        names, keys = METRIC_LABELS, METRIC_KEYS
        lines = [
            f"# {self.detector} on {self.provenance.get('export', '?')} — {self.protocol}",
            "",
            "Values in %. I-AUROC / P-AP / AUPRO are the three the HSS-IAD tables report.",
            "",
            "| Category | " + " | ".join(names) + " | I-AUROC / P-AP / AUPRO |",
            "|---|" + "---:|" * (len(names) + 1),
        ]
        for name, row in self.table_rows():
            cells = [_pct(row[k]) for k in keys]
            short = " / ".join(_pct(row[k]) for k in ("i_auroc", "p_ap", "aupro"))
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {short} |")
        prov = self.provenance
        lines += ["", "Provenance:", ""]
        for key in ("curate_version", "commit", "detector_options", "backbone", "seed", "device",
                    "eval_size", "export_manifest", "elapsed_s"):
            lines.append(f"- {key}: `{json.dumps(prov.get(key))}`")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        keys = METRIC_KEYS
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["category", *keys, "n_test", "n_anomalous", "n_train"])
        for name, row in self.table_rows():
            counts = self.counts.get(name, {})
            writer.writerow([name, *(f"{row[k]:.6f}" for k in keys), counts.get("test", ""),
                             counts.get("anomalous", ""), counts.get("train", "")])
        return out.getvalue()

    def to_json(self) -> dict[str, Any]:
        return {"detector": self.detector, "protocol": self.protocol,
                "categories": self.categories, "mean": self.mean, "counts": self.counts,
                "provenance": self.provenance}

    def write(self, out: str | Path) -> dict[str, Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"bench-{self.detector}-{self.protocol}"
        paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
        paths["md"].write_text(self.markdown())
        paths["csv"].write_text(self.csv())
        paths["json"].write_text(json.dumps(self.to_json(), indent=2, sort_keys=True,
                                            default=_json_default) + "\n")
        return paths


def _pct(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def evaluate_category(detector, split: CategorySplit, *, eval_size: int, batch_size: int,
                      progress: bool) -> dict[str, float]:
    """Predict a category's test set and score it with the metric suite."""
    if not split.test:
        raise DatasetError(f"category {split.name}: no test images")
    maps, masks = [], []
    scores = []
    for start in range(0, len(split.test), batch_size * 4):
        paths = split.test[start:start + batch_size * 4]
        prediction = detector.predict(paths, batch_size=batch_size, progress=False)
        scores.append(prediction.scores)
        for offset, amap in enumerate(prediction.maps):
            mask = split.read_mask(start + offset, amap.shape)
            maps.append(_resize_map(amap, eval_size))
            masks.append(_resize_mask(mask, eval_size))
    metrics = _metrics()
    return metrics.evaluate(np.concatenate(scores), np.asarray(split.labels), np.stack(maps),
                            np.stack(masks))


@dataclass(frozen=True)
class TrainJob:
    """One model to train and the categories to evaluate it on: the whole multi-class run, or
    one category of the class-separated protocol. Picklable, so that an executor can run it on
    another machine (the export and ``models_dir`` must then be on storage it sees too)."""

    export_dir: str
    detector: str
    categories: tuple[str, ...]
    model_name: str
    backbone: str | None
    weights: Any
    seed: int
    device: str | None
    iterations: int | None
    batch_size: int | None
    eval_size: int
    options: tuple[tuple[str, Any], ...]
    progress: bool
    models_dir: str | None


def train_and_evaluate(job: TrainJob) -> dict[str, Any]:
    """Train ``job``'s model on its categories' training images and score each category."""
    from . import create_detector

    splits = read_mvtec(job.export_dir, list(job.categories))
    model = create_detector(job.detector, backbone=job.backbone, weights=job.weights,
                            seed=job.seed, device=job.device, **dict(job.options))
    images = [p for name in job.categories for p in splits[name].train]
    labels = [name for name in job.categories for _ in splits[name].train]
    history = model.fit(images, labels, iterations=job.iterations, batch_size=job.batch_size,
                        progress=job.progress)
    saved = None
    if job.models_dir:
        saved = str(model.save(Path(job.models_dir) / f"{job.detector}-{job.model_name}.safetensors"))
    results = {name: evaluate_category(model, splits[name], eval_size=job.eval_size,
                                       batch_size=job.batch_size or 8, progress=job.progress)
               for name in job.categories}
    # What ran: the options, with the batch size and iterations given for this run in place
    # of the defaults the model was built with (fit takes them as arguments).
    ran = {**model.options, **{key: value for key, value in (("batch_size", job.batch_size),
                                                             ("iterations", job.iterations))
                               if value is not None and key in model.options}}
    return {"results": results, "loss": float(history[-1]) if history else float("nan"),
            "model": saved, "options": ran, "backbone": model.backbone.describe(),
            "iterations": model.iterations_done, "device": _device_name(model.device)}


def _in_order(fn, jobs):
    return map(fn, jobs)


def run_bench(export_dir: str | Path, detector: str = "dinomaly",
              protocol: str = "multi-class", *, backbone: str | None = None, weights=None,
              seed: int = 0, device: str | None = None, iterations: int | None = None,
              batch_size: int | None = None, categories: list[str] | None = None,
              eval_size: int = 256, options: dict[str, Any] | None = None,
              progress: bool = True, models_dir: str | Path | None = None,
              run_jobs=_in_order) -> BenchResult:
    """Train and evaluate `detector` on the export under `protocol`; see the module docstring.

    ``run_jobs(train_and_evaluate, jobs)`` runs the training jobs (one for multi-class, one per
    category for class-separated) and yields their results in order; the default runs them here
    one after the other, curate's executors spread them over a Ray cluster's GPUs.
    """
    if protocol not in PROTOCOLS:
        raise DetectorConfigError(
            f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    started = time.perf_counter()
    splits = read_mvtec(export_dir, categories)
    empty = [name for name, split in splits.items() if not split.train]
    if empty:
        raise DatasetError(f"{export_dir}: no training images (train/good) for "
                           f"{', '.join(empty)}")
    order = _ordered(splits)
    groups = ([("multi-class", tuple(order))] if protocol == "multi-class"
              else [(name, (name,)) for name in order])
    jobs = [TrainJob(str(export_dir), detector, names, model_name, backbone, weights, seed,
                     device, iterations, batch_size, eval_size,
                     tuple(sorted((options or {}).items())), progress,
                     str(models_dir) if models_dir else None)
            for model_name, names in groups]
    results: dict[str, dict[str, float]] = {}
    losses: dict[str, float] = {}
    models: dict[str, str] = {}
    last: dict[str, Any] = {}
    for (model_name, _), last in zip(groups, run_jobs(train_and_evaluate, jobs), strict=True):
        results.update(last["results"])
        key = "all" if protocol == "multi-class" else model_name
        losses[key] = last["loss"]
        if last["model"]:
            models[key] = last["model"]
    results = {name: results[name] for name in order}
    mean = _metrics().mean_over_categories(results)
    counts = {name: {"train": len(splits[name].train), "test": len(splits[name].test),
                     "anomalous": int(sum(splits[name].labels))} for name in order}
    export_meta = {}
    marker = Path(export_dir) / "curate-export.json"
    if marker.is_file():
        export_meta = json.loads(marker.read_text())
    provenance = {
        "curate_version": _curate_version(),
        "commit": _git_commit(),
        "export": str(Path(export_dir).resolve()),
        "export_manifest": export_meta.get("manifest"),
        "detector": detector,
        "detector_options": last["options"],
        "backbone": last["backbone"],
        "iterations": last["iterations"],
        "seed": seed,
        "device": last["device"],
        "torch": __import__("torch").__version__,
        "eval_size": eval_size,
        "final_loss": losses,
        "models": models,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    return BenchResult(detector, protocol, results, mean, counts, provenance)
