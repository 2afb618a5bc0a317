"""The base install (no extras) builds a dataset; a feature that needs an extra says which
(issue 16 item 8).

The CLI runs in a subprocess whose imports of the optional libraries fail, as on
``pip install curate``: a ``sitecustomize`` on PYTHONPATH puts a blocker in ``sys.meta_path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mtd_subset

from curate.core.optional import EXTRAS, MissingExtra, require

CURATE = [sys.executable, "-m", "curate.app.cli"]
OPTIONAL = ("torch", "torchvision", "transformers", "diffusers", "fiftyone", "ray")
BLOCKER = f"""
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("base-site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def _curate(env: dict[str, str], *args: str | Path, cwd: Path | None = None):
    return subprocess.run([*CURATE, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd)


def test_the_blocker_blocks(base_env):
    for module in OPTIONAL:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], env=base_env,
                                capture_output=True, text=True)
        assert result.returncode == 1
        assert f"No module named '{module}'" in result.stderr


@pytest.fixture(scope="module")
def built(base_env, mtd_root, tmp_path_factory) -> Path:
    """`curate build hss-iad` on a few real MTD images, without the optional libraries."""
    tmp = tmp_path_factory.mktemp("base-build")
    source = mtd_subset(mtd_root, tmp / "mtd", {"MT_Free": 6, "MT_Blowhole": 3, "MT_Crack": 3})
    result = _curate(base_env, "build", "hss-iad", "--source", f"mtd={source}", "-w", "ws",
                     "--out", "out", "-j", "1", cwd=tmp)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return tmp


def test_build_works_on_the_base_install(built):
    assert (built / "out" / "Magnetic-tile-defect" / "train" / "good").is_dir()
    assert (built / "out" / "card.md").is_file()


@pytest.mark.parametrize("args, sentence", [
    (["filter-noise"], "curate filter-noise needs PyTorch: pip install 'curate[detectors]'"),
    (["quality", "--executor", "ray"], "--executor ray needs Ray: pip install 'curate[ray]'"),
    (["review", "push"], "curate review needs FiftyOne: pip install 'curate[review]'"),
    (["sdas", "sample", "--category", "Magnetic-tile-defect", "--checkpoint", "out"],
     "curate sdas needs PyTorch: pip install 'curate[detectors]'"),
    (["build", "ssfilter.yaml"], "stage ssfilter needs PyTorch: pip install 'curate[detectors]'"),
    (["bench", "out"], "curate bench needs PyTorch: pip install 'curate[detectors]'"),
])
def test_a_feature_that_needs_an_extra_names_it_in_one_sentence(base_env, built, args,
                                                                  sentence):
    (built / "ssfilter.yaml").write_text(
        "name: t\nversion: 1\nsources: [{kind: mtd, category: M}]\n"
        "stages: [{stage: ssfilter, params: {}}]\n")
    workspace = [] if args[0] == "bench" else ["-w", "ws"]  # bench reads an export only
    result = _curate(base_env, *args, *workspace, cwd=built)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == f"error: {sentence}"


def test_require_names_the_extra_and_lets_other_import_errors_through(tmp_path, monkeypatch):
    assert require("json", "anything").__name__ == "json"
    (tmp_path / "needs_fiftyone.py").write_text("import fiftyone.core.odm\n")
    (tmp_path / "needs_nothing_known.py").write_text("import curate_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "fiftyone", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"^review needs FiftyOne: "
                                           r"pip install 'curate\[review\]'$"):
        require("needs_fiftyone", "review")
    with pytest.raises(ModuleNotFoundError, match="curate_no_such_module"):
        require("needs_nothing_known", "a bug")
    assert set(OPTIONAL) <= set(EXTRAS)


def test_every_command_shows_its_help_on_the_base_install(base_env, tmp_path):
    """Options are generated from the stages' Params: reading them must not need an extra
    (SSFilterParams, SdasSampleParams live apart from the torch code for this)."""
    from curate.app.cli import cli

    def paths(group, prefix=()):
        for name, command in group.commands.items():
            yield (*prefix, name)
            if hasattr(command, "commands"):
                yield from paths(command, (*prefix, name))

    script = "; ".join([
        "import sys", "from click.testing import CliRunner", "from curate.app.cli import cli",
        "bad = [p for p in map(str.split, sys.argv[1:]) "
        "if (r := CliRunner().invoke(cli, [*p, '--help'])).exit_code != 0 "
        "or 'Usage:' not in r.output]",
        "print(bad); sys.exit(1 if bad else 0)"])
    commands = [" ".join(p) for p in paths(cli)]
    assert "filter-noise" in commands and "sdas sample" in commands
    result = subprocess.run([sys.executable, "-c", script, *commands], capture_output=True,
                            text=True, env=base_env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
