"""Issue 17 items 10 (the bank part) and 11: a bank leaves curate in RealNet's SDAS layout, and
banks and blends are side products that never take the workspace's `latest` off the dataset."""

from __future__ import annotations

import json
import os
from glob import glob
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
cv2 = pytest.importorskip("cv2")

from click.testing import CliRunner  # noqa: E402
from helpers import mtd_subset, tiny_diffusion_checkpoint, tree_digest  # noqa: E402

from curate.app.cli import cli  # noqa: E402
from curate.engine.workspace import Workspace, is_side_product  # noqa: E402
from curate.export.sdas import MARKER  # noqa: E402

CATEGORY = "Magnetic-tile-defect"


class Cli:
    """`curate ... -w ws` through click, as a user runs it."""

    def __init__(self, ws: Path):
        self.ws, self.runner = str(ws), CliRunner()

    def __call__(self, *args: str, code: int = 0):
        result = self.runner.invoke(cli, [*args, "-w", self.ws], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result

    def json(self, *args: str):
        return json.loads(self(*args, "--json").output)


@pytest.fixture(scope="module")
def made(tmp_path_factory, mtd_root):
    """A workspace holding a real MTD subset (the dataset), a 3-image bank and a blend."""
    tmp = tmp_path_factory.mktemp("sdas_export")
    run = Cli(tmp / "ws")
    src = mtd_subset(mtd_root, tmp / "mtd", {"MT_Free": 4, "MT_Crack": 1})
    (dataset,) = run.json("ingest", "mtd", str(src), "-j", "1")
    ckpt = tiny_diffusion_checkpoint(tmp / "ckpt")
    (bank,) = run.json("sdas", "sample", "--category", CATEGORY, "--checkpoint", str(ckpt),
                       "-n", "3", "--steps", "2", "--batch-size", "2", "--device", "cpu",
                       "-j", "1")
    (blend,) = run.json("sdas", "blend", "--category", CATEGORY, "--bank", bank["manifest"],
                        "-n", "2", "--size", "32", "-j", "1")
    return {"run": run, "tmp": tmp, "dataset": dataset["manifest"], "bank": bank["manifest"],
            "blend": blend["manifest"], "ckpt": ckpt}


# ----------------------------------------------------------------------------- item 11
def test_sample_and_blend_leave_latest_on_the_dataset(made):
    run = made["run"]
    assert run.json("manifest", "show", "latest")["header"]["id"] == made["dataset"]
    listed = {m["id"]: m for m in run.json("manifest", "list")}
    assert listed[made["dataset"]]["latest"] and not listed[made["dataset"]]["side_product"]
    for side in (made["bank"], made["blend"]):
        assert listed[side]["side_product"] and not listed[side]["latest"]
    table = run("manifest", "list").output
    assert table.count("(side product)") == 2
    # The bank is still named by its id: blending from it again (cached) needs no `latest`.
    (again,) = run.json("sdas", "blend", "--category", CATEGORY, "--bank", made["bank"][:12],
                        "-n", "2", "--size", "32", "-j", "1")
    assert again["manifest"] == made["blend"]
    assert run.json("manifest", "show")["header"]["id"] == made["dataset"]


def test_sample_says_latest_did_not_move(made):
    out = made["run"]("sdas", "sample", "--category", CATEGORY, "--checkpoint",
                      str(made["ckpt"]), "-n", "3", "--steps", "2", "--batch-size", "2",
                      "--device", "cpu", "-j", "1").output
    assert f"bank {made['bank']} is a side product: `latest` stays where it was" in out


def test_the_side_product_rule_is_about_sources():
    def header(*kinds: str) -> dict:
        return {"sources": {f"s{i}": {"kind": k, "options": {}} for i, k in enumerate(kinds)}}

    assert is_side_product(header("sdas")) and is_side_product(header("sdas_blend"))
    assert is_side_product(header("sdas", "sdas_blend"))
    assert not is_side_product(header("mtd"))
    assert not is_side_product(header("mtd", "sdas_blend"))  # a merge into the dataset
    assert not is_side_product(header())


def test_a_manifest_derived_from_a_blend_alone_stays_a_side_product(made):
    """Reviewing a blend (push, pull) derives from it: the result must not become latest."""
    ws = Workspace.open(made["run"].ws, create=False)
    blend = ws.load(made["blend"])
    child = blend.derive(blend.row_list()[:1], stage="review", stage_version="1")
    ws.save(child)
    assert ws.head() == made["dataset"]
    dataset = ws.load(made["dataset"])
    ws.save(dataset.derive(dataset.row_list()[:2], stage="review", stage_version="1"))
    assert ws.head() != made["dataset"]  # the dataset line still moves
    ws.set_head(made["dataset"])


# ----------------------------------------------------------------------------- item 10
def realnet_sdas_files(sdas_dir: Path) -> list[str]:
    """RealNetDataset.__init__ (cnulab/RealNet, datasets/realnet_dataset.py): the bank of a
    class is ``glob(os.path.join(sdas_dir, '*'))``, ``sdas_dir`` being ``sdas/{}``."""
    return glob(os.path.join(str(sdas_dir), "*"))


def realnet_sdas_source(path: str, resize: tuple[int, int]) -> np.ndarray:
    """RealNetDataset._sdas_source, for one file."""
    image = cv2.imread(path)
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return cv2.resize(image, dsize=resize).astype(np.float32)


def test_export_is_what_realnets_glob_reads(made):
    run, out = made["run"], made["tmp"] / "sdas"
    report = run.json("sdas", "export", "--bank", made["bank"], "--out", str(out))
    assert report["written"] == 3 and report["banks"][0]["folder"] == CATEGORY

    ws = Workspace.open(made["run"].ws, create=False)
    bank = {r["sample_id"]: r for r in ws.load(made["bank"]).rows()}
    found = sorted(realnet_sdas_files(out / CATEGORY))
    assert [Path(p).name for p in found] == ["000000.png", "000001.png", "000002.png"]
    index = json.loads((out / MARKER).read_text())
    by_file = {e["file"]: e for e in index["files"]}
    assert sorted(by_file) == [f"{CATEGORY}/{Path(p).name}" for p in found]
    for path in found:
        entry = by_file[f"{CATEGORY}/{Path(path).name}"]
        row = bank[entry["sample_id"]]
        assert entry["index"] == row["measures"]["sdas.index"] == int(Path(path).stem)
        assert entry["seed"] == row["measures"]["sdas.seed"]
        assert entry["strength"] == row["measures"]["sdas.strength"]
        # RealNet reads the very pixels the bank stored, in RGB order.
        stored = ws.store.read_pixels(row["artifacts"]["image"])
        read = realnet_sdas_source(path, resize=stored.shape[:2][::-1])
        assert read.shape == stored.shape and np.array_equal(read, stored.astype(np.float32))
    # Nothing but images in the class folder, nothing else beside the index.
    assert sorted(os.listdir(out)) == sorted([CATEGORY, MARKER])
    # The message tells where RealNet's sdas_dir points.
    text = run("sdas", "export", "--bank", made["bank"], "--out", str(out), "--overwrite").output
    assert f"sdas_dir: {out}/{{}}" in text


def test_a_damaged_bank_image_exports_nothing(made):
    run, tmp = made["run"], made["tmp"]
    out = tmp / "damaged"
    run("sdas", "export", "--bank", made["bank"], "--out", str(out))
    before = tree_digest(out)
    ws = Workspace.open(run.ws, create=False)
    row = next(ws.load(made["bank"]).rows())
    stored = ws.store.path(row["artifacts"]["image"])
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        for target, extra in ((out, ["--overwrite"]), (tmp / "fresh", [])):
            result = run("sdas", "export", "--bank", made["bank"], "--out", str(target),
                         *extra, code=1)
            (line,) = result.output.strip().splitlines()
            assert "changed since bank" in line and "nothing was exported" in line
        assert tree_digest(out) == before  # the earlier export untouched
        assert not (tmp / "fresh").exists()
        assert not [p for p in os.listdir(tmp) if "curate-tmp" in p or "curate-old" in p]
    finally:
        stored.write_bytes(original)


def test_only_banks_and_one_bank_per_category(made):
    run, tmp = made["run"], made["tmp"]
    for bad in ([made["dataset"]], [made["blend"]], [made["bank"], made["bank"]]):
        args = [a for bank in bad for a in ("--bank", bank)]
        result = run("sdas", "export", *args, "--out", str(tmp / "bad"), code=2)
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp / "bad").exists()


def test_an_earlier_export_is_replaced_only_when_asked(made):
    run, out = made["run"], made["tmp"] / "twice"
    run("sdas", "export", "--bank", made["bank"], "--out", str(out))
    result = run("sdas", "export", "--bank", made["bank"], "--out", str(out), code=1)
    assert "--overwrite" in result.output
    other = made["tmp"] / "not-an-export"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    run("sdas", "export", "--bank", made["bank"], "--out", str(other), "--overwrite", code=1)
    assert (other / "keep.txt").read_text() == "mine"

