"""End to end on the real MTD (1,344 images): ingest -> labels -> export MVTec."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from helpers import by_path, ingest, labels

from curate.core.errors import CurateError
from curate.core.files import sha256_file, walk_files
from curate.engine.runner import Context
from curate.engine.verify import verify
from curate.engine.workspace import Workspace
from curate.export.mvtec import export_mvtec
from curate.imaging.io import binarize, decode_file

pytestmark = pytest.mark.slow

UNEVEN_EMPTY = {"exp3_num_45042", "exp4_num_124690", "exp4_num_352527", "exp4_num_45057"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, mtd_root):
    """One ingest -> labels -> export of the real MTD, shared by the tests of this module."""
    before = {rel: sha256_file(mtd_root / rel) for rel in walk_files(mtd_root)}
    tmp = tmp_path_factory.mktemp("mtd")
    ws = Workspace.open(tmp / "ws")
    with Context(ws, jobs=2, progress=False) as ctx:
        ingested = ingest(ctx, "mtd", mtd_root)
        labelled = labels(ctx, ingested)
        report = export_mvtec(labelled, tmp / "export", ctx)
        problems = verify(labelled, ctx)
    after = {rel: sha256_file(mtd_root / rel) for rel in walk_files(mtd_root)}
    return dict(root=mtd_root, ws=ws, ingested=ingested, labelled=labelled, report=report,
                out=tmp / "export", problems=problems, before=before, after=after, tmp=tmp)


def test_every_file_is_accounted_for(built):
    m = built["ingested"]
    assert len(m) == 1344 and m.header["counts"]["kept"] == 1344
    inv = m.header["inventory"]["mtd"]
    files = set(walk_files(built["root"]))
    images = {r["path"] for r in m.rows()}
    masks = {r["annotation"]["mask"] for r in m.rows()}
    listed = {e["path"] for e in inv["unpaired"] + inv["ignored"]}
    assert images | masks | listed == files and inv["files"] == len(files)
    assert listed == {"SOURCE.md"}
    counts = Counter(r["label"] for r in m.rows())
    assert counts == {"good": 952, "Blowhole": 115, "Uneven": 103, "Break": 85, "Crack": 57,
                      "Fray": 32}


def test_headers_probed_not_guessed(built):
    rows = by_path(built["ingested"])
    row = rows["MT_Blowhole/Imgs/exp1_num_108719.jpg"]
    pixels = decode_file(built["root"] / row["path"])
    assert (row["height"], row["width"], row["channels"]) == (*pixels.shape, 1)
    assert row["sha256"] == sha256_file(built["root"] / row["path"])


def test_labels_measure_the_known_facts(built):
    rows = built["labelled"].row_list()
    empty_defects = {r["path"].split("/")[-1][:-4] for r in rows
                     if r["label"] != "good" and r["measures"]["labels.mask_fraction"] == 0}
    assert empty_defects == UNEVEN_EMPTY
    fractions = [r["measures"]["labels.mask_fraction"] for r in rows if r["label"] != "good"]
    assert 0.48 < max(fractions) < 0.49
    assert 0 < min(f for f in fractions if f > 0) < 1e-5
    assert all(r["measures"]["labels.mask_fraction"] == 0 for r in rows if r["label"] == "good")
    assert sum(r["measures"]["labels.grey_pixels"] > 0 for r in rows) > 300  # anti-aliased
    assert {r["measures"]["labels.threshold"] for r in rows if r["label"] != "good"
            and r["measures"]["labels.mask_fraction"] > 0} == {127}


def test_masks_in_store_match_the_originals(built):
    ws = built["ws"]
    for row in built["labelled"].row_list()[::37]:
        if row["label"] == "good":
            assert "mask" not in row["artifacts"]
            continue
        original, _ = binarize(decode_file(built["root"] / row["annotation"]["mask"]))
        assert np.array_equal(ws.store.read_mask(row["artifacts"]["mask"]), original)


def test_export_layout_and_contents(built):
    out, report = built["out"], built["report"]
    cat = out / "Magnetic-tile-defect"
    # The four Uneven images with empty masks are not exported as anomalies (issue 17).
    assert report["written"] == 1340
    assert {s["path"].split("/")[-1][:-4] for s in report["skipped"]} == UNEVEN_EMPTY
    assert all(s["why"].endswith("but its mask is empty") for s in report["skipped"])
    assert len(list((cat / "test/good").glob("*.png"))) == 952
    assert sorted(p.name for p in cat.iterdir()) == ["ground_truth", "test"]
    defects = {"Blowhole": 115, "Break": 85, "Crack": 57, "Fray": 32, "Uneven": 99}
    for defect, n in defects.items():
        assert len(list((cat / "test" / defect).glob("*.png"))) == n
        assert len(list((cat / "ground_truth" / defect).glob("*_mask.png"))) == n
    marker = json.loads((out / "curate-export.json").read_text())
    assert marker["manifest"] == built["labelled"].id
    entry = next(f for f in marker["files"] if f["mask"])
    image = decode_file(out / entry["file"])
    assert np.array_equal(image, decode_file(built["root"] / entry["path"]))
    mask = decode_file(out / entry["mask"])
    assert set(np.unique(mask)) <= {0, 255} and mask.shape == image.shape


def test_export_refuses_to_clobber(built):
    with Context(built["ws"], jobs=1, progress=False) as ctx:
        # Another manifest's export is replaced only with --overwrite (the same manifest's
        # may be made again: nothing is lost).
        with pytest.raises(CurateError, match="--overwrite"):
            export_mvtec(built["ingested"], built["out"], ctx)
        other = built["tmp"] / "someone-elses"
        other.mkdir()
        (other / "notes.txt").write_text("keep me")
        with pytest.raises(CurateError, match="not an earlier curate export"):
            export_mvtec(built["labelled"], other, ctx, overwrite=True)
        assert (other / "notes.txt").read_text() == "keep me"


def test_verify_passes_and_originals_untouched(built):
    assert built["problems"] == []
    assert built["before"] == built["after"]


def test_same_manifest_ids_across_runs_and_jobs(built, tmp_path):
    ws = Workspace.open(tmp_path / "again")
    with Context(ws, jobs=1, progress=False) as ctx:
        m1 = ingest(ctx, "mtd", built["root"])
        l1 = labels(ctx, m1)
    assert (m1.id, l1.id) == (built["ingested"].id, built["labelled"].id)
    for m in (m1, l1):
        assert ws.manifest_path(m.id).read_bytes() == \
            built["ws"].manifest_path(m.id).read_bytes()
