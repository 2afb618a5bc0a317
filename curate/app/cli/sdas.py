"""The SDAS commands (RealNet's anomaly synthesis): train, sample banks, blend, export banks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from curate.core.optional import require
from curate.engine.runner import StageResult, make_params, run_stage
from curate.engine.workspace import Workspace

from .options import (
    StageCommand,
    json_option,
    open_context,
    run_options,
    workspace_of,
    workspace_option,
)
from .output import emit_json, show_results, stdout


@click.group("sdas")
def sdas_group() -> None:
    """SDAS anomaly synthesis (RealNet): train a diffusion model, sample banks, blend.

    \b
    Example (one category of an HSS-IAD build):
      curate sdas train --category Magnetic-tile-defect --out mtd-ddpm --steps 50000 -w ws
      curate sdas sample --category Magnetic-tile-defect --checkpoint mtd-ddpm -n 10000 -w ws
      curate sdas blend --category Magnetic-tile-defect --bank <bank id> -w ws
      curate sdas export --bank <bank id> --out data/HSS-IAD/sdas -w ws

    Banks and blends are side products: `latest` stays on the dataset; name them by id.
    """


def _sdas_import(module: str) -> Any:
    return require(module, "curate sdas")


@sdas_group.command("train")
@click.argument("manifest", required=False)
@click.option("--category", required=True, help="Train on this category's normal images.")
@click.option("--out", "-o", "out", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Checkpoint folder (an existing one is resumed).")
@click.option("--steps", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Total optimisation steps (a resumed run continues up to this many).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--image-size", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--model", "model_preset", default="unet2d", show_default=True,
              help="unet2d (diffusers UNet2DModel), unet2d-small, adm (RealNet's ADM, "
                   "unconditional), or the tiny test presets.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.9999, show_default=True)
@click.option("--save-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if present).")
@workspace_option
@run_options
@json_option
def sdas_train(manifest: str | None, category: str, out: Path, steps: int, batch_size: int,
               image_size: int, model_preset: str, lr: float, ema_decay: float,
               save_every: int, device: str | None, workspace: Path, seed: int, jobs: int,
               as_json: bool) -> None:
    """Train a diffusion model on one category's kept normal training images.

    Seeded and resumable: run the same command again after a stop and it continues from the
    last checkpoint exactly as an uninterrupted run would. bf16 autocast on a GPU.

    \b
    Example:
      curate sdas train --category Magnetic-tile-defect --out mtd-ddpm --steps 50000 -w ws
    """
    train_mod = _sdas_import("curate.stages.sdas.train")
    from curate.stages.sdas.stage import training_images

    torch = _sdas_import("torch")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = train_mod.TrainConfig(preset=model_preset, image_size=image_size, steps=steps,
                                   batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                                   save_every=save_every, seed=seed, device=device)
    # Writes only the checkpoint folder: hours of training must not lock the workspace.
    with open_context(workspace, seed=seed, jobs=jobs, create=False, write=False) as ctx:
        ws = workspace_of(ctx)
        m = ws.load(manifest)
        images = training_images(ws, m, category)
        with ctx.progress(f"sdas train {category}", steps, loss=float("nan")) as bar:
            result = train_mod.train(
                images, out, config, info={"manifest": m.id, "category": category,
                                           "images": len(images)},
                on_step=lambda step, loss: bar.update(completed=step, loss=loss))
    summary = {"out": str(result.out), "step": result.step, "resumed_from": result.resumed_from,
               "images": len(images), "last_loss": result.losses[-1] if result.losses else None}
    if as_json:
        emit_json(summary)
    else:
        stdout.print(f"trained {result.step} steps (resumed from {result.resumed_from}) on "
                     f"{len(images)} images; last loss {summary['last_loss']}; EMA weights in "
                     f"{result.out / 'ema.safetensors'}", highlight=False)


@sdas_group.command("sample", cls=StageCommand,
                    stage_params="curate.stages.sdas.stage:SdasSampleParams",
                    # --checkpoint is a path that must exist (recorded absolute), --strength
                    # is the pair of bounds, and the device's default depends on the machine.
                    by_hand=("checkpoint", "strength_min", "strength_max", "device"))
@click.argument("manifest", required=False)
@click.option("--checkpoint", required=True, type=click.Path(exists=True, path_type=Path),
              help="A `curate sdas train` folder or an official ADM checkpoint (.pt).")
@click.option("--strength", nargs=2, type=float, default=None,
              help="s ~ U(A, B) per image  [default: 0.1 0.2 (ddpm), 0.01 0.03 (ddim)]")
@click.option("--device", default=None, help="torch device (default: cuda if present).")
@workspace_option
@run_options
@json_option
def sdas_sample(manifest: str | None, checkpoint: Path, strength: tuple[float, float] | None,
                device: str | None, values: dict[str, Any], workspace: Path, seed: int,
                jobs: int, as_json: bool) -> None:
    """Sample a bank of SDAS synthetic anomalies into the store, one manifest row per image.

    Each row records its seed, strength s, steps, sampler and the checkpoint's sha256. The
    bank's parent is MANIFEST (default: latest, if any). Resumable: a killed run continues,
    and ends with the same files and manifest id as an uninterrupted one. The bank is a side
    product: `latest` stays on the dataset; name the bank by the id printed.

    \b
    Example:
      curate sdas sample --category Magnetic-tile-defect --checkpoint mtd-ddpm -n 10000 -w ws
    """
    sampler_mod = _sdas_import("curate.stages.sdas.sampler")
    from curate.stages.sdas.stage import SdasSample

    torch = _sdas_import("torch")
    low, high = strength or sampler_mod.DEFAULT_STRENGTH[values["sampler"]]
    params = make_params(SdasSample, values | {
        "checkpoint": str(checkpoint.absolute()), "strength_min": low, "strength_max": high,
        "device": device or ("cuda" if torch.cuda.is_available() else "cpu")})
    with open_context(workspace, seed=seed, jobs=jobs) as ctx:
        ws = workspace_of(ctx)
        parents = [ws.load(manifest)] if manifest or ws.head() else []
        result = run_stage(SdasSample(), parents, params, ctx)
    show_results([result], as_json)
    _show_side_product(result, "bank", as_json)


@sdas_group.command("blend", cls=StageCommand,
                    stage_params="curate.stages.sdas.stage:SdasBlendParams",
                    # --bank names a manifest (recorded by its id), --delta is the pair of
                    # bounds; the Perlin mask's scales and threshold are not on the command
                    # line.
                    by_hand=("bank", "delta_min", "delta_max", "min_scale", "max_scale",
                             "threshold"))
@click.argument("manifest", required=False)
@click.option("--bank", default=None, help="Bank manifest (sdas sample) to take anomalies "
              "from; without it, procedural textures.")
@click.option("--delta", nargs=2, type=float, default=(0.5, 1.0), show_default=True,
              help="Opacity δ ~ U(A, B).")
@workspace_option
@run_options
@json_option
def sdas_blend(manifest: str | None, bank: str | None, delta: tuple[float, float],
               values: dict[str, Any], workspace: Path, seed: int, jobs: int,
               as_json: bool) -> None:
    """Blend anomalies into normal images: Perlin mask × foreground, written with their masks.

    A = (1 − M)·I + (1 − δ)·M·I + δ·M·P. MANIFEST (default: the bank's parent, else latest)
    gives the normal images; the output can be reviewed with `curate review push <id>`. The
    blend is a side product: `latest` stays on the dataset; name the blend by the id printed.

    \b
    Example:
      curate sdas blend --category Magnetic-tile-defect --bank 3f2a9c -w ws
      curate review push <blend id> -w ws
    """
    from curate.stages.sdas.stage import SdasBlend

    with open_context(workspace, seed=seed, jobs=jobs, create=False) as ctx:
        ws = workspace_of(ctx)
        banks = [ws.load(bank)] if bank else []
        if manifest is None and banks and banks[0].header["parents"]:
            manifest = banks[0].header["parents"][0]
        params = make_params(SdasBlend, values | {
            "delta_min": delta[0], "delta_max": delta[1], "bank": banks[0].id if banks else ""})
        result = run_stage(SdasBlend(), [ws.load(manifest), *banks], params, ctx)
    show_results([result], as_json)
    _show_side_product(result, "blend", as_json)


def _show_side_product(result: StageResult, what: str, as_json: bool) -> None:
    """Say that a bank or blend left ``latest`` on the dataset, and how to name it instead."""
    if not as_json:  # (the JSON has the full id)
        stdout.print(f"{what} {result.manifest.id} is a side product: `latest` stays where "
                     f"it was; name the {what} by its id", highlight=False)


@sdas_group.command("export")
@click.option("--bank", "banks", multiple=True, required=True, metavar="ID",
              help="Bank manifest (sdas sample) to write; repeat for one bank per category.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="RealNet's sdas folder (data/<dataset>/sdas): must be new, empty, or an "
                   "earlier bank export with --overwrite.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier bank export at --out.")
@workspace_option
@json_option
def sdas_export(banks: tuple[str, ...], out: Path, overwrite: bool, workspace: Path,
                as_json: bool) -> None:
    """Write banks in RealNet's SDAS folder layout.

    Each bank's images go flat to OUT/<Category>/<index>.png; point RealNet's `sdas_dir` at
    OUT/{} (its config: data/<dataset>/sdas/{}).
    OUT/curate-sdas.json maps each file to its bank, sample id, seed and strength. All or
    nothing: a failure leaves OUT as it was.

    \b
    Example:
      curate sdas export --bank 3f2a9c --out data/HSS-IAD/sdas -w ws
    """
    from curate.export.sdas import export_banks

    # Writes only to --out: a reader of the workspace, it neither takes nor waits for the lock.
    ws = Workspace.open(workspace, create=False)
    index = export_banks(ws, [ws.load(bank) for bank in banks], out, overwrite=overwrite)
    if as_json:
        emit_json({k: v for k, v in index.items() if k != "files"} | {"out": str(out)})
        return
    for bank in index["banks"]:
        stdout.print(f"exported {bank['images']} images of bank {bank['manifest'][:12]} to "
                     f"{out / bank['folder']}", highlight=False)
    stdout.print(f"RealNet: sdas_dir: {out}/{{}}", highlight=False)
