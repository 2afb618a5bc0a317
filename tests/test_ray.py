"""`--executor ray`: the same manifests as the local and process executors, faults survived,
and GPU stages asking Ray for GPUs.

Runs on a local Ray runtime this module starts (two CPUs and one *declared* GPU: Ray schedules
by resource counts, so GPU requests are exercised on a machine without one) and stops.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'curate[ray]')")

import helpers  # noqa: E402
from helpers import (  # noqa: E402
    CrashOnce,
    CrashParams,
    ingest,
    labels,
    mtd_subset,
    synthetic,
    tiny_diffusion_checkpoint,
)

from curate.core.errors import CurateError  # noqa: E402
from curate.core.manifest import drop  # noqa: E402
from curate.engine.runner import Context, Stage, map_updates, run_stage  # noqa: E402
from curate.engine.workspace import Workspace  # noqa: E402
from curate.stages.dedup import Dedup, DedupParams  # noqa: E402
from curate.stages.label_filter import LabelFilter, LabelFilterParams  # noqa: E402
from curate.stages.quality import Quality, QualityParams  # noqa: E402


@pytest.fixture(scope="module")
def ray_runtime():
    # Ray workers do not have tests/ on their path: ship the tests' functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(helpers)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def pipeline(ws: Path, source: Path, executor: str) -> list[str]:
    """ingest → labels → dedup → quality → label_filter; the manifest id after each stage.
    ``ray-data``: Ray, with every stage after ingest streaming its input through Ray Data."""
    with Context(Workspace.open(ws), jobs=2, executor=executor.removesuffix("-data"),
                 ray_data=executor == "ray-data", progress=False) as ctx:
        manifests = [ingest(ctx, "mtd", source)]
        manifests.append(labels(ctx, manifests[-1]))
        for stage, params in ((Dedup(), DedupParams()),
                              (Quality(), QualityParams(min_category=4)),
                              (LabelFilter(), LabelFilterParams(min_category=4))):
            manifests.append(run_stage(stage, [manifests[-1]], params, ctx).manifest)
    return [m.id for m in manifests]


def test_same_manifests_on_every_executor(ray_runtime, mtd_root, tmp_path):
    source = mtd_subset(mtd_root, tmp_path / "mtd",
                        {"MT_Free": 12, "MT_Blowhole": 4, "MT_Crack": 4, "MT_Fray": 3})
    ids = {executor: pipeline(tmp_path / executor, source, executor)
           for executor in ("local", "process", "ray", "ray-data")}
    assert ids["ray"] == ids["ray-data"] == ids["local"] == ids["process"]
    assert len(set(ids["ray"])) == len(ids["ray"])  # every stage made a new manifest
    # The run record says where each manifest was computed.
    for executor in ids:
        record = json.loads((tmp_path / executor / "manifests" /
                             f"{ids[executor][-1]}.run.json").read_text())
        assert record["executor"] == executor.removesuffix("-data")


# ----------------------------------------------------------------------------- faults
def crash_reference(tmp_path: Path):
    """(marker, params, the stage's output inline and without the crash): the marker exists
    while the reference runs, and is removed after, so the next run's worker dies once."""
    marker = tmp_path / "crashed"
    params = CrashParams(marker=str(marker), fail_on="img11.png")
    marker.touch()
    with Context(Workspace.open(tmp_path / "clean"), executor="local", progress=False) as ctx:
        clean = run_stage(CrashOnce(), [synthetic()], params, ctx).manifest
    marker.unlink()
    return marker, params, clean


@pytest.mark.parametrize("saved", [True, False], ids=["ray-data", "ray-tasks"])
def test_killed_worker_is_retried_and_a_raising_sample_dropped(ray_runtime, tmp_path, saved):
    """Through Ray Data (the input manifest is saved: workers read its Parquet file) and
    through plain tasks (an input only in memory)."""
    marker, params, clean = crash_reference(tmp_path)

    with Context(Workspace.open(tmp_path / "ray"), executor="ray", ray_data=saved,
                 progress=False) as ctx:
        source = synthetic()
        if saved:
            ctx.workspace.save(source)
        streamed = ctx.map_manifest(crash_free, source, ctx.env("probe", params, {}), "probe")
        assert (streamed is not None) == saved
        survived = run_stage(CrashOnce(), [source], params, ctx).manifest
    assert marker.exists()  # a worker really died
    assert survived.id == clean.id
    dropped = [r for r in survived.rows() if r["status"] == "dropped"]
    assert [r["path"] for r in dropped] == ["img11.png"]
    assert "this sample is bad" in dropped[0]["reasons"][0]["detail"]


def crash_free(row, env):
    return {"measures": {"probe.path": row["path"]}}


def test_ray_data_streams_a_saved_manifest_in_order(ray_runtime, tmp_path):
    source = synthetic(700)
    rows = source.row_list()
    drop(rows[3], "probe", "test", "dropped rows are skipped, not mapped")
    manifest = source.derive(rows, stage="probe", stage_version="1", params={})
    with Context(Workspace.open(tmp_path / "ws"), executor="ray", ray_data=True,
                 progress=False) as ctx:
        env = ctx.env("probe", None, {})
        assert ctx.map_manifest(crash_free, manifest, env, "probe") is None  # not saved yet
        ctx.workspace.save(manifest)
        streamed = ctx.map_manifest(crash_free, manifest, env, "probe")
    kept = [r["path"] for r in manifest.rows() if r["status"] == "kept"]
    assert [u["measures"]["probe.path"] for u in streamed] == kept and len(kept) == 699
    with Context(Workspace.open(tmp_path / "ws"), executor="ray", progress=False) as ctx:
        assert ctx.map_manifest(crash_free, manifest, env, "probe") is None  # --ray-data off


def test_ray_options_without_ray_executor_are_refused(tmp_path):
    with pytest.raises(CurateError, match="--executor ray"):
        Context(Workspace.open(tmp_path / "ws"), executor="process", ray_address="auto")
    with pytest.raises(CurateError, match="--executor ray"):
        Context(Workspace.open(tmp_path / "ws"), executor="local", ray_data=True)


def test_cli_executor_options(ray_runtime, mtd_root, tmp_path):
    from click.testing import CliRunner

    from curate.app.cli import cli

    source = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 3, "MT_Crack": 2})
    runner = CliRunner()
    ids = []
    for executor in ("local", "ray"):
        ws = str(tmp_path / executor)
        result = runner.invoke(cli, ["ingest", "mtd", str(source), "-w", ws,
                                     "--executor", executor, "--json"])
        assert result.exit_code == 0, result.output
        ray_data = ["--ray-data"] if executor == "ray" else []
        deduped = runner.invoke(cli, ["dedup", "-w", ws, "--executor", executor, *ray_data,
                                      "--json"])
        assert deduped.exit_code == 0, deduped.output
        ids.append((json.loads(result.output)[0]["manifest"],
                    json.loads(deduped.output)[0]["manifest"]))
    assert ids[0] == ids[1]
    refused = runner.invoke(cli, ["ingest", "mtd", str(source), "-w", str(tmp_path / "x"),
                                  "--executor", "process", "--ray-address", "auto"])
    assert refused.exit_code == 1 and "--executor ray" in refused.output


def test_killed_worker_in_the_process_pool_is_retried(tmp_path):
    """The same fault under --executor process: the broken pool is replaced and the chunks
    that did not finish run again."""
    marker, params, clean = crash_reference(tmp_path)
    with Context(Workspace.open(tmp_path / "pool"), jobs=2, executor="process",
                 progress=False) as ctx:
        survived = run_stage(CrashOnce(), [synthetic()], params, ctx).manifest
    assert marker.exists()
    assert survived.id == clean.id


# ----------------------------------------------------------------------------- GPU stages
def assigned_gpus(job):
    return job, list(ray.get_gpu_ids())


def fail_on_two(job):
    if job == 2:
        raise CurateError("job 2 is bad")
    return job


def test_tasks_ask_ray_for_gpus_and_keep_their_order(ray_runtime):
    with Context(None, executor="ray", progress=False) as ctx:
        on_gpu = list(ctx.tasks(assigned_gpus, range(5), num_gpus=1))
        assert [job for job, _ in on_gpu] == list(range(5))
        assert all(len(gpus) == 1 for _, gpus in on_gpu)
        assert all(gpus == [] for _, gpus in ctx.tasks(assigned_gpus, range(3)))
        with pytest.raises(CurateError, match="2 GPU.*has 1"):
            list(ctx.tasks(assigned_gpus, range(2), num_gpus=2))
        with pytest.raises(CurateError, match="job 2 is bad"):  # raised, not retried forever
            list(ctx.tasks(fail_on_two, range(4)))
    with Context(None, executor="local", progress=False) as ctx:  # inline elsewhere
        assert list(ctx.tasks(fail_on_two, [0, 1])) == [0, 1]


@dataclass(frozen=True)
class NoParams:
    pass


def gpus_seen(row, env):
    return {"measures": {"probe.gpus": len(ray.get_gpu_ids())}}


class GpuProbe(Stage):
    name = "gpu_probe"
    version = "1"
    Params = NoParams
    num_gpus = 1

    def run(self, inputs, params, ctx):
        (m,) = inputs
        return self.output_updates(m, map_updates(self, m, params, ctx, gpus_seen), params, ctx)


def test_a_gpu_stage_runs_its_samples_on_gpu_tasks(ray_runtime, tmp_path):
    with Context(Workspace.open(tmp_path / "ws"), executor="ray", progress=False) as ctx:
        out = run_stage(GpuProbe(), [synthetic(6)], NoParams(), ctx).manifest
    assert [r["measures"]["probe.gpus"] for r in out.rows()] == [1] * 6


def test_sdas_bank_is_the_same_from_ray_tasks(ray_runtime, tmp_path):
    pytest.importorskip("diffusers")
    from curate.stages.sdas.stage import SdasSample, SdasSampleParams

    checkpoint = tiny_diffusion_checkpoint(tmp_path / "ckpt")
    params = SdasSampleParams(category="tile", checkpoint=str(checkpoint), n=5, steps=2,
                              batch_size=2)
    ids, files = {}, {}
    for executor in ("local", "ray"):
        with Context(Workspace.open(tmp_path / executor), executor=executor, seed=1,
                     progress=False) as ctx:
            ids[executor] = run_stage(SdasSample(), [], params, ctx).manifest.id
        files[executor] = {p.name: p.read_bytes()
                           for p in (tmp_path / executor / "store").rglob("*.png")}
    assert ids["ray"] == ids["local"]
    assert len(files["ray"]) == 5 and files["ray"] == files["local"]
    # On a GPU device every batch is a task asking Ray for one GPU.
    assert SdasSample().gpus(params) == 0
    assert SdasSample().gpus(dataclasses.replace(params, device="cuda")) == 1


def test_ssfilter_is_the_same_from_ray_tasks(ray_runtime, mtd_root, tmp_path):
    pytest.importorskip("torch")
    from curate.stages.ssfilter.params import SSFilterParams
    from curate.stages.ssfilter.stage import SSFilter

    source = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 10, "MT_Crack": 2})
    params = SSFilterParams(kappa1=3, kappa2=0, batch_size=4, device="cpu")
    ids = {}
    for executor in ("local", "ray"):
        with Context(Workspace.open(tmp_path / executor), executor=executor,
                     progress=False) as ctx:
            candidates = labels(ctx, ingest(ctx, "mtd", source))
            result = run_stage(SSFilter(), [candidates], params, ctx).manifest
        ids[executor] = result.id
        assert sum("ssfilter.score" in r["measures"] for r in result.rows()) == 10
    assert ids["ray"] == ids["local"]
    assert SSFilter().gpus(dataclasses.replace(params, device="cuda")) == 1


def test_bench_trains_its_models_as_ray_tasks(ray_runtime, mtd_root, tmp_path):
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    from curate.app.cli import cli
    from curate.export.mvtec import export_mvtec
    from curate.stages.split import Split, SplitParams

    source = mtd_subset(mtd_root, tmp_path / "mtd",
                        {"MT_Free": 8, "MT_Blowhole": 2, "MT_Crack": 2})
    with Context(Workspace.open(tmp_path / "ws"), progress=False) as ctx:
        split = run_stage(Split(), [labels(ctx, ingest(ctx, "mtd", source))],
                          SplitParams(test_fraction=0.3), ctx).manifest
        export_mvtec(split, tmp_path / "export", ctx)
    tables = {}
    # Ray workers run torch on one thread; training sums in a different order on two threads,
    # which moves these untrained tiny models' maps visibly. Compare like with like.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for executor in ("local", "ray"):
            result = CliRunner().invoke(cli, [
                "bench", str(tmp_path / "export"), "--detector", "cras", "--protocol",
                "class-separated", "--backbone", "wide_resnet_tiny", "--weights", "random",
                "--device", "cpu", "--option", "resize=80", "--option", "crop=64", "--option",
                "embed_dim=64", "--iterations", "2", "--batch-size", "4", "--save-models",
                "--executor", executor, "--out", str(tmp_path / executor), "--json"])
            assert result.exit_code == 0, result.output
            data = json.loads(result.output)
            tables[executor] = (data["categories"], data["provenance"]["final_loss"])
            (model,) = data["provenance"]["models"].values()
            assert Path(model).is_file() and str(tmp_path / executor) in model
    finally:
        torch.set_num_threads(threads)
    assert tables["ray"] == tables["local"]
