"""SDAS failures a user can cause, each one sentence naming the file (issue 16 item 11).

A `.pt` that is not an ADM checkpoint, unreadable EMA weights, and a source image removed or
changed since ingest (`curate sdas train`, `sdas blend`).
"""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner
from helpers import ingest, mtd_images, tiny_diffusion_checkpoint

from curate.app.cli import cli
from curate.core.errors import CurateError
from curate.engine.runner import Context, run_stage
from curate.stages.sdas.stage import SdasBlend, SdasBlendParams, training_images

torch = pytest.importorskip("torch", reason="SDAS needs the detectors extra")

CATEGORY = "Magnetic-tile-defect"


def test_a_pt_without_adm_keys_names_the_file(tmp_path):
    from curate.stages.sdas.checkpoints import CheckpointError
    from curate.stages.sdas.models import load_model

    no_adm = tmp_path / "classifier.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, no_adm)
    with pytest.raises(CheckpointError) as info:
        load_model(no_adm)
    message = str(info.value)
    assert message.startswith(f"{no_adm}: ") and "time_embed.0.weight" in message
    assert "expected an ADM (guided-diffusion) checkpoint" in message
    no_tensors = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "comment": "no weights here"}, no_tensors)
    with pytest.raises(CheckpointError, match=f"^{no_tensors}: the checkpoint holds no state"):
        load_model(no_tensors)


def test_unreadable_ema_weights_name_the_file(tmp_path):
    from curate.stages.sdas.checkpoints import CheckpointError
    from curate.stages.sdas.models import load_model

    folder = tiny_diffusion_checkpoint(tmp_path / "ckpt")
    (folder / "ema.safetensors").write_bytes(b"cut short")
    with pytest.raises(CheckpointError, match=f"^{folder / 'ema.safetensors'}: not a readable "
                                              "safetensors file"):
        load_model(folder)


@pytest.fixture
def mtd_free(mtd_root, tmp_path):
    """A copied MTD tree of four normal tiles (the tests delete and change files in it)."""
    folder = tmp_path / "mtd" / "MT_Free" / "Imgs"
    folder.mkdir(parents=True)
    for jpg in mtd_images(mtd_root, "MT_Free", 4):
        shutil.copy(jpg, folder)
        shutil.copy(jpg.with_suffix(".png"), folder)
    return tmp_path / "mtd", sorted(folder.glob("*.jpg"))


def test_training_images_name_a_file_removed_or_changed_since_ingest(ctx, mtd_free):
    root, jpgs = mtd_free
    m = ingest(ctx, "mtd", root)
    assert len(training_images(ctx.workspace, m, CATEGORY)) == 4
    jpgs[1].unlink()
    with pytest.raises(CurateError, match=f"^{jpgs[1]} was removed since ingest"):
        training_images(ctx.workspace, m, CATEGORY)
    shutil.copy(jpgs[0], jpgs[1])
    with pytest.raises(CurateError, match=f"^{jpgs[1]} changed since ingest"):
        training_images(ctx.workspace, m, CATEGORY)
    with pytest.raises(CurateError, match="no kept normal training images of category 'Tiles'"):
        training_images(ctx.workspace, m, "Tiles")


def test_cli_sdas_train_on_a_removed_file_is_one_sentence(workspace, mtd_free, tmp_path):
    root, jpgs = mtd_free
    with Context(workspace, jobs=1, progress=False) as ctx:  # closed before the CLI runs
        m = ingest(ctx, "mtd", root)
    jpgs[2].unlink()
    result = CliRunner().invoke(cli, [
        "sdas", "train", m.id, "--category", CATEGORY, "--out", str(tmp_path / "ckpt"),
        "--steps", "1", "--image-size", "16", "--model", "unet2d-tiny", "--device", "cpu",
        "-w", str(workspace.root)])
    assert result.exit_code == 1, result.output
    assert f"{jpgs[2]} was removed since ingest" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "ckpt" / "state.json").exists()


def test_blending_into_a_removed_image_is_one_sentence(ctx, mtd_free):
    root, jpgs = mtd_free
    m = ingest(ctx, "mtd", root)
    jpgs[0].unlink()
    with pytest.raises(CurateError, match=f"blending into MT_Free/Imgs/{jpgs[0].name} failed: "
                                          ".*removed since ingest"):
        run_stage(SdasBlend(), [m], SdasBlendParams(category=CATEGORY, size=16), ctx)
