"""The command line at its edges: how failures are shown (one sentence for what the user can
fix, a traceback for a bug, every traceback with --debug), seeds and defaults that come from
elsewhere (a recipe, a stage's Params), and what `curate bench` records."""

from __future__ import annotations

import dataclasses
import errno
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import curate.app.cli.stages
from curate.app.cli import cli, main
from curate.engine.workspace import Workspace
from curate.sources.discover import discover
from curate.stages.dedup import DedupParams


def invoke(*args, code=0, env=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env=env)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture
def mtd_copy(tmp_path, mtd_root) -> Path:
    """A few real MTD images and masks, copied (a full disk must be hit by curate's writes,
    and the sources must be real files of their own)."""
    root = tmp_path / "mtd"
    for folder, n in (("MT_Free", 6), ("MT_Blowhole", 3)):
        (root / folder / "Imgs").mkdir(parents=True)
        for jpg in sorted((mtd_root / folder / "Imgs").glob("*.jpg"))[:n]:
            shutil.copy(jpg, root / folder / "Imgs")
            shutil.copy(jpg.with_suffix(".png"), root / folder / "Imgs")
    return root


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ------------------------------------------------------------------- failures of the system
def _file_size_limit(limit: int):
    def limit_files():  # in the child, before exec: a write past `limit` bytes fails, EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_files


@pytest.mark.parametrize("debug", [False, True])
def test_a_full_disk_during_build_is_one_sentence_naming_the_file(tmp_path, mtd_copy, debug):
    """A real file-size limit (the first manifest is larger than it): exit 1 and one line
    naming the file and the system's reason, the traceback only with --debug."""
    ws = tmp_path / "ws"
    argv = [sys.executable, "-m", "curate.app.cli", *(["--debug"] if debug else []), "build",
            "hss-iad", "--source", f"mtd={mtd_copy}", "-w", str(ws), "-o", str(tmp_path / "out"),
            "-j", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(4000))
    assert proc.returncode == 1, proc.stderr
    if debug:
        assert "Traceback" in proc.stderr and "OSError" in proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
    else:
        assert "Traceback" not in proc.stderr
        line = _one_error_line(proc.stderr)
    assert "file too large while writing " + str(ws / "manifests") in line
    assert ".parquet" in line and "ulimit -f" in line


def test_no_space_left_names_the_manifest_being_written(tmp_path, mtd_copy, monkeypatch):
    """pyarrow's Parquet writer reports ENOSPC without a file name: the sentence still has it."""
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space "
                                    "left on device")

    monkeypatch.setattr("curate.core.manifest.pq.write_table", full_disk)
    result = invoke("ingest", "mtd", mtd_copy, "-w", tmp_path / "ws", code=1)
    line = _one_error_line(result.stderr)
    assert f"no space left on device while writing {tmp_path / 'ws' / 'manifests'}" in line
    assert "free some space" in line and "Traceback" not in result.output


def test_a_folder_without_permission_is_one_sentence(tmp_path, mtd_copy, monkeypatch):
    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ws" / "store"))

    monkeypatch.setattr(Workspace, "open", classmethod(refused))
    result = invoke("ingest", "mtd", mtd_copy, "-w", tmp_path / "ws", code=1)
    assert _one_error_line(result.stderr) == f"error: {tmp_path / 'ws' / 'store'}: permission denied"


# ------------------------------------------------------------------- bugs and --debug
def test_a_bug_keeps_its_traceback(tmp_path, mtd_copy, monkeypatch, capsys):
    """Neither a programming error nor an OSError curate caused itself is hidden as a line."""
    def bug(*args, **kwargs):
        raise KeyError("sample_id")

    monkeypatch.setattr("curate.stages.ingest.Ingest.run", bug)
    result = CliRunner().invoke(cli, ["ingest", "mtd", str(mtd_copy), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
    monkeypatch.setattr("curate.stages.ingest.Ingest.run", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EXDEV, "Invalid cross-device link", "a", "b")))
    result = CliRunner().invoke(cli, ["ingest", "mtd", str(mtd_copy), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 1 and isinstance(result.exception, OSError)
    # Run as the `curate` program: the traceback, then a line saying it is a bug; exit 1.
    monkeypatch.setattr("curate.stages.ingest.Ingest.run", bug)
    monkeypatch.setattr(sys, "argv", ["curate", "ingest", "mtd", str(mtd_copy), "-w",
                                      str(tmp_path / "ws")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'sample_id'" in err and "bug in curate" in err


def test_debug_shows_the_traceback_of_every_failure(tmp_path):
    plain = _one_error_line(invoke("labels", "-w", tmp_path / "ws", code=1).stderr)
    for args, env in ((["--debug"], None), ([], {"CURATE_DEBUG": "1"})):
        debug = invoke(*args, "labels", "-w", tmp_path / "ws", code=1, env=env)
        assert "Traceback" in debug.stderr and "CurateError" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1] == plain
    # Bad usage stays exit 2, with or without --debug.
    invoke("--debug", "ingest", "mtd", tmp_path, "-o", "nonsense", "-w", tmp_path / "ws", code=2)
    invoke("build", "hss-iad", "-w", tmp_path / "ws", code=2)


# ------------------------------------------------------------------- seeds and defaults
def test_an_explicit_seed_0_wins_over_the_recipe_seed(tmp_path, mtd_copy):
    recipe = tmp_path / "seeded.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "seeded", "version": 1, "seed": 5, "sources": [{"kind": "mtd"}],
        "stages": [{"stage": "labels"}, {"stage": "split", "params": {"test_fraction": 0.3}}]}))
    seeds = {}
    for given in ([], ["--seed", "0"], ["--seed", "7"]):
        out = invoke("build", recipe, "--source", f"mtd={mtd_copy}", "-w", tmp_path / "ws",
                     "-o", tmp_path / f"out{len(seeds)}", "--no-card", "--json", "-j", "1",
                     *given)
        manifest = json.loads(out.stdout)["manifest"]
        seeds[" ".join(given)] = Workspace.open(tmp_path / "ws").load(manifest).header["seed"]
    assert seeds == {"": 5, "--seed 0": 0, "--seed 7": 7}


def test_sources_not_given_are_reported_without_a_none_folder(tmp_path):
    found, missing = discover(None, ["mtd", "casting"], {}, {"casting": tmp_path})
    assert found == {"casting": tmp_path}
    assert "None" not in missing["mtd"] and "--source mtd=PATH" in missing["mtd"]
    result = invoke("build", "hss-iad", "--sources", tmp_path / "nope", "-w", tmp_path / "ws",
                    code=1)
    assert "nope: no such folder" in _one_error_line(result.stderr)


def test_dedup_options_are_the_stage_params_and_a_larger_radius_pulls_the_group_along(
        tmp_path, monkeypatch):
    command = cli.commands["dedup"]
    ctx = command.make_context("dedup", [])
    fields = dataclasses.asdict(DedupParams())
    assert {name: ctx.params[name] for name in fields} == fields
    assert f"[default: {DedupParams.group_radius}" in command.get_help(ctx).replace("\n", " ")
    # What reaches the stage: its defaults; a larger --radius pulls the group radius along.
    seen = []
    monkeypatch.setattr(curate.app.cli.stages, "_run_one",
                        lambda stage, m, params, *a: seen.append(params))
    for args in ([], ["--radius", "20"], ["--radius", "3", "--group-radius", "5"],
                 ["--keep-near"]):
        CliRunner().invoke(cli, ["dedup", "-w", str(tmp_path), "--json", *args])
    assert seen[0] == DedupParams()
    assert (seen[1].radius, seen[1].group_radius) == (20, 20)
    assert (seen[2].radius, seen[2].group_radius) == (3, 5)
    assert seen[3] == DedupParams(drop_near=False)


# ------------------------------------------------------------------- curate bench
@pytest.fixture
def mvtec_export(tmp_path, mtd_root) -> Path:
    """Real MTD images in the MVTec AD layout `curate bench` reads."""
    category = tmp_path / "export" / "Magnetic-tile-defect"
    free = sorted((mtd_root / "MT_Free" / "Imgs").glob("*.jpg"))
    blowholes = sorted((mtd_root / "MT_Blowhole" / "Imgs").glob("*.jpg"))[:2]
    for folder, images in (("train/good", free[:4]), ("test/good", free[4:6]),
                           ("test/Blowhole", blowholes)):
        (category / folder).mkdir(parents=True)
        for jpg in images:
            shutil.copy(jpg, category / folder)
    (category / "ground_truth" / "Blowhole").mkdir(parents=True)
    for jpg in blowholes:
        shutil.copy(jpg.with_suffix(".png"),
                    category / "ground_truth" / "Blowhole" / f"{jpg.stem}_mask.png")
    return tmp_path / "export"


TINY_CRAS = ["--detector", "cras", "--backbone", "wide_resnet_tiny", "--weights", "random",
             "--device", "cpu", "--option", "resize=80", "--option", "crop=64",
             "--option", "embed_dim=64", "--iterations", "2"]


def test_bench_records_the_batch_size_that_ran(mvtec_export, tmp_path):
    pytest.importorskip("torch", reason="the detectors extra (torch) is not installed")
    result = invoke("bench", mvtec_export, *TINY_CRAS, "--batch-size", "4", "--out",
                    tmp_path / "tables", "--json")
    provenance = json.loads(result.stdout)["provenance"]
    assert provenance["detector_options"]["batch_size"] == 4
    assert provenance["iterations"] == 2


def test_bench_user_mistakes_are_one_sentence_and_its_bugs_are_not(mvtec_export, tmp_path,
                                                                     monkeypatch):
    pytest.importorskip("torch", reason="the detectors extra (torch) is not installed")
    for option, named in (("crop=abc", "option crop must be an integer"),
                          ("nonsense=1", "unknown option(s) nonsense"),
                          ("image_score=best", "image_score must be 'map' or 'patch'")):
        result = invoke("bench", mvtec_export, *TINY_CRAS, "--option", option, "--out",
                        tmp_path / "tables", code=1)
        assert named in _one_error_line(result.stderr)
    result = invoke("bench", mvtec_export, "--detector", "cras", "--backbone", "resnet9000",
                    "--weights", "random", "--out", tmp_path / "tables", code=1)
    assert "cras runs on wide_resnet50_2, wide_resnet_tiny, not 'resnet9000'" in \
        _one_error_line(result.stderr)
    # A TypeError or ValueError of the bench's own code is a bug: its traceback stays.
    import detectors.bench

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(detectors.bench, "evaluate_category", bug)
    result = CliRunner().invoke(cli, ["bench", str(mvtec_export), *TINY_CRAS, "--out",
                                      str(tmp_path / "tables")])
    assert result.exit_code == 1 and isinstance(result.exception, TypeError)


@pytest.mark.parametrize("args", [
    ["--bogus"], ["nosuchcommand"], ["ingest"], ["ingest", "bogus", "."],
    ["labels", "--jobs", "0"], ["export", "mvtec"], ["ingest", "casting", ".", "-o", "format=x"],
])
def test_bad_usage_is_one_line_too(tmp_path, args):
    """Exit 2 with the message and where the help is, not click's three-line usage block."""
    result = invoke(*args, "-w", tmp_path / "ws", code=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "--help" in lines[0]
