"""The bench command: train a bundled detector on an export and score it."""

from __future__ import annotations

from pathlib import Path

import click

from curate.core.errors import CurateError
from curate.core.optional import require
from curate.engine.runner import EXECUTORS, Context
from detectors import DETECTORS
from detectors.bench import PROTOCOLS

from .options import json_option, parse_key_values, seed_option
from .output import emit_json, stderr, stdout


@click.command("bench")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--detector", "-d", type=click.Choice(list(DETECTORS)),
              default="dinomaly", show_default=True, help="Bundled detector to train and evaluate.")
@click.option("--protocol", type=click.Choice(PROTOCOLS),
              default="multi-class", show_default=True,
              help="One model for all categories (Table III) or one per category (Table IV).")
@click.option("--backbone", default=None, help="Backbone name (default: the detector's paper "
              "backbone, e.g. dinov2_vitb14_reg, wide_resnet50_2).")
@click.option("--weights", default=None, help="Backbone weight file or folder (default: the "
              "local torch / Hugging Face caches; 'random' for a pipeline test).")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Training iterations (default: the paper's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Training batch size (default: the paper's).")
@click.option("--category", "categories", multiple=True, help="Only these categories.")
@click.option("--eval-size", type=click.IntRange(min=8), default=256, show_default=True,
              help="Maps and masks are scored on this square size.")
@click.option("--device", default=None, help="torch device (default: cuda if present).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Detector option, e.g. --option dropout=0.4.")
@click.option("--out", "-o", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench-results"), show_default=True,
              help="Folder for the Markdown, CSV and JSON tables.")
@click.option("--save-models", is_flag=True, help="Also save the trained detectors to --out.")
@seed_option()
# Context.tasks runs a process executor's jobs one after the other here, as local does.
@click.option("--executor", type=click.Choice([e for e in EXECUTORS if e != "process"]),
              default="local",
              show_default=True, help="Train here, or each model as a Ray task (with "
              "--device cuda each task asks Ray for one GPU, so the class-separated models "
              "train on a cluster's GPUs at once; the export and --out must be on storage "
              "every node sees).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Ray cluster to join with --executor ray; default: a local Ray runtime.")
@json_option
def bench_cmd(export_dir: Path, detector: str, protocol: str, backbone: str | None,
              weights: str | None, iterations: int | None, batch_size: int | None,
              categories: tuple[str, ...], eval_size: int, device: str | None,
              options: tuple[str, ...], out: Path, save_models: bool, seed: int, executor: str,
              ray_address: str | None, as_json: bool) -> None:
    """Train a bundled detector on an MVTec-layout export and score it (HSS-IAD Tables III/IV).

    Per category and averaged: I-AUROC, I-AP, I-F1max, P-AUROC, P-AP, P-F1max, AUPRO@0.3.
    Writes bench-<detector>-<protocol>.{md,csv,json} to --out, with the curate version and
    commit, backbone weights hash, seed and device. The last training state is evaluated.

    \b
    Example:
      curate bench hss-iad/export --detector dinomaly --protocol multi-class \\
          --weights ~/weights/dinov2_vitb14_reg4_pretrain.pth
    """
    require("torch", "curate bench")
    from detectors.backbones import WeightsNotFoundError
    from detectors.bench import run_bench
    from detectors.data import DatasetError
    from detectors.errors import DetectorConfigError

    gpus = 1 if (device or "").startswith("cuda") else 0
    try:
        with Context(None, executor=executor, ray_address=ray_address, console=stderr) as ctx:
            result = run_bench(
                export_dir.absolute(), detector, protocol, backbone=backbone, weights=weights,
                seed=seed, device=device, iterations=iterations, batch_size=batch_size,
                categories=list(categories) or None, eval_size=eval_size,
                options=parse_key_values(options, "--option"), progress=not as_json,
                models_dir=out.absolute() if save_models else None,
                run_jobs=lambda fn, jobs: ctx.tasks(fn, jobs, num_gpus=gpus, desc="bench"))
    except (DatasetError, WeightsNotFoundError, DetectorConfigError) as exc:
        # The user's mistakes (export, weights, options); any other error is a bug.
        raise CurateError(str(exc)) from exc
    paths = result.write(out)
    if as_json:
        emit_json(result.to_json() | {"files": {k: str(v) for k, v in paths.items()}})
    else:
        stdout.print(result.markdown(), markup=False, highlight=False)
        stdout.print("wrote " + ", ".join(str(p) for p in paths.values()))
