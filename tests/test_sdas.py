"""SDAS: the ADM layout and its restricted loader, the sampler, banks, blending, training."""

from __future__ import annotations

import json
import math
import os
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from curate.app.cli import cli  # noqa: E402
from curate.core.manifest import Manifest, new_row  # noqa: E402
from curate.engine.runner import run_stage  # noqa: E402
from curate.imaging.io import decode_file, encode_png  # noqa: E402
from curate.stages.sdas.adm import ADMUNet, realnet_config, tiny_config  # noqa: E402
from curate.stages.sdas.checkpoints import (  # noqa: E402
    CheckpointError,
    adm_config_for,
    compare_layout,
    load_adm_checkpoint,
    read_pickle_checkpoint,
)
from curate.stages.sdas.models import build_model, preset, write_model_json  # noqa: E402
from curate.stages.sdas.sampler import (  # noqa: E402
    RespacedSchedule,
    base_betas,
    sample,
    space_timesteps,
)
from curate.stages.sdas.stage import SdasBlend, SdasBlendParams, SdasSample, SdasSampleParams  # noqa: E402
from curate.stages.sdas.train import TrainConfig, train  # noqa: E402
from detectors.layers import AttentionBlock, group_norm  # noqa: E402

LAYOUTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "checkpoint-layouts"
SIZE = 16  # sampler tests: 16 px images from a tiny UNet


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of order one everywhere (ADM zero-initialises its output convolutions, which
    would make every comparison pass trivially)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP workers spinning against other jobs
    on a small shared machine make each step take seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_model(*preset("unet2d-tiny"), SIZE).eval()


# ----------------------------------------------------------------------------- ADM layout
def test_adm_matches_the_official_layout_strictly():
    layout = json.loads((LAYOUTS / "adm_realnet.json").read_text())
    meta = layout.pop("meta")
    with torch.device("meta"):
        model = ADMUNet(realnet_config(num_classes=15))
        state = {k: torch.empty(shape) for k, shape in layout.items()}
    assert list(model.state_dict()) == list(layout)  # the same keys in the same order
    report = compare_layout(model, state)
    assert report.ok, report.describe()
    model.load_state_dict(state, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"] == 552_829_446
    assert len(layout) == meta["num_keys"] == 567
    # The configuration of a checkpoint is read off its tensors.
    assert adm_config_for(state) == realnet_config(15)


def test_sdpa_attention_equals_the_legacy_attention():
    norm = partial(group_norm, groups=8, in_float32=True)
    block = _randomize(AttentionBlock(32, norm, num_heads=1, num_head_channels=8))
    x = torch.randn(2, 32, 6, 6)
    b, c, length, heads = 2, 32, 36, block.num_heads
    flat = x.reshape(b, c, length)
    qkv = block.qkv(block.norm(flat))
    ch = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    legacy = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)
    expected = (flat + block.proj_out(legacy)).reshape(x.shape)
    assert torch.allclose(block(x), expected, atol=1e-4)


def _fake_easydict(monkeypatch):
    """An ``easydict`` module like the real one (a dict mirroring its items as attributes)."""
    module = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, d=None, **kw):
            super().__init__()
            for k, v in {**(d or {}), **kw}.items():
                setattr(self, k, v)

        def __setattr__(self, name, value):
            if isinstance(value, dict) and not isinstance(value, EasyDict):
                value = EasyDict(value)
            super().__setattr__(name, value)
            super().__setitem__(name, value)

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    module.EasyDict = EasyDict
    monkeypatch.setitem(sys.modules, "easydict", module)
    return EasyDict


def test_realnet_checkpoint_format_loads_with_the_restricted_unpickler(tmp_path, monkeypatch):
    EasyDict = _fake_easydict(monkeypatch)
    config = tiny_config(num_classes=3)
    model = _randomize(ADMUNet(config))
    arch = EasyDict({"unet": {"channel_mult": list(config.channel_mult),
                              "attention_resolutions": list(config.attention_ds),
                              "num_head_channels": config.num_head_channels,
                              "image_size": 32}, "trainer": {"ema_decay": 0.9999}})
    path = tmp_path / "mvtec_diffusion_ckpt_epoch_240.pt"
    torch.save({"epoch": 240, "arch": arch, "loss": np.float64(0.125),
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    monkeypatch.delitem(sys.modules, "easydict")  # loading must not need easydict

    raw = read_pickle_checkpoint(path)
    assert type(raw["arch"]) is dict and type(raw["arch"]["unet"]) is dict
    assert raw["loss"] == 0.125 and raw["epoch"] == 240
    # The tiny model's norm groups are not in RealNet's config: pass the config explicitly.
    loaded, info = load_adm_checkpoint(path, config=config)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 900]), torch.tensor([0, 2])
    assert torch.equal(loaded(x, t, y), model.eval()(x, t, y))
    assert info["epoch"] == 240 and len(info["sha256"]) == 64


def test_shape_mismatches_are_reported_not_skipped(tmp_path):
    config = tiny_config(num_classes=3)
    state = ADMUNet(config).state_dict()
    state["label_emb.weight"] = torch.zeros(15, state["label_emb.weight"].shape[1])
    del state["out.2.bias"]
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(CheckpointError) as err:
        load_adm_checkpoint(path, config=config)
    message = str(err.value)
    assert "label_emb.weight [15, 64] (model [3, 64])" in message
    assert "missing key(s): out.2.bias" in message


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_any_other_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="not allowed"):
        read_pickle_checkpoint(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- sampler
def test_respacing_follows_guided_diffusion():
    assert space_timesteps(1000, 20, "ddim") == list(range(0, 1000, 50))
    even = space_timesteps(1000, 20, "even")
    assert even[0] == 0 and even[-1] == 999 and len(even) == 20
    sched = RespacedSchedule.build(base_betas(), 20)
    acp = np.cumprod(1 - base_betas())
    assert np.allclose(sched.alphas_cumprod, acp[::50])
    assert np.allclose(np.cumprod(1 - sched.betas), sched.alphas_cumprod)


def test_strength_zero_is_diffusers_ordinary_sampling(unet):
    """s = 0 reproduces DDPMScheduler (learned_range, respaced by set_timesteps: its "leading"
    spacing equals RealNet's ddimK when K divides T) with the same per-image generators; the
    DDIM variant reproduces DDIMScheduler (eta 0, clipped x0)."""
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    seeds, steps = [3, 7], 10
    schedule = RespacedSchedule.build(base_betas(), steps)
    with torch.no_grad():
        ours = sample(unet, schedule, seeds, [0.0, 0.0], shape=(3, SIZE, SIZE))
        ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                             variance_type="learned_range")
        ddpm.set_timesteps(steps)
        assert sorted(ddpm.timesteps.tolist()) == schedule.timesteps.tolist()
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x = randn_tensor((2, 3, SIZE, SIZE), generator=gens)
        for t in ddpm.timesteps:
            x = ddpm.step(unet(x, t).sample, t, x, generator=gens).prev_sample
        assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()

        ours_ddim = sample(unet, schedule, seeds, [0.0, 0.0], shape=(3, SIZE, SIZE),
                           method="ddim")
        ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        ddim.set_timesteps(steps)
        x = randn_tensor((2, 3, SIZE, SIZE), generator=[torch.Generator().manual_seed(s)
                                                        for s in seeds])
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample[:, :3], t, x, eta=0.0,
                          use_clipped_model_output=True).prev_sample
        assert torch.allclose(ours_ddim, x, atol=1e-4), (ours_ddim - x).abs().max()


def test_deviation_grows_with_strength_and_seeds_reproduce(unet):
    schedule = RespacedSchedule.build(base_betas(), 10)
    seeds = [11, 12, 13]
    with torch.no_grad():
        def run(s, method="ddpm", which=seeds):
            return sample(unet, schedule, which, [s] * len(which), shape=(3, SIZE, SIZE),
                          method=method)

        for method in ("ddpm", "ddim"):
            base = run(0.0, method)
            deviations = [(run(s, method) - base).abs().mean().item()
                          for s in (0.02, 0.1, 0.3, 1.0)]
            assert deviations[0] > 0
            assert deviations == sorted(deviations), (method, deviations)
        again = run(0.15)
        assert torch.equal(again, run(0.15))
        # An image depends on its own seed and strength, not on its batch.
        alone = sample(unet, schedule, [12], [0.15], shape=(3, SIZE, SIZE))
        assert torch.allclose(alone[0], again[1], atol=1e-5)


def test_sampler_runs_the_adm_with_class_labels():
    model = _randomize(ADMUNet(tiny_config(image_size=16, num_classes=3))).eval()
    schedule = RespacedSchedule.build(base_betas(), 4)
    with torch.no_grad():
        out = sample(model, schedule, [1, 2], [0.1, 0.2], shape=(3, 16, 16),
                     labels=torch.tensor([0, 2]))
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1.0


# ----------------------------------------------------------------------------- banks
@pytest.fixture
def checkpoint(tmp_path, unet) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    arch, config = preset("unet2d-tiny")
    write_model_json(folder, arch, config, SIZE)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
              str(folder / "ema.safetensors"))
    return folder


def _store_files(ws) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in ws.store.root.rglob("*.png")}


def test_bank_rows_record_each_image_and_resume_byte_identically(tmp_path, checkpoint):
    from curate.engine.runner import Context
    from curate.engine.workspace import Workspace

    params = SdasSampleParams(category="tile", checkpoint=str(checkpoint), n=5, steps=3,
                              batch_size=2)
    with Context(Workspace.open(tmp_path / "a"), progress=False, seed=4) as ctx:
        whole = run_stage(SdasSample(), [], params, ctx).manifest
        files = _store_files(ctx.workspace)

    class Killed(Exception):
        pass

    def die(batch):
        raise Killed(batch)

    with Context(Workspace.open(tmp_path / "b"), progress=False, seed=4) as ctx:
        with pytest.raises(Killed):
            run_stage(SdasSample(on_batch=die), [], params, ctx)
        assert len(_store_files(ctx.workspace)) == 2  # one batch made before the "kill"
        resumed = run_stage(SdasSample(), [], params, ctx).manifest
        assert resumed.id == whole.id
        assert _store_files(ctx.workspace) == files
        again = run_stage(SdasSample(), [], params, ctx)
        assert again.from_cache and again.manifest.id == whole.id

    rows = whole.row_list()
    assert len(rows) == 5 and len(files) == 5
    seeds = {r["measures"]["sdas.seed"] for r in rows}
    assert len(seeds) == 5
    for r in rows:
        m = r["measures"]
        assert 0.1 <= m["sdas.strength"] <= 0.2
        assert m["sdas.steps"] == 3 and m["sdas.sampler"] == "ddpm"
        assert len(m["sdas.checkpoint"]) == 64
        assert r["label"] == "synthetic" and r["path"].endswith(r["artifacts"]["image"])
    assert whole.header["stage"]["params"]["checkpoint"].startswith("sha256:")


# ----------------------------------------------------------------------------- blending
def _normal_manifest(tmp_path, ws, size=48, count=3) -> Manifest:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    fg = np.zeros((size, size), bool)
    fg[:, : size // 2] = True  # the object covers the left half
    fg_key = ws.store.put_mask(fg)
    rows = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        (src / f"{i}.png").write_bytes(encode_png(pixels))
        rows.append(new_row(source="src", path=f"{i}.png", category="tile", label="good",
                            split="train", width=size, height=size, channels=3,
                            artifacts={"foreground": fg_key}))
    m = Manifest.build(rows, stage="ingest", stage_version="1", roots={"src": str(src)})
    ws.save(m)
    return m


@pytest.mark.parametrize("with_bank", [False, True])
def test_blending_stays_inside_the_foreground(tmp_path, ctx, checkpoint, with_bank):
    ws = ctx.workspace
    normal = _normal_manifest(tmp_path, ws)
    inputs = [normal]
    if with_bank:
        bank_params = SdasSampleParams(category="tile", checkpoint=str(checkpoint), n=2,
                                       steps=2, batch_size=2)
        inputs.append(run_stage(SdasSample(), [normal], bank_params, ctx).manifest)
    params = SdasBlendParams(category="tile", n=12, size=48,
                             bank=inputs[1].id if with_bank else "")
    out = run_stage(SdasBlend(), inputs, params, ctx).manifest
    bases = {r["sample_id"]: r for r in normal.rows()}
    fg = np.zeros((48, 48), bool)
    fg[:, :24] = True
    anomalous = 0
    for row in out.rows():
        mask = ws.store.read_mask(row["artifacts"]["mask"])
        image = ws.store.read_pixels(row["artifacts"]["image"])
        base = bases[row["measures"]["sdas_blend.base"]]
        original = decode_file(Path(normal.roots["src"]) / base["path"])
        assert not (mask & ~fg).any()  # no anomaly outside the foreground
        assert np.array_equal(image[~mask], original[~mask])
        assert 0.5 <= row["measures"]["sdas_blend.delta"] <= 1.0
        assert row["label"] == "synthetic" and row["split"] == "train"
        assert (row["measures"]["sdas_blend.source"] == "procedural") != with_bank
        anomalous += bool(mask.any() and (image[mask] != original[mask]).any())
    assert anomalous >= 6
    # Reviewable: the rows' files are the store's images.
    row = next(out.rows())
    assert ws.source_file(out, row["source"], row["path"]).is_file()


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def mtd_crops(mtd_root):
    files = sorted((mtd_root / "MT_Free" / "Imgs").glob("*.jpg"))[:6]
    return [decode_file(f)[:64, :64] for f in files]


def test_training_is_finite_and_resumes_exactly(tmp_path, mtd_crops):
    config = TrainConfig(preset="unet2d-tiny", image_size=SIZE, steps=4, batch_size=2,
                         save_every=2, seed=1)
    whole = train(mtd_crops, tmp_path / "whole", config)
    assert whole.step == 4 and all(math.isfinite(x) for x in whole.losses)

    first = train(mtd_crops, tmp_path / "split", TrainConfig(**{**config.__dict__, "steps": 2}))
    assert first.step == 2
    rest = train(mtd_crops, tmp_path / "split", config)
    assert rest.resumed_from == 2 and rest.losses == whole.losses
    a = load_file(tmp_path / "whole" / "ema.safetensors")
    b = load_file(tmp_path / "split" / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="other settings"):
        train(mtd_crops, tmp_path / "split", TrainConfig(**{**config.__dict__, "lr": 1e-3}))


def test_cli_train_sample_blend(tmp_path, mtd_root):
    ws = str(tmp_path / "ws")
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(cli, [*args, "-w", ws, "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    invoke("ingest", "mtd", str(mtd_root), "-j", "1")
    category = "Magnetic-tile-defect"
    ckpt = str(tmp_path / "ckpt")
    trained = invoke("sdas", "train", "--category", category, "--out", ckpt, "--steps", "1",
                     "--image-size", "16", "--batch-size", "2", "--model", "unet2d-tiny",
                     "--device", "cpu", "-j", "1")
    assert trained["step"] == 1
    (bank,) = invoke("sdas", "sample", "--category", category, "--checkpoint", ckpt, "-n", "2",
                     "--steps", "2", "--device", "cpu", "-j", "1")
    assert bank["samples"] == 2
    (blended,) = invoke("sdas", "blend", "--category", category, "--bank", bank["manifest"],
                        "-n", "2", "--size", "32", "-j", "1")
    assert blended["samples"] == 2
    verified = invoke("manifest", "verify", blended["manifest"], "-j", "1")
    assert verified["ok"], verified["problems"]

    from curate.engine.workspace import Workspace
    from curate.export.fiftyone import sample_fields

    workspace = Workspace.open(ws, create=False)
    m = workspace.load(blended["manifest"])
    fields = sample_fields(next(m.rows()), workspace, m)  # what `curate review push` sends
    assert Path(fields["filepath"]).is_file() and fields["label"] == "synthetic"
    assert 0.5 <= fields["sdas_blend_delta"] <= 1.0
